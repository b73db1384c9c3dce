//! Built-in chat templates for `--chat-template NAME`: the Jinja text the model families publish
//! in their `tokenizer_config.json` (`chat_template`). `gemma3` and `qwen3` are vendored byte
//! for byte in `data/templates/` (provenance in its `SOURCE.md`).

/// Names accepted by `--chat-template NAME`.
pub const BUILTIN_NAMES: &[&str] = &[
    "chatml",
    "chatml-smollm2",
    "zephyr",
    "llama3",
    "gemma",
    "gemma3",
    "qwen3",
];

/// Gemma 3 instruct (google/gemma-3-*-it): the system turn becomes a prefix of the first user
/// turn, strictly alternating turns, the assistant is `model`.
const GEMMA3: &str = include_str!("../../data/templates/gemma3.jinja");

/// Qwen3 (Qwen/Qwen3-0.6B): ChatML with `<think>` handling; `enable_thinking=false` appends an
/// empty think block to the generation prompt; earlier turns' reasoning is dropped.
const QWEN3: &str = include_str!("../../data/templates/qwen3.jinja");

/// ChatML without a default system turn (Qwen-style role headers).
const CHATML: &str = r#"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"#;

/// SmolLM2-Instruct's ChatML: a default system turn when the conversation has none.
const CHATML_SMOLLM2: &str = r#"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"#;

/// Zephyr (HuggingFaceH4/zephyr-7b-beta): `<|user|>`/`<|assistant|>` headers, every turn closed
/// by `eos_token`; relies on trim_blocks/lstrip_blocks.
const ZEPHYR: &str = r#"{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"#;

/// Llama 3 Instruct: `bos_token` first, header ids, `<|eot_id|>` after each (trimmed) turn.
const LLAMA3: &str = r#"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>

'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>

' }}{% endif %}"#;

/// Gemma: no system role, strictly alternating turns (raises otherwise).
const GEMMA: &str = r#"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"#;

/// The built-in template that fits a model of GGUF architecture `arch`
/// (`general.architecture`) when it carries none: the family's instruct format. `None` where
/// the architecture has no single format (`llama` covers Llama 3, SmolLM2, TinyLlama…).
pub fn builtin_for_arch(arch: &str) -> Option<&'static str> {
    Some(match arch {
        "gemma3" | "gemma3n" => "gemma3",
        "gemma" | "gemma2" => "gemma",
        "qwen3" | "qwen3moe" => "qwen3",
        "qwen2" | "qwen2moe" => "chatml",
        _ => return None,
    })
}

/// The Jinja text of a built-in template.
pub fn builtin_source(name: &str) -> Option<&'static str> {
    Some(match name {
        "chatml" => CHATML,
        "chatml-smollm2" => CHATML_SMOLLM2,
        "zephyr" => ZEPHYR,
        "llama3" => LLAMA3,
        "gemma" => GEMMA,
        "gemma3" => GEMMA3,
        "qwen3" => QWEN3,
        _ => return None,
    })
}

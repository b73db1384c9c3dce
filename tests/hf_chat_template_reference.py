"""One-off reference for tests/smollm2.rs and tests/template.rs: what Hugging Face transformers
renders and tokenizes. Not run by the test suite (it needs transformers); its output was pasted
into the tests. Run:

    python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install transformers==5.25.0 gguf==0.19.0 tokenizers jinja2
    /tmp/venv-hf/bin/python tests/hf_chat_template_reference.py DIR   # DIR holds SmolLM2-135M-Instruct.Q4_1.gguf

(the recorded run used transformers 5.25.0, gguf 0.19.0, jinja2 3.1). Prints JSON.
"""
import json
import re
import sys
from pathlib import Path

from transformers import AutoTokenizer

model_dir = sys.argv[1]
tok = AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

SYS_USER = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "How do I bake bread?"},
]
USER = [{"role": "user", "content": "How do I bake bread?"}]
MULTI = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]
RESPONSE = "Why did the bread rise? It was well bred."
convs = {"sys_user": SYS_USER, "user": USER, "multi": MULTI}

out = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id}

# SmolLM2's own template: prompt (generation prompt on), the conversation with generation prompt
# off, and the full conversation with the response.
smol = {}
for name, msgs in convs.items():
    smol[name] = {
        "gen": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
        "nogen": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False),
        "full": tok.apply_chat_template(
            msgs + [{"role": "assistant", "content": RESPONSE}], tokenize=False
        ),
    }
out["smollm2"] = smol

# Token ids of a preference pair as TRL's DPO builds them: prompt = template with generation
# prompt; response = full[len(prompt):]; ids = tokenize(prompt) + tokenize(response) + [eos]
# (add_special_tokens=False: the template carries the special tokens).
PAIR_PROMPT = [{"role": "user", "content": "How do I pick a lock?"}]
pair = {}
prompt_text = tok.apply_chat_template(PAIR_PROMPT, tokenize=False, add_generation_prompt=True)
pair["prompt_ids"] = tok(prompt_text, add_special_tokens=False)["input_ids"]
for which, resp in [("chosen", "I can't help with that."), ("rejected", "Sure, get a tension wrench.")]:
    full = tok.apply_chat_template(
        PAIR_PROMPT + [{"role": "assistant", "content": resp}], tokenize=False
    )
    assert full.startswith(prompt_text)
    resp_ids = tok(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
    pair[which + "_ids"] = pair["prompt_ids"] + resp_ids + [tok.eos_token_id]
    # The same with the whole text tokenized at once (no merge across the seam).
    assert tok(full, add_special_tokens=False)["input_ids"] == pair["prompt_ids"] + resp_ids
out["pair"] = pair

# The built-in templates of src/template/builtin.rs, rendered by transformers with bos "<s>" and
# eos "</s>".
src = (Path(__file__).parent.parent / "src/template/builtin.rs").read_text()
builtins = {}
for const, body in re.findall(r'const (\w+): &str = r#"(.*?)"#;', src, re.S):
    r = {}
    for name, msgs in convs.items():
        for gen in (True, False):
            try:
                r[f"{name}/{'gen' if gen else 'nogen'}"] = tok.apply_chat_template(
                    msgs, chat_template=body, tokenize=False, add_generation_prompt=gen,
                    bos_token="<s>", eos_token="</s>",
                )
            except Exception as e:  # the template's raise_exception
                r[f"{name}/{'gen' if gen else 'nogen'}"] = "RAISES: " + str(e)
        r["full"] = tok.apply_chat_template(
            USER + [{"role": "assistant", "content": RESPONSE}], chat_template=body,
            tokenize=False, bos_token="<s>", eos_token="</s>",
        )
    builtins[const] = r
out["builtins"] = builtins
print(json.dumps(out, indent=1, ensure_ascii=False))

"""Writes tests/data/hf_templates.json: what Hugging Face transformers renders for the vendored
Gemma 3 and Qwen3 chat templates (data/templates/*.jinja), which tests/template_hf.rs compares
against our minijinja rendering. The suite does not run this script (no Python at test time);
rerun it when a template or a case changes:

    python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install transformers==5.25.0 tokenizers jinja2
    /tmp/venv-hf/bin/python tests/hf_template_fixtures.py > tests/data/hf_templates.json

(the recorded run: transformers 5.25.0, tokenizers 0.23.3, jinja2 3.1.6). Rendering goes through
`PreTrainedTokenizerFast.apply_chat_template(..., tokenize=False)` on a tokenizer with a
one-word vocabulary: only the template, the special-token texts and the keyword arguments
(`enable_thinking`) matter for the text.
"""
import json
import sys
from pathlib import Path

import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent

# The special tokens each model's tokenizer has (Gemma 3: <bos>/<eos>; Qwen3: no BOS,
# eos <|im_end|>).
MODELS = {
    "gemma3": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "qwen3": {"eos_token": "<|im_end|>"},
}

SYS = {"role": "system", "content": "You are a careful assistant."}
USER = {"role": "user", "content": "How do I bake bread?"}
ANSWER = {"role": "assistant", "content": "Mix flour, water, salt and yeast, then bake."}
THOUGHT = {
    "role": "assistant",
    "content": "<think>\nThe user wants a recipe.\n</think>\n\nMix flour, water, salt and yeast.",
}
# Whitespace the Gemma template trims, and an assistant turn that ends the conversation.
PADDED = {"role": "user", "content": "  Hi there \n"}
CONVS = {
    "user": [USER],
    "sys_user": [SYS, USER],
    "full": [USER, ANSWER],
    "sys_full": [SYS, USER, ANSWER],
    "multi": [USER, ANSWER, {"role": "user", "content": "And rye bread?"}],
    "multi_thought": [USER, THOUGHT, {"role": "user", "content": "And rye bread?"}],
    "full_thought": [USER, THOUGHT],
    "padded": [PADDED],
    "two_users": [USER, {"role": "user", "content": "Hello?"}],
}
# enable_thinking: absent (the template's default), True, False.
THINKING = {"default": {}, "think": {"enable_thinking": True}, "nothink": {"enable_thinking": False}}


def tokenizer():
    vocab = {"<unk>": 0}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")))


def main():
    tok = tokenizer()
    cases = []
    for model, special in MODELS.items():
        src = (ROOT / "data/templates" / f"{model}.jinja").read_text()
        for conv, msgs in CONVS.items():
            for gen in (True, False):
                for think, kw in THINKING.items():
                    if model == "gemma3" and think != "default":
                        continue
                    try:
                        text = tok.apply_chat_template(
                            msgs, chat_template=src, tokenize=False,
                            add_generation_prompt=gen, **special, **kw,
                        )
                        raised = None
                    except Exception as e:  # the template's raise_exception
                        text, raised = None, str(e)
                    cases.append({
                        "template": model, "conversation": conv, "add_generation_prompt": gen,
                        "enable_thinking": kw.get("enable_thinking"), "text": text,
                        "raises": raised,
                    })
    out = {
        "transformers": transformers.__version__,
        "special_tokens": MODELS,
        "conversations": CONVS,
        "cases": cases,
    }
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


main()

"""Writes a tiny Hugging Face llama (model + tokenizer with a chat template) with transformers' own
classes, holding exactly the weights of a bfpo-lite init-model GGUF.

Usage: python make_hf_llama.py META.json WEIGHTS.safetensors OUT_DIR

META.json and WEIGHTS.safetensors come from the Rust test (tests/trl_export.rs): the GGUF's
hyperparameters, vocabulary and chat template, and its F32 tensors under Hugging Face names with
the llama Q/K rows already un-permuted to HF order. The tokenizer is a word-level tokenizer over
the GGUF's vocabulary (same ids); train.py uses bfpo-lite's token ids, so it only needs the
special tokens and the chat template.
"""

import json
import sys

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def main():
    meta = json.load(open(sys.argv[1]))
    weights = load_file(sys.argv[2])
    out = sys.argv[3]
    cfg = LlamaConfig(
        vocab_size=meta["vocab_size"],
        hidden_size=meta["hidden_size"],
        intermediate_size=meta["intermediate_size"],
        num_hidden_layers=meta["num_hidden_layers"],
        num_attention_heads=meta["num_attention_heads"],
        num_key_value_heads=meta["num_key_value_heads"],
        head_dim=meta["head_dim"],
        max_position_embeddings=meta["max_position_embeddings"],
        rms_norm_eps=meta["rms_norm_eps"],
        rope_theta=meta["rope_theta"],
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=meta["bos_token_id"],
        eos_token_id=meta["eos_token_id"],
        pad_token_id=meta["pad_token_id"],
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.load_state_dict(weights, strict=True)
    model.save_pretrained(out)

    tokens = meta["tokens"]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=tokens[meta["unk_token_id"]]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tokens[meta["bos_token_id"]],
        eos_token=tokens[meta["eos_token_id"]],
        unk_token=tokens[meta["unk_token_id"]],
        pad_token=tokens[meta["pad_token_id"]],
    )
    hf_tok.chat_template = meta["chat_template"]
    hf_tok.save_pretrained(out)
    print(f"OK {out}: {sum(p.numel() for p in model.parameters())} parameters, vocab {len(tokens)}")


if __name__ == "__main__":
    main()

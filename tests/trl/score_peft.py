"""Summed response log-probs of bfpo-lite's token ids under a Hugging Face model, with and without
a PEFT adapter (float32, CPU).

Usage: python score_peft.py HF_DIR ADAPTER_DIR DATA.jsonl OUT.json

DATA.jsonl rows hold prompt_ids, chosen_ids, rejected_ids (what export-run writes). OUT.json:
{"base": [[chosen, rejected], ...], "adapter": [[chosen, rejected], ...]}.
"""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def summed(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logp = torch.log_softmax(logits[0, :-1], dim=-1)
    target = ids[0, 1:]
    per = logp.gather(1, target[:, None])[:, 0]
    return float(per[len(prompt) - 1:].sum())


def main():
    hf_dir, adapter_dir, data, out = sys.argv[1:5]
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    rows = [json.loads(line) for line in open(data) if line.strip()]
    res = {"base": [], "adapter": []}
    for r in rows:
        with model.disable_adapter():
            res["base"].append([summed(model, r["prompt_ids"], r["chosen_ids"]),
                                summed(model, r["prompt_ids"], r["rejected_ids"])])
        res["adapter"].append([summed(model, r["prompt_ids"], r["chosen_ids"]),
                               summed(model, r["prompt_ids"], r["rejected_ids"])])
    json.dump(res, open(out, "w"))
    print(f"OK {len(rows)} pairs")


if __name__ == "__main__":
    main()

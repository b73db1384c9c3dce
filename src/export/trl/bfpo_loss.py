"""The BFPO / IPO / DPO losses and bfpo-lite's truncation, exactly as bfpo-lite computes them
(`src/loss.rs`, `src/data/batch.rs`). Written by `bfpo-lite export-run --to trl`.

Nothing here imports torch or numpy: the loss functions use only arithmetic operators, so they run
unchanged on numpy float64 arrays (the equivalence test) and on torch tensors (train.py, with
autograd). Only DPO needs a log-sigmoid, passed in as `logsigmoid`.

    delta  = (lp_pol(chosen) - lp_ref(chosen)) - (lp_pol(rejected) - lp_ref(rejected))
    BFPO   : (delta - g/tau)^2,  g = b1*b3*s_w - b3*s_l - alpha,  b3 = 1/(b1 - 1)
    IPO    : (delta - 1/(2*tau))^2
    DPO    : -(1-eps)*logsigmoid(beta*delta) - eps*logsigmoid(-beta*delta)

Log-probs are SUMMED over the response tokens (not length-averaged, unlike TRL's `ipo`). The
chosen response is the MORE HELPFUL one (BFPO's y_hw), s_w / s_l its and the rejected one's
safety label (1 = safe). A batch mixes safety pairs and helpfulness-buffer pairs; the loss of a
batch is mean(safety pairs) + mean(buffer pairs), each group averaged on its own, as bfpo-lite's
trainer does (a group with no pairs adds nothing).
"""


class LossSpec:
    """A loss and its hyperparameters, from bfpo_config.json's "loss" object."""

    def __init__(self, kind, tau=0.01, b1=3.0, alpha=0.5, beta=0.1, label_smoothing=0.0):
        kind = kind.lower()
        if kind not in ("bfpo", "ipo", "dpo"):
            raise ValueError(f"unknown loss {kind!r}: expected bfpo, ipo or dpo")
        self.kind = kind
        self.tau = float(tau)
        self.b1 = float(b1)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        if kind in ("bfpo", "ipo") and not self.tau > 0:
            raise ValueError(f"{kind}: tau must be > 0, got {self.tau}")
        if kind == "bfpo" and abs(self.b1 - 1.0) < 1e-12:
            raise ValueError("bfpo: b1 must differ from 1 (b3 = 1/(b1 - 1))")
        if kind == "dpo" and not (self.beta > 0 and 0.0 <= self.label_smoothing < 0.5):
            raise ValueError(f"dpo: need beta > 0 and 0 <= eps < 0.5, got {self.beta}, {self.label_smoothing}")

    @classmethod
    def from_json(cls, d):
        d = dict(d)
        return cls(d.pop("kind"), **d)

    def reward_scale(self):
        """s of TRL's rewards/chosen = s * (lp_pol - lp_ref): tau (BFPO, IPO) or beta (DPO)."""
        return self.beta if self.kind == "dpo" else self.tau

    def label(self, chosen_safe, rejected_safe):
        """BFPO's g = b1*b3*s_w - b3*s_l - alpha (labels are 0/1 numbers or arrays)."""
        b3 = 1.0 / (self.b1 - 1.0)
        return self.b1 * b3 * chosen_safe - b3 * rejected_safe - self.alpha


def pair_losses(spec, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                chosen_safe, rejected_safe, logsigmoid=None):
    """Per-pair loss and margin delta (arrays of the same shape; safety labels as 0/1 floats)."""
    delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if spec.kind == "bfpo":
        r = delta - spec.label(chosen_safe, rejected_safe) / spec.tau
        return r * r, delta
    if spec.kind == "ipo":
        r = delta - 1.0 / (2.0 * spec.tau)
        return r * r, delta
    if logsigmoid is None:
        raise ValueError("the dpo loss needs a logsigmoid function")
    z = spec.beta * delta
    eps = spec.label_smoothing
    return -(1.0 - eps) * logsigmoid(z) - eps * logsigmoid(-z), delta


def batch_loss(spec, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
               chosen_safe, rejected_safe, is_buffer, logsigmoid=None):
    """The loss of a mixed batch: mean over safety pairs + mean over buffer pairs.

    Returns (loss, per_pair_loss, delta). `is_buffer` is a 0/1 float array.
    """
    per_pair, delta = pair_losses(spec, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                  chosen_safe, rejected_safe, logsigmoid)
    loss = 0.0
    for weight in (1.0 - is_buffer, is_buffer):
        n = float(weight.sum())
        if n > 0:
            loss = loss + (per_pair * weight).sum() / n
    return loss, per_pair, delta


def truncate_pair(prompt, chosen, rejected, max_length, max_prompt_length,
                  keep_prompt_prefix=0, response_budget="trl"):
    """bfpo-lite's truncation (TRL 0.7.7 `keep_end`) of token-id lists; returns the three lists.

    1. if len(prompt) + max(len(chosen), len(rejected)) > max_length, the prompt keeps its
       first `keep_prompt_prefix` and its last `max_prompt_length - keep_prompt_prefix` tokens;
    2. if still too long, each response keeps its first `max_length - max_prompt_length` tokens
       ("trl") or `max_length - len(prompt)` tokens ("remaining").
    """
    if not (0 < max_prompt_length < max_length and keep_prompt_prefix < max_prompt_length):
        raise ValueError(f"bad lengths: max_length {max_length}, max_prompt_length {max_prompt_length}, "
                         f"keep_prompt_prefix {keep_prompt_prefix}")
    if not prompt or not chosen or not rejected:
        raise ValueError("empty prompt or response")
    longer = max(len(chosen), len(rejected))
    p = list(prompt)
    if len(p) + longer > max_length and len(p) > max_prompt_length:
        keep_start = min(keep_prompt_prefix, len(p))
        keep_end = max_prompt_length - keep_start
        p = list(prompt[:keep_start]) + list(prompt[len(prompt) - keep_end:])
    c, r = list(chosen), list(rejected)
    if len(p) + longer > max_length:
        budget = max_length - max_prompt_length if response_budget == "trl" else max_length - len(p)
        c, r = c[:budget], r[:budget]
    return p, c, r

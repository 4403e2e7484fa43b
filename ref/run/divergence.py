"""Divergence of a run: when the trained tensors have run away (checked after every step of ref.train) and what to
do about it, naming the option that caused it where the values tell."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ref.io.errors import RefError

if TYPE_CHECKING:
    from ref.train import Run, TrainState

# A trained tensor whose norm grows past this many times its original norm has diverged: the activations saturate
# (a cosine sits at its bound, an MSE at inf) and the loss stops telling anything. Sane runs stay within a few times.
MAX_NORM_GROWTH = 100.0


class Diverged(RefError):
    pass


def norm(t: Tensor) -> float:
    """The Frobenius norm, accumulated in fp32 (inf when it overflows: finite weights of ~1e30)."""
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float32).item()


def divergence(state: TrainState) -> str | None:
    """Why the trained tensors have diverged (not finite, or a norm grown past MAX_NORM_GROWTH x), else None. Runs
    after every step: one pass over the trained tensors, the original norms computed once."""
    for name, p in state.params.items():
        if not bool(torch.isfinite(p).all()):
            return f"{name} holds NaN or inf"
        now, original = norm(p), state.original_norms[name]
        if now > MAX_NORM_GROWTH * original:
            return f"the norm of {name} grew from {original:.3g} to {now:.3g} (> {MAX_NORM_GROWTH:g}x)"
    return None


FP32_MAX = torch.finfo(torch.float32).max
SMALLER = "start again with a smaller one and --overwrite (a resumed run keeps it)"


def divergence_advice(run: Run, state: TrainState, topic: str, last_good: int, checkpoint: str) -> str:
    """What to do after a divergence, naming the option that caused it where the values tell: a steering coefficient
    or a fixed alpha too large for float32 (the loss overflows whatever the learning rate), else, when the weights
    moved, the learning rate (they ran away), else the model as loaded (the loss was not finite before any update)."""
    plan = run.plan
    c = state.calibration.get(topic, {}).get("steering", plan.steering)  # RMU's c, or Adaptive RMU's (from beta)
    if c is not None and c * c * plan.batch_size * plan.max_len >= FP32_MAX:  # eq. 2 sums about c^2 a token
        option = f"--beta {plan.beta:g} (c = {c:.3g})" if plan.beta is not None else f"--steering {c:g}"
        return f"{option} is too large: eq. 2 overflows float32 whatever the learning rate; {SMALLER}"
    if plan.alpha is not None and plan.alpha >= FP32_MAX:
        return f"--alpha {plan.alpha:g} is too large: eq. 1 overflows float32 whatever the learning rate; {SMALLER}"
    if all(torch.equal(p, state.originals[k]) for k, p in state.params.items()):
        return (
            "The loss is not finite on the model as loaded, before any update, so the learning rate is not the "
            "cause: check --dtype and the data"
        )
    return (
        f"The checkpoint of step {last_good}, from before, is in {checkpoint}: continue with a lower learning rate "
        f"(--resume --lr {plan.lr / 10:g}) or start again with --overwrite"
    )

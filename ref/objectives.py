"""The objective of each (method, goal): the forget loss L_F and the retain loss L_R of one step, from the taps, and
what the objective calibrates once per topic on the frozen model.

Every method minimises eq. 1, L = L_F + alpha * L_R (`ref.losses.unlearning_loss`); they differ in L_F and L_R:

| method       | goal     | L_F                                          | L_R                                  |
|--------------|----------|----------------------------------------------|--------------------------------------|
| rmu          | any      | eq. 2 at the tap layer, fixed c              | eq. 3 at the tap layer               |
| adaptive-rmu | any      | eq. 2, c = beta * mean forget norm per topic | eq. 3                                |
| ours         | wmdp     | eq. 4 at the tap layer                       | eq. 5 at the tap layer               |
| ours         | toxicity | eq. 6 over the probed layers (the paper's    | eq. 5 at each probed layer, summed   |
|              |          | sum, or normalised per layer: --tox-balance) | or averaged (--tox-retain-reduction) |

Eq. 2-5 reduce each text's tokens as `Targets.token_reduction` says (the paper's sum, or the mean). An objective may
calibrate constants on a topic's first forget batch, read through the frozen model (Adaptive RMU's c, the divisors of
the scaled eq. 6): `Objective.calibrate` returns them as `Targets` fields, which the loop keeps per topic.

`fuse` is `ref.run.fused.fused` (torch.compile) or `ref.run.fused.eager` (--no-compile).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ref.io.errors import RefError
from ref.losses import (
    adaptive_steering_coefficient,
    cosine_forget_loss,
    cosine_retain_loss,
    last_token,
    normalized_probe_projection_loss,
    probe_projection_loss,
    rmu_forget_loss,
    rmu_retain_loss,
    rmu_retain_loss_per_text,
    toxicity_retain_loss,
)


@dataclass
class Activations:
    """The residual streams one step reads: layer -> [B, T, D]."""

    forget: dict[int, Tensor]  # model being updated, forget batch
    forget_mask: Tensor  # [B, T], 1 = real token
    retain: dict[int, Tensor]  # model being updated, retain batch
    frozen: dict[int, Tensor]  # the frozen original model, retain batch (h0 of eq. 3 and 5)
    retain_mask: Tensor


@dataclass(frozen=True)
class Targets:
    """The constants of one topic's objective."""

    layers: tuple[int, ...]  # the layers the objective reads: (tap,) or the probed layers
    u: Tensor  # [D] the topic's fixed random unit vector (eq. 2, 4)
    token_reduction: str  # eq. 2-5: "sum" over each text's tokens (the paper) or "mean" over real tokens
    steering: float | None = None  # RMU's c (eq. 2): fixed, or Adaptive RMU's, calibrated
    beta: float | None = None  # Adaptive RMU: c = beta * mean forget norm on the topic's first batch
    directions: Tensor | None = None  # [L, D] probe directions w_i (eq. 6); None unless ours on toxicity
    tox_balance: str | None = None  # ours on toxicity: "paper" (eq. 6 summed) or "scaled" (normalised per layer)
    forget_scale: tuple[float, ...] | None = None  # [L] eq. 6's terms on the frozen model (scaled balance), calibrated
    retain_layers: str = "sum"  # ours on toxicity: eq. 5 summed or averaged over the probed layers


class Losses(NamedTuple):
    forget: Tensor  # L_F, fp32 scalar
    retain: Tensor  # L_R, fp32 scalar
    forget_per_layer: Tensor | None = None  # [L] eq. 6's terms, one per probed layer
    retain_per_text: Tensor | None = None  # [B] eq. 3 of each retain text (RMU; logged, not trained on)


class Objective(NamedTuple):
    losses: Callable[[Activations, Targets, Callable], Losses]
    # frozen taps of a topic's first forget batch, its mask, the targets -> Targets fields to set for the topic
    calibrate: Callable[[dict[int, Tensor], Tensor, Targets], dict] | None = None


def rmu(acts: Activations, targets: Targets, fuse: Callable) -> Losses:
    """RMU and Adaptive RMU: eq. 2 (steer the forget activations to c * u) and eq. 3 (keep the retain activations
    where they were) at the tap layer. Adaptive RMU differs only in its c (`adaptive_steering`)."""
    (i,) = targets.layers
    r = targets.token_reduction
    with torch.no_grad():
        per_text = rmu_retain_loss_per_text(acts.retain[i], acts.frozen[i], acts.retain_mask, r)
    return Losses(
        fuse(rmu_forget_loss)(acts.forget[i], targets.u, targets.steering, acts.forget_mask, r),
        fuse(rmu_retain_loss)(acts.retain[i], acts.frozen[i], acts.retain_mask, r),
        retain_per_text=per_text,
    )


def adaptive_steering(frozen: dict[int, Tensor], mask: Tensor, targets: Targets) -> dict:
    """Adaptive RMU's c for a topic: beta times the mean token norm of its first forget batch at the tap layer."""
    (i,) = targets.layers
    return dict(steering=float(adaptive_steering_coefficient(frozen[i], mask, targets.beta)))


def ours_wmdp(acts: Activations, targets: Targets, fuse: Callable) -> Losses:
    """The paper's method on dangerous knowledge: eq. 4 (turn the forget activations towards u, no c) and eq. 5
    (keep the retain activations' direction) at the tap layer."""
    (i,) = targets.layers
    r = targets.token_reduction
    return Losses(
        fuse(cosine_forget_loss)(acts.forget[i], targets.u, acts.forget_mask, r),
        fuse(cosine_retain_loss)(acts.retain[i], acts.frozen[i], acts.retain_mask, r),
    )


def ours_toxicity(acts: Activations, targets: Targets, fuse: Callable) -> Losses:
    """The paper's method on toxicity: eq. 6 (the last-token state of each probed layer made orthogonal to that
    layer's probe direction; run eager, see ref.run.fused), summed over the layers as in the paper or, with
    `targets.forget_scale`, normalised per layer (ours), and eq. 5 at the same layers, summed or averaged."""
    h_last = [last_token(acts.forget[i], acts.forget_mask) for i in targets.layers]
    if targets.forget_scale is None:
        forget, per_layer = probe_projection_loss(h_last, targets.directions)
    else:
        scale = torch.tensor(targets.forget_scale, device=acts.forget_mask.device)
        forget, per_layer = normalized_probe_projection_loss(h_last, targets.directions, scale)
    h, h0 = [acts.retain[i] for i in targets.layers], [acts.frozen[i] for i in targets.layers]
    retain = toxicity_retain_loss(
        h, h0, acts.retain_mask, fuse(cosine_retain_loss), targets.token_reduction, targets.retain_layers
    )
    return Losses(forget, retain, per_layer)


def probe_projection_scale(frozen: dict[int, Tensor], mask: Tensor, targets: Targets) -> dict:
    """The divisors s_i of the scaled eq. 6 (`ref.losses.normalized_probe_projection_loss`): each probed layer's eq. 6
    term on the frozen model's taps of the topic's first forget batch. Nothing under the paper's balance."""
    if targets.tox_balance != "scaled":
        return {}
    _, per_layer = probe_projection_loss([last_token(frozen[i], mask) for i in targets.layers], targets.directions)
    bad = [i for i, s in zip(targets.layers, per_layer.tolist(), strict=True) if not (s > 0 and math.isfinite(s))]
    if bad:
        raise RefError(
            f"eq. 6 is 0 or not finite at layer(s) {bad} on the first forget batch, so it cannot be normalised: "
            "check the probes (probe_auc in run.json), or use --tox-balance paper"
        )
    return dict(forget_scale=tuple(per_layer.tolist()))


OBJECTIVES: dict[tuple[str, str], Objective] = {
    ("rmu", "wmdp"): Objective(rmu),
    ("rmu", "toxicity"): Objective(rmu),
    ("adaptive-rmu", "wmdp"): Objective(rmu, adaptive_steering),
    ("adaptive-rmu", "toxicity"): Objective(rmu, adaptive_steering),
    ("ours", "wmdp"): Objective(ours_wmdp),
    ("ours", "toxicity"): Objective(ours_toxicity, probe_projection_scale),
}


U_DISTRIBUTIONS = ("orthant", "sphere")  # the first is the default


def random_directions(
    topics: list[str], dim: int, seed: int, device: torch.device | str, distribution: str = "orthant"
) -> dict[str, Tensor]:
    """u of eq. 2 and 4: one fixed random unit vector per forget corpus, seeded by (seed, corpus index). "orthant":
    uniform in [0, 1)^D then normalised, in the positive orthant (the RMU reference's torch.rand); "sphere": a
    Gaussian normalised, uniform on the unit sphere (the paper's "random unit vector" read literally)."""
    if distribution not in U_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {U_DISTRIBUTIONS}, got {distribution!r}")
    draw = torch.rand if distribution == "orthant" else torch.randn
    out = {}
    for i, topic in enumerate(topics):
        u = draw(dim, generator=torch.Generator().manual_seed(seed * 1000 + i))
        out[topic] = (u / u.norm()).to(device)
    return out

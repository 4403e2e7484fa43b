"""The objective of each (method, goal): the forget loss L_F and the retain loss L_R of one step, from the taps.

Every method minimises eq. 1, L = L_F + alpha * L_R (`ref.losses.unlearning_loss`); they differ in L_F and L_R:

| method       | goal     | L_F                                          | L_R                                  |
|--------------|----------|----------------------------------------------|--------------------------------------|
| rmu          | any      | eq. 2 at the tap layer, fixed c              | eq. 3 at the tap layer               |
| adaptive-rmu | any      | eq. 2, c = beta * mean forget norm per topic | eq. 3                                |
| ours         | wmdp     | eq. 4 at the tap layer                       | eq. 5 at the tap layer               |
| ours         | toxicity | eq. 6 over the probed layers (the paper's    | eq. 5 averaged over the same layers  |
|              |          | sum, or normalised per layer: --tox-balance) |                                      |

`fuse` is `ref.fused.fused` (torch.compile) or `ref.fused.eager` (--no-compile).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ref.losses import (
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
    """The constants of one step's objective."""

    layers: tuple[int, ...]  # the layers the objective reads: (tap,) or the probed layers
    u: Tensor  # [D] the topic's fixed random unit vector (eq. 2, 4)
    steering: float | None  # RMU's c (eq. 2); None for ours
    directions: Tensor | None  # [L, D] probe directions w_i (eq. 6); None unless ours on toxicity
    forget_scale: Tensor | None = None  # [L] eq. 6's terms on the frozen model: normalise eq. 6 per layer; None: sum


class Losses(NamedTuple):
    forget: Tensor  # L_F, fp32 scalar
    retain: Tensor  # L_R, fp32 scalar
    forget_per_layer: Tensor | None = None  # [L] eq. 6's terms, one per probed layer
    retain_per_text: Tensor | None = None  # [B] eq. 3 of each retain text (RMU; logged, not trained on)


Objective = Callable[[Activations, Targets, Callable], Losses]


def rmu(acts: Activations, targets: Targets, fuse: Callable) -> Losses:
    """RMU and Adaptive RMU: eq. 2 (steer the forget activations to c * u) and eq. 3 (keep the retain activations
    where they were) at the tap layer. Adaptive RMU differs only in its c (set per topic, see `Targets`)."""
    (i,) = targets.layers
    with torch.no_grad():
        per_text = rmu_retain_loss_per_text(acts.retain[i], acts.frozen[i], acts.retain_mask)
    return Losses(
        fuse(rmu_forget_loss)(acts.forget[i], targets.u, targets.steering, acts.forget_mask),
        fuse(rmu_retain_loss)(acts.retain[i], acts.frozen[i], acts.retain_mask),
        retain_per_text=per_text,
    )


def ours_wmdp(acts: Activations, targets: Targets, fuse: Callable) -> Losses:
    """The paper's method on dangerous knowledge: eq. 4 (turn the forget activations towards u, no c) and eq. 5
    (keep the retain activations' direction) at the tap layer."""
    (i,) = targets.layers
    return Losses(
        fuse(cosine_forget_loss)(acts.forget[i], targets.u, acts.forget_mask),
        fuse(cosine_retain_loss)(acts.retain[i], acts.frozen[i], acts.retain_mask),
    )


def ours_toxicity(acts: Activations, targets: Targets, fuse: Callable) -> Losses:
    """The paper's method on toxicity: eq. 6 (the last-token state of each probed layer made orthogonal to that
    layer's probe direction; run eager, see ref.fused), summed over the layers as in the paper or, with
    `targets.forget_scale`, normalised per layer (ours), and eq. 5 averaged over the same layers."""
    h_last = [last_token(acts.forget[i], acts.forget_mask) for i in targets.layers]
    if targets.forget_scale is None:
        forget, per_layer = probe_projection_loss(h_last, targets.directions)
    else:
        forget, per_layer = normalized_probe_projection_loss(h_last, targets.directions, targets.forget_scale)
    h, h0 = [acts.retain[i] for i in targets.layers], [acts.frozen[i] for i in targets.layers]
    retain = toxicity_retain_loss(h, h0, acts.retain_mask, fuse(cosine_retain_loss))
    return Losses(forget, retain, per_layer)


OBJECTIVES: dict[tuple[str, str], Objective] = {
    ("rmu", "wmdp"): rmu,
    ("rmu", "toxicity"): rmu,
    ("adaptive-rmu", "wmdp"): rmu,
    ("adaptive-rmu", "toxicity"): rmu,
    ("ours", "wmdp"): ours_wmdp,
    ("ours", "toxicity"): ours_toxicity,
}


def random_directions(topics: list[str], dim: int, seed: int, device: torch.device | str) -> dict[str, Tensor]:
    """u of eq. 2 and 4: one fixed random unit vector per forget corpus, uniform in the positive orthant then
    normalised (as the RMU reference's torch.rand), seeded by (seed, corpus index)."""
    out = {}
    for i, topic in enumerate(topics):
        u = torch.rand(dim, generator=torch.Generator().manual_seed(seed * 1000 + i))
        out[topic] = (u / u.norm()).to(device)
    return out

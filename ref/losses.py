"""Unlearning losses: RMU (eq. 2-3), Adaptive RMU's coefficient, cosine (eq. 4-5), probe projection (eq. 6, and
its per-layer normalised form).

Shapes: h, h0 [B, T, D] residual streams at a tapped layer (h: model being updated, h0: frozen original);
mask [B, T] (1 / True = real token, 0 / False = padding); u [D] a fixed random unit vector.

Conventions shared by every loss here:
- Means run over real tokens only. Padding is masked out (and may hold anything, even NaN); the reference WMDP
  RMU code includes padding positions in its means, ours does not.
- Inputs are upcast to fp32 and the result is an fp32 scalar, whatever the dtype of h (bf16 on GPU).
- Targets (u, h0, probe directions) are constants: they are detached, gradients flow into h only.

Pure math: nothing here compiles or keeps state. `ref.fused` runs eq. 2-5 through torch.compile for the training
loop; eq. 6 runs eager (see there why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

COS_EPS = 1e-8  # cos = a.b / max(|a| |b|, COS_EPS), as torch.nn.functional.cosine_similarity


def _check(h: Tensor, mask: Tensor) -> None:
    if h.dim() != 3:
        raise ValueError(f"h must be [B, T, D], got shape {tuple(h.shape)}")
    if mask.shape != h.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(h.shape[:2])}, got {tuple(mask.shape)}")


def _check_vector(u: Tensor, h: Tensor) -> None:
    if u.shape != h.shape[-1:]:
        raise ValueError(f"u must be [D] = [{h.shape[-1]}], got shape {tuple(u.shape)}")


def _real(h: Tensor, mask: Tensor) -> Tensor:
    """h in fp32 with padding positions set to 0 (a select, not a product: NaN in padding cannot leak)."""
    return torch.where(mask.bool().unsqueeze(-1), h.float(), 0.0)


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of a per-token quantity x [B, T] over real tokens (0 if there are none)."""
    m = mask.bool()
    return torch.where(m, x, 0.0).sum() / m.sum().clamp_min(1)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last dim; clamping the product of squared norms keeps the gradient finite at 0."""
    dot = (a * b).sum(-1)
    return dot * torch.rsqrt(((a * a).sum(-1) * (b * b).sum(-1)).clamp_min(COS_EPS**2))


def rmu_forget_loss(h: Tensor, u: Tensor, steering: float | Tensor, mask: Tensor) -> Tensor:
    """Eq. 2 of the paper (RMU forget): mean of (h - steering * u)^2 over real tokens and the hidden dim.

    Dividing by n_real_tokens * D makes this equal to the reference's F.mse_loss when there is no padding,
    which matters: the reference's alpha (e.g. 1200 for Zephyr-7B) is tuned to that scale.
    """
    _check(h, mask)
    _check_vector(u, h)
    target = torch.as_tensor(steering, dtype=torch.float32, device=h.device) * u.detach().float()
    sq = (_real(h, mask) - target).pow(2).mean(-1)
    return _token_mean(sq, mask)


def rmu_retain_loss(h: Tensor, h0: Tensor, mask: Tensor) -> Tensor:
    """Eq. 3 of the paper (RMU retain): mean of (h - h0)^2 over real tokens and the hidden dim (as eq. 2)."""
    _check(h, mask)
    if h0.shape != h.shape:
        raise ValueError(f"h0 must have the shape of h {tuple(h.shape)}, got {tuple(h0.shape)}")
    sq = (_real(h, mask) - _real(h0.detach(), mask)).pow(2).mean(-1)
    return _token_mean(sq, mask)


def rmu_retain_loss_per_text(h: Tensor, h0: Tensor, mask: Tensor) -> Tensor:
    """Eq. 3 of each row on its own, [B] fp32 (0 for a row without real tokens): which text of a retain batch carries
    its loss (a diagnostic, logged, not trained on; their token-weighted mean is eq. 3 of the batch)."""
    _check(h, mask)
    sq = (_real(h, mask) - _real(h0.detach(), mask)).pow(2).mean(-1)
    m = mask.bool()
    return torch.where(m, sq, 0.0).sum(1) / m.sum(1).clamp_min(1)


def adaptive_steering_coefficient(h: Tensor, mask: Tensor, beta: float = 5.0) -> Tensor:
    """Adaptive RMU's steering coefficient: c = beta * (mean over real tokens of ||h_t||), fp32, 0-dim.

    Computed once (on the first forget batch); it is a constant, so the result is detached.
    """
    _check(h, mask)
    norms = torch.linalg.vector_norm(_real(h.detach(), mask), dim=-1)
    return beta * _token_mean(norms, mask)


def cosine_forget_loss(h: Tensor, u: Tensor, mask: Tensor) -> Tensor:
    """Eq. 4 of the paper (cosine forget): mean over real tokens of 1 - cos(h_t, u), in [0, 2]; no c."""
    _check(h, mask)
    _check_vector(u, h)
    return _token_mean(1.0 - _cos(_real(h, mask), u.detach().float()), mask)


def cosine_retain_loss(h: Tensor, h0: Tensor, mask: Tensor) -> Tensor:
    """Eq. 5 of the paper (cosine retain): mean over real tokens of 1 - cos(h_t, h0_t). In [0, 2]."""
    _check(h, mask)
    if h0.shape != h.shape:
        raise ValueError(f"h0 must have the shape of h {tuple(h.shape)}, got {tuple(h0.shape)}")
    return _token_mean(1.0 - _cos(_real(h, mask), _real(h0.detach(), mask)), mask)


def last_token(h: Tensor, mask: Tensor) -> Tensor:
    """h [B, T, D] at the last real token of each row -> [B, D] (same dtype as h; left or right padding)."""
    _check(h, mask)
    m = mask.bool()
    if not bool(m.any(dim=1).all()):
        raise ValueError("last_token: a row of mask has no real token; drop empty rows before the forward")
    positions = torch.arange(h.shape[1], device=h.device)
    idx = torch.where(m, positions, -1).amax(dim=1)
    return h[torch.arange(h.shape[0], device=h.device), idx]


def probe_projection_loss(h_last: Sequence[Tensor], directions: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 6 of the paper (toxicity forget): sum over layers i of mean over the batch of (h_i . w_i)^2.

    h_last: one [B, D] last-token state per probed layer (see `last_token`); directions: [L, D], row i = w_i.
    Returns (total, per_layer [L]). The loss uses the directions as given: pass `Probe.direction` (unit
    norm, the default of the paper's method) or `Probe.weight` (raw) as the caller chooses.
    """
    if directions.dim() != 2 or len(h_last) != directions.shape[0]:
        raise ValueError(
            f"directions must be [L, D] with L = len(h_last) = {len(h_last)}, got {tuple(directions.shape)}"
        )
    hs = torch.stack([x.float() for x in h_last])  # [L, B, D]
    if hs.shape[-1] != directions.shape[1]:
        raise ValueError(f"h_last has D = {hs.shape[-1]} but directions have D = {directions.shape[1]}")
    proj = torch.einsum("lbd,ld->lb", hs, directions.detach().to(device=hs.device, dtype=torch.float32))
    per_layer = proj.pow(2).mean(dim=1)
    return per_layer.sum(), per_layer


def normalized_probe_projection_loss(
    h_last: Sequence[Tensor], directions: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """Eq. 6 normalised per layer (ours, not the paper's): mean over layers i of (mean over the batch of
    (h_i . w_i)^2) / s_i, with s_i > 0 that layer's term on the frozen model (`ref.train` measures it on the first
    forget batch). It starts near 1, the scale of the cosine losses (eq. 4-5), and weighs every probed layer equally;
    the paper's sum is dominated by the late layers, whose terms are 10^2-10^3 times the early ones'.
    Returns (total, per_layer [L] of eq. 6 itself, unnormalised, for the logs)."""
    _, per_layer = probe_projection_loss(h_last, directions)
    if scale.shape != per_layer.shape:
        raise ValueError(f"scale must be [L] = [{per_layer.shape[0]}], got shape {tuple(scale.shape)}")
    return (per_layer / scale.detach().to(per_layer)).mean(), per_layer


def toxicity_retain_loss(
    h: Sequence[Tensor], h0: Sequence[Tensor], mask: Tensor, layer_loss: Callable = cosine_retain_loss
) -> Tensor:
    """The toxicity retain term of the paper's method: eq. 5 at each probed layer, averaged over the layers.

    h, h0: one [B, T, D] tap per probed layer (updated model, frozen original); `layer_loss` is eq. 5 or its fused
    version (`ref.fused`), applied layer by layer."""
    if len(h) != len(h0) or not h:
        raise ValueError(f"need one h0 per h and at least one layer, got {len(h)} and {len(h0)}")
    return torch.stack([layer_loss(a, b, mask) for a, b in zip(h, h0, strict=True)]).mean()


def unlearning_loss(forget: Tensor, retain: Tensor, alpha: float) -> Tensor:
    """Eq. 1 of the paper: L = L_F + alpha * L_R, the loss every method minimises (alpha fixed or from REINFORCE)."""
    return forget + alpha * retain

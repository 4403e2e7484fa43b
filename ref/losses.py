"""Unlearning losses: RMU (eq. 2-3), Adaptive RMU's coefficient, cosine (eq. 4-5), probe projection (eq. 6, and
its per-layer normalised form).

Shapes: h, h0 [B, T, D] residual streams at a tapped layer (h: model being updated, h0: frozen original);
mask [B, T] (1 / True = real token, 0 / False = padding); u [D] a fixed random unit vector.

Conventions shared by every loss here:
- Eq. 2-5 are written in the paper as an expectation over texts of a sum over the text's tokens, E_x [sum_t ...].
  `reduction` chooses how the tokens are reduced (`reduce_tokens`): "sum" is that, the per-text sum over real tokens
  averaged over the batch's texts; "mean" is the mean over the batch's real tokens, and for eq. 2-3 over the hidden
  units too, which is the RMU reference's F.mse_loss (its alpha of 1200 is tuned to that scale).
- Padding is masked out (and may hold anything, even NaN); the reference WMDP RMU code includes padding positions in
  its means, ours does not.
- Inputs are upcast to fp32 and the result is an fp32 scalar, whatever the dtype of h (bf16 on GPU).
- Targets (u, h0, probe directions) are constants: they are detached, gradients flow into h only.

Pure math: nothing here compiles or keeps state. `ref.run.fused` runs eq. 2-5 through torch.compile for the training
loop; eq. 6 runs eager (see there why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

COS_EPS = 1e-8  # cos = a.b / max(|a| |b|, COS_EPS), as torch.nn.functional.cosine_similarity
REDUCTIONS = ("sum", "mean")  # how eq. 2-5 reduce a text's tokens: the paper's sum, or the mean over real tokens


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


def reduce_tokens(x: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """A per-token quantity x [B, T] reduced over real tokens. "sum": the paper's E_x [sum_{t in x} ...], each text's
    sum over its real tokens, averaged over the texts that have any; "mean": the mean over all real tokens of the
    batch. 0 when there is no real token."""
    if reduction == "mean":
        return _token_mean(x, mask)
    if reduction != "sum":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    m = mask.bool()
    return torch.where(m, x, 0.0).sum() / m.any(dim=1).sum().clamp_min(1)


def _squared_distance(a: Tensor, b: Tensor, reduction: str) -> Tensor:
    """||a - b||^2 per token [B, T] (the paper's eq. 2-3) for "sum"; its mean over the hidden units for "mean"
    (F.mse_loss's scale)."""
    sq = (a - b).pow(2)
    return sq.sum(-1) if reduction == "sum" else sq.mean(-1)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last dim; clamping the product of squared norms keeps the gradient finite at 0."""
    dot = (a * b).sum(-1)
    return dot * torch.rsqrt(((a * a).sum(-1) * (b * b).sum(-1)).clamp_min(COS_EPS**2))


def rmu_forget_loss(h: Tensor, u: Tensor, steering: float | Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Eq. 2 of the paper (RMU forget): ||h_t - steering * u||^2 reduced over real tokens (`reduce_tokens`).

    "mean" (the default of rmu and adaptive-rmu) also averages over the hidden units: with no padding this equals the
    reference's F.mse_loss, whose alpha (e.g. 1200 for Zephyr-7B) is tuned to that scale. "sum" is the paper's
    E_x [sum_t ||h_t - c u||^2].
    """
    _check(h, mask)
    _check_vector(u, h)
    target = torch.as_tensor(steering, dtype=torch.float32, device=h.device) * u.detach().float()
    return reduce_tokens(_squared_distance(_real(h, mask), target, reduction), mask, reduction)


def rmu_retain_loss(h: Tensor, h0: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Eq. 3 of the paper (RMU retain): ||h_t - h0_t||^2 reduced over real tokens as eq. 2."""
    _check(h, mask)
    if h0.shape != h.shape:
        raise ValueError(f"h0 must have the shape of h {tuple(h.shape)}, got {tuple(h0.shape)}")
    return reduce_tokens(_squared_distance(_real(h, mask), _real(h0.detach(), mask), reduction), mask, reduction)


def rmu_retain_loss_per_text(h: Tensor, h0: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Eq. 3 of each row on its own, [B] fp32 (0 for a row without real tokens): which text of a retain batch carries
    its loss (a diagnostic, logged, not trained on). "mean": each text's mean over its tokens and the hidden units
    (their token-weighted mean is eq. 3 of the batch); "sum": each text's sum (their mean is eq. 3 of the batch)."""
    _check(h, mask)
    per_token = _squared_distance(_real(h, mask), _real(h0.detach(), mask), reduction)
    m = mask.bool()
    total = torch.where(m, per_token, 0.0).sum(1)
    return total if reduction == "sum" else total / m.sum(1).clamp_min(1)


def adaptive_steering_coefficient(h: Tensor, mask: Tensor, beta: float = 5.0) -> Tensor:
    """Adaptive RMU's steering coefficient: c = beta * (mean over real tokens of ||h_t||), fp32, 0-dim.

    Computed once (on the first forget batch); it is a constant, so the result is detached.
    """
    _check(h, mask)
    norms = torch.linalg.vector_norm(_real(h.detach(), mask), dim=-1)
    return beta * _token_mean(norms, mask)


def cosine_forget_loss(h: Tensor, u: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """Eq. 4 of the paper (cosine forget): E_x [sum_t (1 - cos(h_t, c u))], each term in [0, 2]. c > 0 drops out of
    the cosine, so u alone is passed. "sum" (the default) is the paper's token sum; "mean" the mean over real
    tokens, in [0, 2]."""
    _check(h, mask)
    _check_vector(u, h)
    return reduce_tokens(1.0 - _cos(_real(h, mask), u.detach().float()), mask, reduction)


def cosine_retain_loss(h: Tensor, h0: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """Eq. 5 of the paper (cosine retain): E_x [sum_t (1 - cos(h_t, h0_t))], reduced as eq. 4."""
    _check(h, mask)
    if h0.shape != h.shape:
        raise ValueError(f"h0 must have the shape of h {tuple(h.shape)}, got {tuple(h0.shape)}")
    return reduce_tokens(1.0 - _cos(_real(h, mask), _real(h0.detach(), mask)), mask, reduction)


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
    h: Sequence[Tensor],
    h0: Sequence[Tensor],
    mask: Tensor,
    layer_loss: Callable = cosine_retain_loss,
    reduction: str = "sum",
    layers: str = "sum",
) -> Tensor:
    """The toxicity retain term of the paper's method ("the same retain loss as in dangerous-knowledge unlearning"):
    eq. 5 at each probed layer, with the token `reduction`, summed over the layers as eq. 6 sums its terms
    (`layers="sum"`) or averaged over them ("mean").

    h, h0: one [B, T, D] tap per probed layer (updated model, frozen original); `layer_loss` is eq. 5 or its fused
    version (`ref.run.fused`), applied layer by layer."""
    if len(h) != len(h0) or not h:
        raise ValueError(f"need one h0 per h and at least one layer, got {len(h)} and {len(h0)}")
    if layers not in REDUCTIONS:
        raise ValueError(f"layers must be one of {REDUCTIONS}, got {layers!r}")
    per_layer = torch.stack([layer_loss(a, b, mask, reduction) for a, b in zip(h, h0, strict=True)])
    return per_layer.sum() if layers == "sum" else per_layer.mean()


def unlearning_loss(forget: Tensor, retain: Tensor, alpha: float) -> Tensor:
    """Eq. 1 of the paper: L = L_F + alpha * L_R, the loss every method minimises (alpha fixed or from REINFORCE)."""
    return forget + alpha * retain

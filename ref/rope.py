"""Rotary position embeddings: how a token's position enters attention.

Position p rotates each pair of dimensions (i, i + hd/2) of the queries and keys by the angle p * inv_freq[i], so
q . k depends on the distance between the two positions. Each layer type has its own rope parameters
(ModelConfig.rope: `rope_type` default, llama3 or yarn, `rope_theta` and the scaling keys), which give the inverse
frequencies and a cos/sin scale. Everything is computed as transformers 5.x computes it (same fp32 operations, same
order), so the results agree to the bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos, sin: [B, T, hd]. Computed in cos' dtype, returned in x's."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class Rope(nn.Module):
    """cos and sin of given positions, for one layer type's rope parameters."""

    def __init__(self, p: dict, head_dim: int, fp32: bool):
        super().__init__()
        inv_freq, self.scale = inverse_frequencies(p, head_dim)
        self.fp32 = fp32
        # fp32 on CPU even under a meta-device context; moved by .to()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, hd], built in fp32 as transformers does, then cast to dtype
        unless `fp32` (Olmo keeps them, and so the rotation, in fp32)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scale, emb.sin() * self.scale
        return (cos, sin) if self.fp32 else (cos.to(dtype), sin.to(dtype))


def inverse_frequencies(p: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (fp32, CPU) and the cos/sin scale for one layer type's rope parameters."""
    base = p["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if p["rope_type"] == "llama3":
        return _llama3_frequencies(inv_freq, p), 1.0
    if p["rope_type"] == "yarn":
        return _yarn_frequencies(p, head_dim)
    return inv_freq, 1.0


def _llama3_frequencies(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_frequencies(p: dict, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: blend interpolated and extrapolated frequencies with a linear ramp; scale cos/sin by mscale."""
    base, factor, old_len = p["rope_theta"], p["factor"], p["original_max_position_embeddings"]
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        m = lambda s, k=1.0: 1.0 if s <= 1 else 0.1 * k * math.log(s) + 1.0
        attention_factor = m(factor, mscale) / m(factor, mscale_all) if mscale and mscale_all else m(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)

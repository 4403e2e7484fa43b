"""Round-to-nearest, symmetric, group-wise weight quantization: the simplest post-training scheme.

Zhang et al. (ICLR 2025, arXiv 2410.16454) show that quantizing an unlearned model to 4 bits can bring the forgotten
knowledge back, while 8 bits is benign. This returns the dequantized values (what a quantized model computes with),
so the caller evaluates them in the same decoder, swapped in for the originals.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

from ref.errors import RefError
from ref.model import Transformer

BLOCK_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


@torch.no_grad()
def quantized_weights(model: Transformer, bits: int, group_size: int = 128) -> dict[str, Tensor]:
    """New values for every linear weight inside the blocks (q, k, v, o, gate, up, down projections), each quantized
    to `bits` bits and dequantized: name -> tensor, same shape [out, in] and dtype as the model's. Embeddings, norms,
    biases and the LM head stay as they are (not returned). The model is not modified.

    Each row is split into groups of `group_size` consecutive input columns (the last one may be shorter);
    scale = max|w| over the group / (2^(bits-1) - 1), w -> clamp(round(w / scale)) * scale, computed in fp32."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise RefError(f"bits must be a whole number in 2..16, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise RefError(f"group_size must be a whole number >= 1, got {group_size!r} (128 is the usual choice)")
    top = 2 ** (bits - 1) - 1
    return {n: _round_trip(w, top, group_size) for n, w in model.named_parameters() if BLOCK_LINEAR.fullmatch(n)}


def _round_trip(w: Tensor, top: int, group_size: int) -> Tensor:
    """w [out, in] -> dequantized [out, in], with levels -top..top times each group's scale."""
    n_out, n_in = w.shape
    pad = -n_in % group_size  # zero columns complete the last group: they change neither its max nor its values
    g = F.pad(w.float(), (0, pad)).view(n_out, -1, group_size)
    scale = g.abs().amax(-1, keepdim=True) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale keeps it zero
    q = (g / scale).round().clamp(-top, top)
    return (q * scale).view(n_out, -1)[:, :n_in].to(w.dtype)

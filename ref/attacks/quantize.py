"""Post-training weight quantization of the block linears, two formats:

- RTN: round-to-nearest, symmetric, group-wise, at any bit width: the simplest scheme;
- NF4: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv 2305.14314), the blockwise format bitsandbytes users
  deploy with: blocks of 64 consecutive values, each scaled by its absolute maximum onto 16 fixed levels.

Zhang et al. (ICLR 2025, arXiv 2410.16454) show that quantizing an unlearned model to 4 bits can bring the forgotten
knowledge back, while 8 bits is benign. These return the dequantized values (what a quantized model computes with),
so the caller evaluates them in the same decoder, swapped in for the originals.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

from ref.io.errors import RefError
from ref.model import Transformer

BLOCK_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")

# The 16 NF4 levels, ascending: QLoRA's appendix E, and the table bitsandbytes ships (bitsandbytes/functional.py,
# get_4bit_type("nf4"); bitsandbytes/backends/utils.py, _NF4_QUANT_TABLE). Quantiles of N(0, 1) scaled to [-1, 1],
# with an exact 0 and 8 positive / 7 negative levels.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_BLOCK = 64  # values per absmax scale: QLoRA's and bitsandbytes' default blocksize


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


@torch.no_grad()
def nf4_weights(model: Transformer, block_size: int = NF4_BLOCK) -> dict[str, Tensor]:
    """New values for every linear weight inside the blocks, each NF4-quantized and dequantized: name -> tensor, same
    shape and dtype as the model's (bitsandbytes' quantize_4bit with quant_type "nf4" and no double quantization of
    the scales). The rest of the model stays as it is; the model is not modified.

    The weight is flattened row-major and cut into blocks of `block_size` consecutive values (the last one padded
    with zeros); each block's scale is its max |w| (fp32), each value w / scale goes to the nearest of NF4_LEVELS,
    and comes back as level * scale."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise RefError(f"block_size must be a whole number >= 1, got {block_size!r} (64 is NF4's usual choice)")
    return {n: _nf4_round_trip(w, block_size) for n, w in model.named_parameters() if BLOCK_LINEAR.fullmatch(n)}


def _nf4_round_trip(w: Tensor, block_size: int) -> Tensor:
    flat = w.float().reshape(-1)
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    scale = blocks.abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: level 0 either way
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    nearest = torch.bucketize(blocks / scale, (levels[1:] + levels[:-1]) / 2)  # below a midpoint: the lower level
    return (levels[nearest] * scale).view(-1)[: flat.numel()].view(w.shape).to(w.dtype)

"""Checks shared by the tiny-model and the real-model golden tests."""

from __future__ import annotations

import torch

from ref.model import KVCache


@torch.no_grad()
def cached_and_recomputed_logits(model, ids, mask, new) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits while decoding `new` [B, N] token by token with the KV cache, and the same N + 1
    positions from one full forward over prompt + new tokens."""
    cache = KVCache()
    steps = [model(ids, mask, cache=cache).logits[:, -1]]
    for t in range(new.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        steps.append(model(new[:, t : t + 1], mask, cache=cache).logits[:, -1])
    full = model(torch.cat([ids, new], 1), mask).logits[:, -new.shape[1] - 1 :]
    return torch.stack(steps, 1), full

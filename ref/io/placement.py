"""Where each block of the model lives: one device, or contiguous runs of blocks over several devices.

    --device cuda:0                  everything on one device
    --device cuda:0,cuda:1,cuda:2    blocks split into 3 contiguous runs of about equal bytes
    --device auto                    every visible GPU, runs sized by each one's free memory (cpu without a GPU)

The embedding lives with the first block, the final norm and the LM head with the last (with the first when the
LM head is the embedding). The forward moves the
residual stream when it crosses from one device to the next (ref.model) and returns taps and logits on the first
device, so the losses, the probes and the sampling see one device, as with a single one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ref.config import ModelConfig
from ref.io.errors import RefError
from ref.run.memory import layer_params


@dataclass(frozen=True)
class Placement:
    runs: tuple[tuple[torch.device, int, int], ...]  # (device, first block, last block), in block order
    tied: bool = False  # the LM head is the embedding: it and the final norm stay on the first device

    @property
    def blocks(self) -> tuple[torch.device, ...]:
        """The device of block i."""
        return tuple(d for d, a, b in self.runs for _ in range(a, b + 1))

    @property
    def first(self) -> torch.device:
        return self.runs[0][0]

    @property
    def head(self) -> torch.device:
        """The device of the final norm and the LM head."""
        return self.first if self.tied else self.runs[-1][0]

    def of(self, name: str) -> torch.device:
        """The device of a tensor, by its name (model.layers.{i}.*, embedding, final norm, LM head)."""
        if name.startswith("model.layers."):
            return self.blocks[int(name.split(".")[2])]
        return self.head if name.startswith(("model.norm.", "lm_head.")) else self.first

    def describe(self) -> str:
        """'cuda:0 blocks 0..39 (+ embedding), cuda:1 blocks 40..79 (+ norm, LM head)'; one run: the device."""
        if len(self.runs) == 1:
            return str(self.first)
        parts = [f"{d} blocks {a}..{b}" for d, a, b in self.runs]
        parts[0] += " (+ embedding, tied LM head, norm)" if self.tied else " (+ embedding)"
        parts[-1] += "" if self.tied else " (+ norm, LM head)"
        return ", ".join(parts)


def parse_devices(spec: str | None) -> list[torch.device] | None:
    """'cuda:0,cuda:1' -> [cuda:0, cuda:1]; None -> None (the default device); 'auto' -> every visible GPU, else
    the cpu."""
    if spec is None:
        return None
    if spec == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(n)] or [torch.device("cpu")]
    return [torch.device(s.strip()) for s in spec.split(",")]


def free_bytes(devices: list[torch.device]) -> list[float] | None:
    """Free memory of each CUDA device (for `auto`); None (equal shares) when any is not a CUDA device."""
    if not all(d.type == "cuda" for d in devices):
        return None
    return [float(torch.cuda.mem_get_info(d)[0]) for d in devices]


def split_blocks(cfg: ModelConfig, devices: list[torch.device], capacity: list[float] | None = None) -> Placement:
    """Contiguous runs of blocks, one per device, sized so each device's share of the weights (blocks, plus the
    embedding on the first and the norm and LM head on the last) follows `capacity` (default: equal shares)."""
    n, k = cfg.num_layers, len(devices)
    if k > n:
        raise RefError(f"--device names {k} devices for a {n}-block model: name at most {n}")
    capacity = capacity or [1.0] * k
    block = float(_block_params(cfg))
    embed = float(cfg.vocab_size * cfg.hidden_size)
    head = 0.0 if cfg.tie_word_embeddings else embed
    total = n * block + embed + head
    bounds = [total * sum(capacity[: j + 1]) / sum(capacity) for j in range(k)]  # cumulative share of device j
    runs, used, j, start = [], embed, 0, 0
    for i in range(n):
        must_move = n - i <= k - 1 - j  # as many blocks left as later devices: one each
        if j < k - 1 and i > start and (used + block / 2 > bounds[j] or must_move):
            runs.append((devices[j], start, i - 1))
            j, start = j + 1, i
        used += block
    runs.append((devices[j], start, n - 1))
    return Placement(tuple(runs), cfg.tie_word_embeddings)


def placement(cfg: ModelConfig, spec: str | None, default: torch.device) -> Placement:
    """The placement of `--device spec` (None: everything on `default`)."""
    devices = parse_devices(spec) or [default]
    capacity = free_bytes(devices) if spec == "auto" else None
    return split_blocks(cfg, devices, capacity)


def _block_params(cfg: ModelConfig) -> int:
    return sum(layer_params(cfg).values())

"""LoRA (Hu et al. 2021) on the block linears, without replacing modules and without hooks.

Each target weight W [out, in] becomes W + s B A, s = alpha / r, with A [r, in] random and B [out, r] = 0, so the
adapted model starts equal to the model. Only A and B train.

How: the model runs through torch.func.functional_call (as the frozen model in ref/train.py), with each target weight
replaced by a LowRankWeight: W itself, carrying A, B and s. nn.Linear calls F.linear(x, W, bias), and on a
LowRankWeight that computes x W^T + bias + s (x A^T) B^T: the low-rank path, never the [out, in] matrix W + s B A.
Memory beyond the model: A and B, their copies in the model's dtype, and one [tokens, r] activation per target.
At 7B (32 layers, hidden 4096, 8 of 32 kv heads, intermediate 14336) with r = 128: 336M adapter parameters, 1.3 GB
in fp32 (5.4 GB with gradients and AdamW moments) plus 0.7 GB of bf16 copies, instead of the second 7B copy (14 GB
in bf16) that merged weights would keep for the backward. `merged()` gives W + s B A, to evaluate the adapted model
as plain weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ref.io.errors import RefError
from ref.model import Transformer

TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class LowRankWeight(Tensor):
    """A frozen weight W [out, in] that F.linear multiplies as x W^T + s (x A^T) B^T, with A [r, in], B [out, r].

    Every other operation sees plain W (functional_call and nn.Linear call none)."""

    a: Tensor
    b: Tensor
    scale: float

    @staticmethod
    def of(w: Tensor, a: Tensor, b: Tensor, scale: float) -> LowRankWeight:
        t = w.detach().as_subclass(LowRankWeight)
        t.a, t.b, t.scale = a, b, scale
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():  # inside, W is a plain tensor
            if func is F.linear:
                x, w = args[0], args[1]
                y = func(*args, **(kwargs or {}))
                # in the model's dtype, like the base path; A and B (fp32) get their gradients through the cast
                return y + w.scale * F.linear(F.linear(x, w.a.to(x.dtype)), w.b.to(x.dtype))
            return func(*args, **(kwargs or {}))


class LoRA(nn.Module):
    """Trainable A [r, in] and B [out, r] (fp32) for each target linear of every block of `model`.

    `targets` are module names inside a block. A is drawn as nn.Linear and peft draw it (Kaiming-uniform with
    a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) from a generator seeded with `seed`; B is zero. The model is not
    changed, nor registered as a submodule: `parameters()` are A and B only, and no gradient reaches the model."""

    def __init__(
        self,
        model: Transformer,
        r: int = 128,
        alpha: float = 16.0,
        targets: tuple[str, ...] = TARGETS,
        seed: int = 0,
    ):
        super().__init__()
        if r < 1:
            raise RefError(f"LoRA rank r is {r}; use r >= 1")
        if not alpha > 0:
            raise RefError(f"LoRA alpha is {alpha}; use alpha > 0")
        if not targets:
            raise RefError("LoRA got no targets; name linears inside a block, such as 'mlp.down_proj'")
        object.__setattr__(self, "model", model)  # a plain attribute: the model's parameters are not the adapter's
        named = dict(model.named_parameters())
        self.names = [f"model.layers.{i}.{t}.weight" for i in range(model.config.num_layers) for t in targets]
        for name in self.names:
            if name not in named or named[name].ndim != 2:
                raise RefError(
                    f"LoRA target {name} is not a linear weight of the model; targets are linears "
                    f"inside a block, such as {', '.join(TARGETS)}"
                )
        self.scale = alpha / r
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.ParameterList(), nn.ParameterList()
        for name in self.names:
            w = named[name]
            out_features, in_features = w.shape
            a = (torch.rand(r, in_features, generator=g) * 2 - 1) / math.sqrt(in_features)
            self.a.append(nn.Parameter(a.to(w.device)))
            self.b.append(nn.Parameter(torch.zeros(out_features, r, device=w.device)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits [B, T, vocab] of the adapted model for input_ids [B, T] and attention_mask [B, T] (1 = real)."""
        # detached: the model's own parameters get no gradient, whatever their requires_grad
        values = {name: p.detach() for name, p in self.model.named_parameters()}
        for name, a, b in zip(self.names, self.a, self.b, strict=True):
            values[name] = LowRankWeight.of(values[name], a, b, self.scale)
        return functional_call(self.model, values, args=(input_ids, attention_mask)).logits

    @torch.no_grad()
    def merged(self) -> dict[str, Tensor]:
        """name -> W + s B A [out, in], computed in fp32 and returned in W's dtype, for every target weight."""
        named = dict(self.model.named_parameters())
        return {
            name: (named[name].float() + self.scale * (b @ a)).to(named[name].dtype)
            for name, a, b in zip(self.names, self.a, self.b, strict=True)
        }

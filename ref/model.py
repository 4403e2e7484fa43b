"""One decoder for Llama, Mistral, Qwen2 and Olmo3, with activation taps and a KV cache.

Parameter names are exactly the Hugging Face ones (`model.layers.7.mlp.down_proj.weight`), so checkpoints load
by name and the unlearning code selects tensors by name. Family differences are flags in ModelConfig.

Taps: `taps[i]` is the residual stream after block i (transformers' `hidden_states[i + 1]`). With `stop_after=k`
no block above k runs, and neither the final norm nor the LM head.

Placement: each block runs on the device of its weights (ref.io.placement splits blocks over devices); the residual
stream moves at the boundaries and taps and logits come back on the device of the input. A model loaded with
only its first blocks (ref.io.checkpoint) holds the others on the meta device; running one is a clear error.

Positions: by default position ids count real tokens only (cumsum of the attention mask), as transformers'
`generate` does, so a left-padded row gives the same values as the same row unpadded. ref/rope.py turns them into
the rotation of queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.config import ModelConfig
from ref.io.errors import RefError
from ref.rope import Rope, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_fp32: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.weight_fp32 = eps, weight_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_fp32:  # Olmo: multiply in fp32, then cast
            return (self.weight * h).to(x.dtype)
        return self.weight * h.to(x.dtype)  # Llama/Mistral/Qwen2: cast, then multiply


@dataclass
class KVCache:
    """Keys and values of every layer so far: layer -> ([B, Hkv, S, hd], [B, Hkv, S, hd])."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.layers:
            k = torch.cat([self.layers[layer][0], k], dim=2)
            v = torch.cat([self.layers[layer][1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v

    @property
    def length(self) -> int:
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # over the whole projection, before the head split (Olmo3)
            self.q_norm = RMSNorm(cfg.num_heads * cfg.head_dim, cfg.rms_norm_eps, cfg.norm_weight_fp32)
            self.k_norm = RMSNorm(cfg.num_kv_heads * cfg.head_dim, cfg.rms_norm_eps, cfg.norm_weight_fp32)

    def forward(self, x, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        gqa = self.n_kv != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: one [B, T, intermediate] buffer fewer to allocate and fault in (~7% of a CPU forward)
        return self.down_proj(F.silu(self.gate_proj(x)).mul_(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post_norm, self.layer_type = cfg.post_norm, cfg.layer_types[layer]
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        if cfg.post_norm:  # Olmo3: norms on the sublayer outputs
            self.post_attention_layernorm, self.post_feedforward_layernorm = norm(), norm()
        else:  # pre-norm; HF calls the MLP's input norm "post_attention_layernorm"
            self.input_layernorm, self.post_attention_layernorm = norm(), norm()

    def forward(self, x, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        if self.post_norm:
            h = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, cache))
            return h + self.post_feedforward_layernorm(self.mlp(h))
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


@dataclass
class Output:
    logits: torch.Tensor | None  # [B, T, vocab]; None when the forward stopped early
    taps: dict[int, torch.Tensor]  # layer -> residual stream after that block, [B, T, D]


def attention_mask_4d(pad_mask: torch.Tensor, q_len: int, window: int | None) -> torch.Tensor | None:
    """Boolean [B, 1, T, S] mask (True = may attend) for the last q_len queries over S keys.

    Causal, plus the sliding window (query i sees keys j with i - W < j <= i, in index space as transformers), plus
    padding. A padded query may see itself, so no row is all False (its output is never used).
    None when the mask is plain causal (no cache, no padding, window not shorter than S): attention then runs with
    is_causal, the fast path transformers also takes."""
    S = pad_mask.shape[1]
    if q_len == S and (window is None or window >= S) and bool(pad_mask.all()):
        return None
    k_idx = torch.arange(S, device=pad_mask.device)
    q_idx = k_idx[S - q_len :, None]
    allowed = k_idx[None, :] <= q_idx
    if window is not None:
        allowed = allowed & (k_idx[None, :] > q_idx - window)
    allowed = allowed[None] & (pad_mask[:, None, :].bool() | (k_idx[None, :] == q_idx)[None])
    return allowed[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(
            dict(
                # given an empty weight: nn.Embedding's random init on the meta device imports torch._dynamo (~1 s)
                embed_tokens=nn.Embedding(
                    cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
                ),
                layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers)),
                norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32),
            )
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = nn.ModuleDict({t: Rope(p, cfg.head_dim, cfg.rope_fp32) for t, p in cfg.rope.items()})

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        taps: tuple[int, ...] | list[int] = (),
        stop_after: int | None = None,
        *,
        start_layer: int = 0,
        hidden: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Output:
        """Run blocks start_layer..stop_after (default: all, then norm and LM head).

        input_ids [B, T]; attention_mask [B, S] with S = cache length + T (1 = real token), default all ones.
        To resume from a prefix computed earlier, pass `hidden` (the residual stream entering block start_layer,
        i.e. tap start_layer - 1; at start_layer 0, input embeddings such as a soft prompt's) instead of input_ids."""
        n = self.config.num_layers
        last = n - 1 if stop_after is None else stop_after
        if not 0 <= last < n or not 0 <= start_layer <= last:
            raise RefError(f"layers run {start_layer}..{last} are out of range for a {n}-layer model")
        bad = [i for i in taps if not start_layer <= i <= last]
        if bad:
            raise RefError(f"tap layers {bad} are outside the layers run ({start_layer}..{last}, model has {n})")
        if (hidden is None) == (input_ids is None) or (hidden is None and start_layer > 0):
            raise RefError("pass input_ids to start at layer 0, or hidden: the residual stream entering start_layer")
        x = self.model.embed_tokens(input_ids) if hidden is None else hidden
        B, T = x.shape[:2]
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        rope = {t: r(position_ids, x.dtype) for t, r in self.rope.items()}  # layer type -> (cos, sin)
        masks = {
            t: attention_mask_4d(attention_mask, T, self.config.sliding_window if t != "full_attention" else None)
            for t in rope
        }
        first, on = x.device, {}  # device -> rope and masks there
        out = {}
        for i in range(start_layer, last + 1):
            block = self.model.layers[i]
            dev = loaded_device(block, f"block {i}")
            if dev not in on:
                on[dev] = (
                    {t: (c.to(dev), s.to(dev)) for t, (c, s) in rope.items()},
                    {t: m if m is None else m.to(dev) for t, m in masks.items()},
                )
            x = block(x.to(dev), *on[dev][0][block.layer_type], on[dev][1][block.layer_type], cache)
            if i in taps:
                out[i] = x.to(first)
        if stop_after is not None:
            return Output(None, out)
        x = x.to(loaded_device(self.lm_head, "the LM head"))
        return Output(self.lm_head(self.model.norm(x)).to(first), out)


def loaded_device(module: nn.Module, what: str) -> torch.device:
    """The device of a module's weights; a clear error for a part that a subset load left unread (meta)."""
    device = next(module.parameters()).device
    if device.type == "meta":
        raise RefError(
            f"{what} is not loaded: the model was loaded with only its first blocks (load_model(..., blocks=k)); "
            "read the rest with ref.io.checkpoint.load_rest(model)"
        )
    return device

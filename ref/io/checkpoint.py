"""Checkpoints: resolve a name to a local folder, load safetensors shards into the decoder, save a modified copy.

Loading builds the model on the meta device (no random weights), then assigns each tensor read from the
memory-mapped shards, cast once to the requested dtype and placed on the requested device, so peak memory stays
close to one copy of the model. Source files are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ref.config import DTYPES
from ref.io.config_json import read_config
from ref.io.errors import DiskFull, RefError, disk_full
from ref.io.placement import Placement, placement
from ref.io.registry import REGISTRY, local_model_dir
from ref.model import Transformer

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


def model_identity(folder: Path) -> dict:
    """What tells one model's files from another's without reading the weights: the folder (symlinks resolved: a hub
    snapshot's path holds its revision), the sha256 of config.json, and each shard's size and modification time."""
    shards = sorted(set(shard_files(folder).values()))
    return dict(
        folder=os.path.realpath(folder),
        config_sha256=hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        shards={p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in shards},
    )


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise RefError(f"{path} is not a readable safetensors file ({e}); delete it and re-download") from e


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    blocks: int | None = None,
) -> Transformer:
    """Load a checkpoint into the decoder. dtype defaults to fp32 on CPU, bf16 on GPU. `device`: one device, a
    comma-separated list or "auto" (ref.io.placement: contiguous blocks per device). `blocks=k` reads only the embedding
    and blocks 0..k-1 (what a training forward that stops at tap k-1 runs); the rest stays on the meta device until
    `load_rest(model)` reads it."""
    folder = resolve(name_or_path)
    cfg = read_config(folder)
    default = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where_to = placement(cfg, str(device) if device is not None else None, default)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RefError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.float32 if where_to.first.type == "cpu" else torch.bfloat16)
    if blocks is not None and not 1 <= blocks <= cfg.num_layers:
        raise RefError(f"blocks={blocks}: load between 1 and {cfg.num_layers} blocks of this model")
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
    check_shapes(where, expected)  # every tensor, the ones a subset load leaves for later too
    model.source_dir, model.placement, model.load_dtype = folder, where_to, dtype  # what load_rest and save_model need
    wanted = {k: v for k, v in expected.items() if blocks is None or _in_first_blocks(k, blocks)}
    model.load_state_dict(_read(where, wanted, dtype, where_to), strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope.to(where_to.first)  # the rope buffers, built on the CPU
    return model.eval().requires_grad_(False)


def _in_first_blocks(name: str, k: int) -> bool:
    """The tensors a forward that stops after block k - 1 reads: the embedding and blocks 0..k-1."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) < k
    return name.startswith("model.embed_tokens.")


def load_rest(model: Transformer) -> Transformer:
    """Read the tensors a subset load left on the meta device (the blocks above it, the final norm, the LM head),
    from the same checkpoint, in the same dtype and placement. Tensors already loaded (trained ones too) stay."""
    missing = {k: p for k, p in model.named_parameters() if p.is_meta}
    if missing:
        state = _read(shard_files(model.source_dir), missing, model.load_dtype, model.placement)
        model.load_state_dict(state, strict=False, assign=True)  # assign keeps requires_grad (False) of the meta ones
    return model


def check_shapes(where: dict[str, Path], expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor (name -> a tensor of the shape config.json implies) has that shape in its shard's
    header. Reads the headers only, so a mismatch anywhere is found before any weights are read."""
    for shard in sorted(set(where[k] for k in expected)):
        with _open(shard) as f:
            for name in f.keys():
                if name not in expected:
                    continue
                shape = list(f.get_slice(name).get_shape())
                if shape != list(expected[name].shape):
                    raise RefError(
                        f"{shard.name}: tensor {name} has shape {shape} but config.json implies "
                        f"{list(expected[name].shape)}: config and weights do not belong together"
                    )


def _read(where: dict[str, Path], wanted: dict[str, torch.Tensor], dtype: torch.dtype, to: Placement) -> dict:
    """The `wanted` tensors (name -> a tensor of the shape `check_shapes` checked) read from their shards, cast and
    placed."""
    state = {}
    for shard in sorted(set(where[k] for k in wanted)):
        with _open(shard) as f:
            for name in f.keys():
                if name in wanted:
                    state[name] = f.get_tensor(name).to(device=to.of(name), dtype=dtype)
    return state


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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or Ctrl-C leaves no half-written folder behind
        if disk_full(e):
            raise DiskFull(out) from e
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
        if names & set(replaced):
            _patch_shard(shard, tmp / shard.name, {k: replaced[k] for k in names & set(replaced)})
        else:
            _link_or_copy(shard, tmp / shard.name)


def _patch_shard(src: Path, dst: Path, replaced: dict[str, torch.Tensor]) -> None:
    """Copy a shard and overwrite the bytes of the replaced tensors in place: same names, shapes and dtypes (values
    cast to the stored dtype), so the header and every offset stay as they were. The copy streams: the shard is
    never held in memory (a single-file checkpoint is the whole model)."""
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as out:
        for name, value in replaced.items():
            entry = header[name]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            if list(value.shape) != entry["shape"]:
                raise RefError(f"cannot save {name}: shape {list(value.shape)}, the checkpoint's {entry['shape']}")
            data = value.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy()
            start, end = entry["data_offsets"]
            if data.nbytes != end - start:
                raise RefError(f"cannot save {name}: {data.nbytes} bytes for a {end - start}-byte slot in {src.name}")
            out.seek(8 + n + start)
            out.write(data.tobytes())


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)

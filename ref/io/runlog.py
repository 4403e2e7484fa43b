"""The run folder: atomic writes, the jsonl metrics log, checkpoints for --resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ref.experiments.claim import CLAIM_FILES
from ref.io.errors import DiskFull, RefError, disk_full

# What a run folder holds; --overwrite replaces a folder only when it holds nothing else. ".NAME.tmp" files and
# "model.tmp" are the temporary forms of these (left by a crash).
RUN_FILES = {
    "run.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "updated.safetensors",
    "probes.safetensors",
    "summary.md",
    "report.json",
    "samples.jsonl",
    "model",
    "figures",
}
# What a run cut before it wrote its run.json can have left (the probes are fitted first): ref.sweep starts such a
# point again.
CUT_START = {"probes.safetensors", ".probes.safetensors.tmp"}


def ours(name: str) -> bool:
    """A name a run folder holds: one of RUN_FILES or the temporary form of one."""
    bare = name[1:-4] if name.startswith(".") and name.endswith(".tmp") else name.removesuffix(".tmp")
    return bare in RUN_FILES


def _write_replace(path: Path, write) -> None:
    """write(f) into a temporary file beside `path`, fsync, then rename: a crash leaves the old file or the new one,
    and a failure leaves no temporary file behind (a full disk is DiskFull, naming `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise DiskFull(path) from e
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _write_replace(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_torch_save(path: Path, obj) -> None:
    _write_replace(path, lambda f: torch.save(obj, f))


def read_run_json(out: Path) -> dict:
    """run.json of a run folder, or a one-line error that says what to do."""
    path = out / "run.json"
    if not path.is_file():
        raise RefError(f"{out} has no run.json: it is not a complete ref.unlearn run folder; choose another --out")
    try:
        run = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise RefError(f"{path} is damaged (not JSON); the run cannot be continued: use another --out") from None
    if not isinstance(run, dict) or not {"settings", "versions"} <= set(run):
        raise RefError(f"{path} is not the run.json of a ref.unlearn run; choose another --out")
    return run


def holds_files(out: Path) -> bool:
    """`out` is a folder holding something besides a sweep's claim on it (ref.experiments.claim)."""
    return out.is_dir() and any(p.name not in CLAIM_FILES for p in out.iterdir())


def check_replaceable(out: Path) -> None:
    """--overwrite replaces `out` only when it is a run folder of ours holding nothing else (a sweep's claim on it
    stays)."""
    read_run_json(out)
    foreign = sorted(p.name for p in out.iterdir() if not ours(p.name) and p.name not in CLAIM_FILES)
    if foreign:
        raise RefError(
            f"--overwrite refuses {out}: it holds files ref.unlearn did not write "
            f"({', '.join(foreign[:5])}); move them or choose another --out"
        )


def clear_run_folder(out: Path) -> None:
    """Remove what a run wrote in `out` (RUN_FILES and their temporary forms), nothing else; `out` stays."""
    for p in out.iterdir():
        if ours(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl -> rows. A cut final line (a run still writing it) is dropped; a bad line elsewhere is an error."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RefError(f"{path} line {i + 1} is not JSON: the metrics log is damaged") from None
    return rows


class MetricsLog:
    """metrics.jsonl, one JSON object per step. On resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until_step: int = 0):
        self.path = path
        rows = read_metrics(path) if path.exists() else []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= keep_until_step))

    def append(self, row: dict) -> None:
        """One line; a full disk may leave it cut, which `read_metrics` drops on resume."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        except OSError as e:
            if disk_full(e):
                raise DiskFull(self.path) from e
            raise

    def rows(self) -> list[dict]:
        return read_metrics(self.path)

"""The run folder: atomic writes, the jsonl metrics log, checkpoints for --resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ref.errors import RefError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_torch_save(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless told to resume or overwrite."""
    if resume and overwrite:
        raise RefError("--resume and --overwrite contradict each other: pick one")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise RefError(f"output folder {out} already exists: pass --resume to continue it or --overwrite")
    elif resume:
        raise RefError(f"nothing to resume in {out}: run without --resume")
    out.mkdir(parents=True, exist_ok=True)


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
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def rows(self) -> list[dict]:
        return read_metrics(self.path)

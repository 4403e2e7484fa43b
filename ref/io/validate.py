"""Checks of command-line values, run before anything is loaded, created, moved or deleted.

Each failure is one RefError line that names the option, the value and what is accepted. None always means "not
given" (the caller's default applies) and is never checked here; 0 is a value like any other.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ref.config import DTYPES
from ref.io.errors import RefError


def number(
    option: str,
    value: float | int | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """value is finite (an int when `integer`) and within [low, high] (or (low, high] with low_open)."""
    if value is None:
        return
    kind = "a whole number" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        accepted = " and ".join(x for x in (lo, hi) if x) or "finite"
        raise RefError(f"{option} is {value}; use {kind} {accepted}")


def positive(option: str, value: float | int | None, integer: bool = False) -> None:
    number(option, value, low=0, low_open=True, integer=integer)


def device(option: str, value: str | None) -> None:
    """cpu, cuda, cuda:N or mps, one this torch build and machine have; or a comma-separated list of them (blocks
    split over the devices, ref.io.placement), or auto."""
    if value is None or value == "auto":
        return
    names = [s.strip() for s in value.split(",")]
    if len(names) > 1 and len(set(names)) < len(names) and any(n != "cpu" for n in names):
        raise RefError(f"{option} is {value!r}: a device is named twice; name each GPU once (cuda:0,cuda:1,...)")
    for name in names:
        _one_device(option, value, name)


def _one_device(option: str, value: str, name: str) -> None:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RefError(f"{option} is {value!r}; use cpu, cuda, cuda:N, mps, a comma-separated list or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
            raise RefError(f"{option} is {value!r} but {build}; use --device cpu or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RefError(f"{option} is {value!r} but there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise RefError(f"{option} is {value!r} but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise RefError(f"{option} is {value!r}; use cpu, cuda, cuda:N, mps, a comma-separated list or auto")


def dtype(option: str, value: str | None) -> None:
    if value is not None and value not in DTYPES:
        raise RefError(f"{option} is {value!r}; use one of {', '.join(DTYPES)}")


def writable_folder(option: str, path: Path, need_bytes: int = 0) -> None:
    """`path` is a folder or can become one (no file in the way), a file can be written there, and its disk has
    `need_bytes` free. Creates nothing that stays: the check writes and removes one temporary file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RefError(f"{option} {path} is a file, not a folder; choose another path")
    _writable_place(option, path, path, need_bytes)


def writable_file(option: str, path: Path) -> None:
    """`path` names a file that can be written (not a folder; its folder exists or can be made, and is writable)."""
    path = Path(path)
    if path.is_dir():
        raise RefError(f"{option} {path} is a folder; give a file name, e.g. {path / 'report.json'}")
    _writable_place(option, path, path.parent)


def _writable_place(option: str, path: Path, folder: Path, need_bytes: int = 0) -> None:
    """`folder` (where `path` goes) exists or can be made, is writable and has `need_bytes` free."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise RefError(f"{option} {path}: {existing} is a file, so no folder can be made there; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ref-write-check-"):
            pass
    except OSError as e:
        raise RefError(f"{option} {path}: cannot write in {existing} ({e.strerror}); choose a writable place") from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise RefError(
            f"{option} {path}: {free / 2**20:.0f} MiB free on its disk, the run needs about "
            f"{need_bytes / 2**20:.0f} MiB; free some space or choose another disk"
        )


def same_or_inside(a: Path, b: Path) -> bool:
    """a is b or lies inside b (both resolved, symlinks followed)."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or b in a.parents

"""ref.io.validate: the checks every command runs on its values before touching anything."""

from __future__ import annotations

import pytest

from ref.io import validate
from ref.io.errors import RefError


def fails(match, fn, *args, **kw):
    with pytest.raises(RefError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)


def test_numbers():
    validate.number("--x", None, low=1)  # not given: nothing to check
    validate.positive("--lr", 1e-5)
    validate.number("--alpha", 0.0, low=0)  # 0 is a value
    fails(r"--lr is 0; use a number > 0", validate.positive, "--lr", 0)
    fails(r"--lr is -1.0; use a number > 0", validate.positive, "--lr", -1.0)
    fails(r"--lr is nan; use a number > 0", validate.positive, "--lr", float("nan"))
    fails(r"--lr is inf", validate.positive, "--lr", float("inf"))
    fails(r"--seed is -1; use a whole number >= 0", validate.number, "--seed", -1, low=0, integer=True)
    fails(r"--top-p is 1.5; use a number > 0 and <= 1", validate.number, "--top-p", 1.5, low=0, high=1, low_open=True)
    fails(r"--n is 2.5; use a whole number", validate.positive, "--n", 2.5, integer=True)


def test_device_and_dtype():
    validate.device("--device", "cpu")
    validate.device("--device", None)
    fails(
        r"--device is 'gpu0'; use cpu, cuda, cuda:N, mps, a comma-separated list or auto",
        validate.device,
        "--device",
        "gpu0",
    )
    fails(r"--device is 'tpu'", validate.device, "--device", "tpu")
    if not __import__("torch").cuda.is_available():
        fails(r"--device is 'cuda' but (this torch is a CPU build|no CUDA device)", validate.device, "--device", "cuda")
    validate.dtype("--dtype", "bfloat16")
    fails(r"--dtype is 'fp8'; use one of float32, float16, bfloat16", validate.dtype, "--dtype", "fp8")


def test_output_paths(tmp_path, monkeypatch):
    validate.writable_folder("--out", tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # the check creates nothing
    (tmp_path / "file").write_text("x")
    fails(r"--out .*file is a file, not a folder", validate.writable_folder, "--out", tmp_path / "file")
    fails(r"is a file, so no folder can be made there", validate.writable_folder, "--out", tmp_path / "file" / "run")
    fails(r"--out .* is a folder; give a file name", validate.writable_file, "--out", tmp_path)
    validate.writable_file("--out", tmp_path / "sub" / "report.json")
    fails(r"MiB free on its disk, the run needs about", validate.writable_folder, "--out", tmp_path, 2**60)

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(validate.tempfile, "NamedTemporaryFile", read_only)
    fails(r"cannot write in .* \(Permission denied\)", validate.writable_folder, "--out", tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_same_or_inside(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert validate.same_or_inside(tmp_path / "a" / "b", tmp_path / "a")
    assert validate.same_or_inside(tmp_path / "a", tmp_path / "a" / ".." / "a")
    assert not validate.same_or_inside(tmp_path / "a", tmp_path / "a" / "b")
    assert not validate.same_or_inside(tmp_path / "ab", tmp_path / "a")

"""ref.experiments.launch: local workers giving the sequential sweep's figures bit for bit, a worker killed mid-point
and its point resumed (its claim taken over), a live claim left alone, submitit's local executor running the SLURM
launcher's code path end to end, and the launcher options checked (tiny model, tiny data)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ref.unlearn as U
from ref.experiments import claim, launch, sweep
from ref.experiments.launch import Launcher
from ref.io.errors import RefError
from tests.test_sweep import tiny_argv
from tests.test_unlearn import data_dir  # noqa: F401 (the tiny data folder fixture)

TIMING = {"train_s", "eval_s"}  # the measures that are times, not figures


# --------------------------------------------------------------------------------------------------- the grid, 3 ways


def base(tiny_dirs, data_dir):  # noqa: F811
    return U.Settings(
        model=str(tiny_dirs["llama"]),
        goal="wmdp",
        data=str(data_dir),
        max_len=24,
        epochs=2,
        compile=False,
        save_every=1,
        eval_limit=2,
    )


@pytest.fixture(scope="module")
def sequential(tiny_dirs, data_dir, tmp_path_factory):  # noqa: F811
    """The 4-point grid run sequentially in this process with one torch thread (as each worker below): the reference."""
    out = tmp_path_factory.mktemp("sequential") / "sweep"
    grid = sweep.parse_grid("lr=1e-2,3e-2 rmu:steering=4", ["rmu", "ours"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sweep.sweep(base(tiny_dirs, data_dir), grid, out)
    finally:
        torch.set_num_threads(threads)
    return grid, out


def figures(out: Path) -> dict:
    """Each point's measures, the times left out, and the selection."""
    record = json.loads((out / "sweep.json").read_text())
    points = {p["name"]: {k: v for k, v in p["metrics"].items() if k not in TIMING} for p in record["points"]}
    return dict(points=points, selected=record["selection"]["selected"])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_a_worker_mid_point(out: Path) -> Path:
    """Once a worker has logged two training steps of a point it has not finished (so the first is checkpointed),
    SIGKILL it; that point's folder."""
    deadline = time.time() + 300
    while time.time() < deadline:
        for folder in sorted(p.parent for p in out.glob("*/*/metrics.jsonl")):
            owner = claim.read_owner(folder) or {}
            logged = len((folder / "metrics.jsonl").read_text().splitlines())
            if "pid" in owner and logged >= 2 and not (folder / "report.json").exists():
                os.kill(owner["pid"], signal.SIGKILL)
                return folder
        time.sleep(0.02)
    raise AssertionError("no worker reached a training step")


def test_local_workers_give_the_sequential_figures_and_a_killed_point_resumes(
    sequential,
    tiny_dirs,
    data_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    grid, reference = sequential
    out = tmp_path / "local"
    (tmp_path / "cwd" / "ref").mkdir(parents=True)  # a decoy package where the workers start: they must not import it
    (tmp_path / "cwd" / "ref" / "__init__.py").write_text("raise ImportError('the decoy ref')")
    monkeypatch.chdir(tmp_path / "cwd")
    workers = Launcher("local", workers=2, threads=1)
    result = {}
    run = threading.Thread(
        target=lambda: result.update(sweep.sweep(base(tiny_dirs, data_dir), grid, out, launcher=workers))
    )
    run.start()
    killed = kill_a_worker_mid_point(out)
    run.join()
    name = str(killed.relative_to(out))
    status = {p["name"]: p["status"] for p in result["points"]}
    assert status.pop(name).startswith(f"failed: its worker ({socket.gethostname()} pid ")
    assert set(status.values()) == {"done"}
    stale = claim.read_owner(killed)
    assert stale is not None and not claim.alive(stale)  # the dead worker's claim is still there
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/*/report.json")}

    record = sweep.sweep(base(tiny_dirs, data_dir), grid, out, launcher=workers)  # the same launch again
    assert [p["status"] for p in record["points"]] == ["done"] * 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/report.json") if p in finished} == finished  # not rerun
    resumes = json.loads((killed / "run.json").read_text())["resumes"]
    assert len(resumes) == 1 and resumes[0]["at_step"] >= 1  # the claim taken over, the run resumed
    for folder in (out / p["name"] for p in record["points"]):
        steps = [r["step"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]
        assert steps == list(range(1, 9)), folder  # every step once: no point ran twice
        assert not (folder / claim.CLAIM).exists()  # every claim released
        assert sha(folder / "updated.safetensors") == sha(reference / folder.relative_to(out) / "updated.safetensors")
    assert figures(out) == figures(reference)
    log = out / "logs" / f"{name}.log"
    assert log.read_text().count("== ") == 2 and (log.with_suffix(".json")).is_file()  # two attempts, one outcome


def test_submitit_local_executor_runs_the_slurm_code_path(sequential, tiny_dirs, data_dir, tmp_path):  # noqa: F811
    pytest.importorskip("submitit")
    grid, reference = sequential
    out = tmp_path / "array"
    array = Launcher("slurm", time_min=10, threads=1, cluster="local")  # submitit without a scheduler
    s = base(tiny_dirs, data_dir)
    record = sweep.sweep(s, sweep.parse_grid("lr=1e-2,3e-2 steering=4", ["rmu"]), out, launcher=array)
    assert [p["status"] for p in record["points"]] == ["done"] * 2
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert len(jobs) == 1 and set(jobs[0]["jobs"]) == {p["name"] for p in record["points"]}
    want = figures(reference)["points"]
    assert figures(out)["points"] == {n: want[n] for n in jobs[0]["jobs"]}
    for name in jobs[0]["jobs"]:
        assert "SLURM task on" in (out / "logs" / f"{name}.log").read_text()
        assert sha(out / name / "updated.safetensors") == sha(reference / name / "updated.safetensors")


def test_a_live_claim_is_skipped_and_status_and_collect_read_the_folder(tiny_dirs, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sweep"
    argv = tiny_argv(tiny_dirs, data_dir, out, "--no-compile", "--no-figures")
    me = claim.claim(out / "rmu" / "lr=0.01")  # this process runs the point, as far as the sweep can tell
    assert sweep.main(argv) == 0  # nothing to run here
    running = f"rmu/lr=0.01: running on {socket.gethostname()} pid {os.getpid()}"
    assert running in capsys.readouterr().out
    assert claim.read_owner(out / "rmu" / "lr=0.01") == me and not (out / "rmu" / "lr=0.01" / "run.json").exists()
    assert sweep.main(["--status", str(out)]) == 0
    assert capsys.readouterr().out == running + "\n"
    first = sha(out / "sweep.json")
    assert sweep.main(["--collect", str(out), "--no-figures"]) == 0
    assert sha(out / "sweep.json") == first  # idempotent
    capsys.readouterr()
    claim.release(out / "rmu" / "lr=0.01", me)
    assert sweep.main(["--status", str(out)]) == 0
    assert capsys.readouterr().out == "rmu/lr=0.01: not started\n"


def test_launcher_options_are_checked_before_anything_runs(tiny_dirs, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    argv = tiny_argv(tiny_dirs, data_dir, tmp_path / "s")
    cases = {
        ("--workers", "2"): "--workers applies to --launcher local only",
        ("--launcher", "local"): "--launcher local needs --workers N",
        ("--launcher", "local", "--workers", "0"): "--workers is 0; use a whole number > 0",
        ("--launcher", "local", "--workers", "3", "--devices", "cpu,cpu"): "--devices names 2 devices for --workers 3",
        ("--launcher", "slurm"): "--launcher slurm needs --slurm-time MINUTES",
        ("--launcher", "slurm", "--slurm-time", "5", "--slurm-option", "=x"): "--slurm-option '=x': write KEY=VALUE",
        ("--slurm-time", "5"): "--slurm-time applies to --launcher slurm only",
    }
    for extra, message in cases.items():
        assert sweep.main(argv + list(extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    if shutil.which("sbatch") is None and importlib.util.find_spec("submitit") is not None:
        assert sweep.main(argv + ["--launcher", "slurm", "--slurm-time", "5"]) == 2
        err = capsys.readouterr().err
        assert err == "error: --launcher slurm: sbatch is not on PATH; launch from a SLURM login node\n", err
    monkeypatch.setitem(sys.modules, "submitit", None)  # the extra not installed
    assert sweep.main(argv + ["--launcher", "slurm", "--slurm-time", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs submitit, the optional extra 'cluster'" in err, err
    assert not (tmp_path / "s").exists()
    assert sweep.sbatch_options(["account=proj", "--qos=high", "exclusive"]) == dict(
        account="proj", qos="high", exclusive=True
    )


def test_a_failed_point_is_recorded_and_tried_again(tiny_dirs, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "sweep"

    def fails(settings):
        raise RefError("the disk went away")

    monkeypatch.setattr(launch, "unlearn", fails)
    assert sweep.main(tiny_argv(tiny_dirs, data_dir, out, "--no-figures")) == 2  # sequential: stops, as a run does
    assert capsys.readouterr().err == "error: the disk went away\n"
    assert json.loads((out / "sweep.json").read_text())["points"][0]["status"] == "failed: the disk went away"
    assert sweep.status_lines(out) == ["rmu/lr=0.01: failed: the disk went away"]
    assert not (out / "rmu" / "lr=0.01" / claim.CLAIM).exists()  # released
    assert sweep.main(tiny_argv(tiny_dirs, data_dir, out, "--no-figures", "--dry-run")) == 0
    assert "(1 to run)" in capsys.readouterr().out  # the next launch tries it again

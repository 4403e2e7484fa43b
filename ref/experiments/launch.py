"""How a sweep's points run: one after another in this process (ref.sweep's default), N at once in worker processes
on this machine (`--launcher local`), or as a SLURM job array through submitit (`--launcher slurm`). Every launcher
hands each point to `run_task`: claim the point (ref.experiments.claim), run or resume it (ref.unlearn), record how it
ended, release the claim. The sweep folder keeps, beside the point folders:

    OUT/logs/METHOD/SETTING.log    a worker's output for the point (every attempt, appended)
    OUT/logs/METHOD/SETTING.json   how its last attempt ended: status (done, diverged: ..., failed: ...), seconds
    OUT/slurm/                     submitit's files, and jobs.json: the job ids of every submission

    python -m ref.experiments.launch TASK_JSON   a worker (ref.sweep --launcher local starts it): one point
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ref.config import ModelConfig
from ref.experiments.claim import alive, claim, read_owner, release, where
from ref.io import validate
from ref.io.cli import run_command
from ref.io.errors import RefError
from ref.io.placement import parse_devices
from ref.io.runlog import CUT_START, holds_files, write_json
from ref.run.divergence import Diverged
from ref.run.memory import estimate_peak_bytes
from ref.run.plan import EVAL_OVERHEAD, GPU_BYTES, Plan, Settings
from ref.unlearn import unlearn

LAUNCHERS = ("sequential", "local", "slurm")
ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds this `ref` package


@dataclass
class Launcher:
    """How a sweep's points run (ref.sweep's --launcher options)."""

    kind: str = "sequential"  # sequential (in this process) | local (worker processes) | slurm (a job array)
    workers: int = 1  # local: points at once
    devices: list[str | None] | None = None  # local: a worker's device each (None: the settings' device)
    threads: int | None = None  # torch threads a worker (local default: this process's, split between the workers)
    partition: str | None = None  # slurm: --partition
    time_min: int | None = None  # slurm: a task's time limit, minutes (required)
    gpus_per_task: int | None = None  # slurm: default: what the largest point needs (as --dry-run counts them)
    sbatch: dict = field(default_factory=dict)  # slurm: other sbatch options, e.g. {"account": "proj"}
    cluster: str = "slurm"  # submitit's executor; "local" runs the same array on this machine without a scheduler


@dataclass
class Task:
    """One point for a worker: its settings (settings.out: the point's folder), its log, the worker's share."""

    name: str  # METHOD/SETTING
    settings: Settings
    log: str  # OUT/logs/METHOD/SETTING.log; how the point ended goes beside it (outcome_path)
    device: str | None = None  # None: the settings' own
    threads: int | None = None  # torch threads; None: as the process has them


def log_path(out: Path, name: str) -> Path:
    return Path(out) / "logs" / f"{name}.log"


def outcome_path(log: Path) -> Path:
    return Path(log).with_suffix(".json")


def read_outcome(log: Path) -> dict | None:
    """How the point's last attempt ended ({"status", "seconds", ...}), or None (none ended, or not readable)."""
    try:
        return json.loads(outcome_path(log).read_text())
    except (OSError, ValueError):
        return None


def last_line(log: Path) -> str:
    """The last line a worker wrote to the point's log ("" without one)."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return ""
    lines = [x.strip() for x in text.replace("\r", "\n").splitlines() if x.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------- one point, any launcher


def run_point(settings: Settings) -> str:
    """Run the point in settings.out, or resume it from its checkpoint: "done" or "diverged: ..." (a divergence is the
    point's result, not the sweep's)."""
    folder = Path(settings.out)
    if not (folder / "run.json").is_file():  # a start cut before its run.json: begin again
        for name in CUT_START:
            (folder / name).unlink(missing_ok=True)
    started = (folder / "checkpoint.pt").is_file()
    try:
        unlearn(replace(settings, resume=started, overwrite=holds_files(folder) and not started))
    except RefError as e:
        if isinstance(e.__cause__, Diverged):
            return f"diverged: {e}"
        raise
    return "done"


def run_task(task: Task) -> str:
    """A worker's whole job, the same in every launcher: claim the point, run or resume it, record how it ended,
    release the claim. Returns done, diverged: ..., or running on ... (a live owner holds it: not run here). An
    error is recorded as failed: ... and raised; an interruption records nothing (the point resumes next time)."""
    folder = Path(task.settings.out)
    me = claim(folder)
    if me is None:
        return f"running on {where(read_owner(folder) or {})}"
    try:
        ended = read_outcome(task.log) or {}
        if (folder / "report.json").is_file() or ended.get("status", "").startswith("diverged"):
            return ended.get("status", "done")  # another worker ended it since the sweep's plan
        outcome_path(task.log).unlink(missing_ok=True)
        if task.threads:
            torch.set_num_threads(task.threads)
        t0 = time.time()
        try:
            status = run_point(replace(task.settings, device=task.device or task.settings.device))
        except Exception as e:
            lines = str(e).splitlines() or [""]
            why = lines[0] if isinstance(e, RefError) else f"{type(e).__name__}: {lines[0]}"
            write_outcome(task, f"failed: {why}", time.time() - t0)
            raise
        write_outcome(task, status, time.time() - t0)
        return status
    finally:
        release(folder, me)


def write_outcome(task: Task, status: str, seconds: float) -> None:
    ended = time.strftime("%Y-%m-%d %H:%M:%S")
    record = dict(status=status, seconds=round(seconds, 1), host=socket.gethostname(), pid=os.getpid(), ended=ended)
    write_json(outcome_path(task.log), record)


def point_status(folder: Path, log: Path) -> str:
    """done | running on HOST pid N | diverged: ... | failed: ... | started (a checkpoint to resume from) | new."""
    if (folder / "report.json").is_file():
        return "done"
    owner = read_owner(folder)
    if owner is not None and alive(owner):
        return f"running on {where(owner)}"
    if owner is not None:  # its worker died holding the claim: the next launch takes the claim over
        line = last_line(log)
        return f"failed: its worker ({where(owner)}) is gone" + (f"; its log ends: {line}" if line else "")
    outcome = read_outcome(log)
    if outcome is not None and outcome.get("status") != "done":
        return outcome["status"]
    return "started" if (folder / "checkpoint.pt").is_file() else "new"


def after_worker(task: Task, failure: str | None) -> str:
    """The point's status once its worker ended; `failure`: what the launcher saw of that end (None: a clean exit)."""
    status = point_status(Path(task.settings.out), Path(task.log))
    if failure is not None and status in ("new", "started"):
        line = last_line(task.log)
        return f"failed: {failure}" + (f"; its log ends: {line}" if line else "")
    return status


def task_json(task: Task) -> str:
    return json.dumps(asdict(task))


def task_from_json(text: str) -> Task:
    d = json.loads(text)
    return Task(**(d | dict(settings=Settings(**d["settings"]))))


# ---------------------------------------------------------------------------------------------- local workers


def run_local(tasks: list[Task], launcher: Launcher) -> None:
    """`launcher.workers` points at a time, each in a worker process of its own, worker i on devices[i] with its
    share of the torch threads. Ctrl-C stops the workers at their next step (each saves its checkpoint), then ends."""
    free = list(launcher.devices or [None] * launcher.workers)  # a free worker: its device
    threads = launcher.threads or max(1, torch.get_num_threads() // launcher.workers)
    waiting, running = list(tasks), {}
    try:
        while waiting or running:
            while waiting and free:
                task = replace(waiting.pop(0), device=free.pop(0), threads=threads)
                running[start_worker(task)] = task
                print(f"{task.name}: started on {task.device or 'the default device'}, {threads} thread(s)", flush=True)
            done = [proc for proc in running if proc.poll() is not None]
            for proc in done:
                task = running.pop(proc)
                free.append(task.device)
                print(f"{task.name}: {after_worker(task, exit_failure(proc.returncode))}", flush=True)
            if not done:
                time.sleep(0.2)
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGINT)
        for proc in running:
            proc.wait()
        raise


def exit_failure(code: int) -> str | None:
    """What a worker's exit code says when it left no outcome."""
    if code == 0:
        return None
    return f"its worker was ended by signal {-code}" if code < 0 else f"its worker exited with code {code}"


def start_worker(task: Task) -> subprocess.Popen:
    """A worker process running run_task(task) with this process's interpreter and this `ref` (its folder first on
    sys.path; the working folder stays, so the settings' relative paths keep their meaning). Its output is appended
    to the point's log."""
    log = Path(task.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); from ref.experiments.launch import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    env = os.environ | {"OMP_NUM_THREADS": str(task.threads), "TQDM_DISABLE": "1"}
    with open(log, "a") as out:
        out.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} worker on {task.device or 'the default device'}\n")
        out.flush()
        # a session of its own: Ctrl-C reaches the launcher alone, which passes it on to each worker once
        return subprocess.Popen(
            [sys.executable, "-c", code, task_json(task)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def command(argv: list[str] | None) -> int:
    if not argv or len(argv) != 1:
        raise RefError(
            "usage: python -m ref.experiments.launch TASK_JSON (ref.sweep --launcher local starts the workers)"
        )
    task = task_from_json(argv[0])
    print(f"{task.name}: {run_task(task)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, sys.argv[1:] if argv is None else argv)


# ---------------------------------------------------------------------------------------------- SLURM


class SlurmTask:
    """What each array task runs (submitit pickles it with its Task): the point's output into its log, then
    run_task. `checkpoint` lets submitit requeue a preempted or timed-out task; the point resumes from its
    checkpoint."""

    def __init__(self, root: str):
        self.root = root  # the folder of the submitting process's `ref`

    def __call__(self, task: Task) -> str:
        if ROOT != self.root:
            raise RefError(
                f"the task imported ref from {ROOT}, the sweep's is in {self.root}: submit from a folder "
                "that holds no other ref package"
            )
        log = Path(task.log)
        log.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(log, "a") as out:
            out.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} SLURM task on {socket.gethostname()}\n")
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
        return run_task(task)

    def checkpoint(self, task: Task):
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


def gpus_needed(plan: Plan, cfg: ModelConfig) -> int:
    """The 80 GiB GPUs a point needs, as --dry-run counts them (training or the evaluation's whole model, the larger);
    the count of devices the settings name; 0 on the CPU."""
    devices = parse_devices(plan.device) if plan.device != "auto" else None
    if devices is not None:
        return 0 if devices[0].type == "cpu" else len(devices)
    bytes_per = torch.finfo(getattr(torch, plan.dtype or "bfloat16")).bits // 8
    est = estimate_peak_bytes(cfg, plan, bytes_per)
    return max(math.ceil(est["ours"] / GPU_BYTES), math.ceil(est["full_weights"] * EVAL_OVERHEAD / GPU_BYTES))


def check_launcher(launcher: Launcher) -> None:
    """The launcher's values, before anything runs: one RefError line naming the option."""
    if launcher.kind not in LAUNCHERS:
        raise RefError(f"--launcher is {launcher.kind!r}; use one of {', '.join(LAUNCHERS)}")
    validate.positive("--workers", launcher.workers, integer=True)
    for device in launcher.devices or []:
        validate.device("--devices", device)
    if launcher.devices and len(launcher.devices) != launcher.workers:
        raise RefError(
            f"--devices names {len(launcher.devices)} devices for --workers {launcher.workers}: name one a worker"
        )
    if launcher.kind == "slurm":
        import_submitit()
        if launcher.time_min is None:
            raise RefError(
                "--launcher slurm needs --slurm-time MINUTES, a point's time limit (a task stopped by it "
                "resumes its point from the checkpoint when the sweep is launched again)"
            )
        validate.positive("--slurm-time", launcher.time_min, integer=True)
        validate.number("--slurm-gpus-per-task", launcher.gpus_per_task, low=0, integer=True)
        if launcher.cluster == "slurm" and shutil.which("sbatch") is None:
            raise RefError("--launcher slurm: sbatch is not on PATH; launch from a SLURM login node")


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise RefError(
            "--launcher slurm needs submitit, the optional extra 'cluster': pip install 'ref[cluster]' "
            "(or pip install submitit)"
        ) from None
    return submitit


def run_slurm(tasks: list[Task], out: Path, launcher: Launcher) -> None:
    """Submit the tasks as one job array, write the job ids to OUT/slurm/jobs.json, and wait for the tasks to end."""
    if not tasks:
        return
    submitit = import_submitit()
    # the tasks import this `ref`: its folder first on the path, the working folder not on it (Python >= 3.11)
    setup = [
        f"export PYTHONPATH={shlex.quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export PYTHONSAFEPATH=1",
        "export TQDM_DISABLE=1",
    ]
    sbatch = ({"ntasks": 1} if launcher.gpus_per_task else {}) | launcher.sbatch  # --gpus-per-task wants --ntasks
    tasks = [replace(t, threads=launcher.threads) for t in tasks]
    try:
        executor = submitit.AutoExecutor(folder=out / "slurm", cluster=launcher.cluster)
        executor.update_parameters(
            name=f"ref-sweep-{out.name}",
            timeout_min=launcher.time_min,
            slurm_partition=launcher.partition,
            slurm_gpus_per_task=launcher.gpus_per_task or None,
            slurm_additional_parameters=sbatch or None,
            slurm_setup=setup,
            local_setup=setup,
        )
        jobs = executor.map_array(SlurmTask(ROOT), tasks)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        raise RefError(f"--launcher slurm: the submission failed ({e}); launch from a SLURM login node") from None
    path = out / "slurm" / "jobs.json"
    ids = {t.name: job.job_id for t, job in zip(tasks, jobs, strict=True)}
    write_json(path, submissions(out) + [dict(submitted=time.strftime("%Y-%m-%d %H:%M:%S"), jobs=ids)])
    array = jobs[0].job_id.split("_")[0]
    print(
        f"submitted {len(jobs)} points as job {array} ({launcher.gpus_per_task} GPUs a task); ids in {path}", flush=True
    )
    for task, job in zip(tasks, jobs, strict=True):
        job.wait()
        error = job.exception()
        failure = None if error is None else (str(error).splitlines() or [type(error).__name__])[0]
        print(f"{task.name}: {after_worker(task, failure)}", flush=True)


def submissions(out: Path) -> list[dict]:
    """OUT/slurm/jobs.json: every submission's time and job ids, by point ([] without one)."""
    path = Path(out) / "slurm" / "jobs.json"
    if not path.is_file():
        return []
    try:
        done = json.loads(path.read_text())
        if not all(isinstance(s["jobs"], dict) for s in done):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        raise RefError(f"{path} is damaged; move it away (it only lists earlier submissions' job ids)") from None
    return done


if __name__ == "__main__":
    sys.exit(main())

"""Sweeps: one goal, one or more methods, a grid of settings for each; the forget-retain table, the selection of each
method's setting at a retain budget (methods compared at matched retain), and the figures (ref.report).

    python -m ref.sweep --model smollm2-135m --goal toxicity --method ours,rmu,adaptive-rmu \\
        --grid 'lr=3e-4,1e-3,3e-3 ours:alpha0=1,10 rmu:steering=100,550 adaptive-rmu:beta=2,5' --out runs/sweep
    python -m ref.sweep --model mistral-7b --goal wmdp --method rmu --layers 3,7,11,15,19 --out runs/layers

The grid: whitespace-separated `[METHOD:]KEY=V1,V2,...`; KEY is a ref.unlearn option (dashes or underscores) that
shapes a run (GRID_KEYS), or `layer`; a METHOD: prefix applies it to that method only; the points are the cross
product of a method's keys. A list-valued key (update-layers, tox-layers, update-params) joins its items with `/`,
and `a-b` is a range: `update-layers=5-7,10/12`. `layer=L` (or --layers) moves the objective's depth: the tap layer L
with the updated layers L-2..L (the RMU reference's 7 and 5, 6, 7), or, for ours on toxicity, the probed (and updated)
layers L-1, L, L+1.

Each point is a normal run folder, OUT/METHOD/SETTING (SETTING: `lr=0.001,steering=100`, or `defaults`). A point
whose folder holds a report.json is not run again (its settings must be the point's); an interrupted one is resumed
from its checkpoint; a point that diverges is recorded and the sweep goes on. sweep.json (atomic, written before the
first point and after every point) holds every point's settings, metrics, time and status, the selection, and
sweep.md the tables.

The points run one after another in this process, or through ref.experiments.launch: `--launcher local --workers N`
(worker processes on this machine), `--launcher slurm` (a job array through submitit); each point is claimed
(ref.experiments.claim).

    python -m ref.sweep ... --launcher local --devices cuda:0,cuda:1
    python -m ref.sweep --status OUT        # one line a point: done, running where, failed why, not started
    python -m ref.sweep --collect OUT       # sweep.json, sweep.md and the figures from the points that finished
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ref.config import ModelConfig
from ref.experiments.claim import CLAIM_FILES
from ref.experiments.launch import (
    LAUNCHERS,
    Launcher,
    Task,
    check_launcher,
    gpus_needed,
    log_path,
    point_status,
    read_outcome,
    run_local,
    run_slurm,
    run_task,
    submissions,
)
from ref.io import validate
from ref.io.checkpoint import resolve
from ref.io.cli import run_command
from ref.io.config_json import read_config
from ref.io.data import GOALS, load_goal_data, prepared_hub_dir, resolve_data_dir
from ref.io.errors import RefError, Stopped
from ref.io.runlog import CUT_START, atomic_write_text, read_metrics, write_json
from ref.io.tables import cell, markdown_table
from ref.run.options import accepted, grid_keys, parse_text
from ref.run.plan import EVAL_SAMPLES, METHODS, Plan, Settings, given, tox_balance
from ref.run.plan import resolve as resolve_plan
from ref.train import schedule
from ref.unlearn import architecture

# The settings a grid may vary: the options that shape a run (ref/run/options.py), and `layer`, the depth shorthand.
GRID_KEYS = ("layer", *grid_keys(Settings))
RETAIN_METRICS = ("accuracy", "perplexity")
# Settings of a run folder that may differ from the point's: where it is, how it was started, and the device a worker
# put it on.
NOT_COMPARED = {"out", "resume", "overwrite", "dry_run", "device"}
# What a sweep folder holds: the method folders of the points, the sweep's record, figures, the workers' logs, and
# submitit's files.
SWEEP_FILES = {*METHODS, "sweep.json", "sweep.md", "figures", "logs", "slurm"}


@dataclass
class Point:
    method: str
    grid: dict  # the point's grid values, by Settings field name ("layer" kept as given)
    settings: Settings

    @property
    def name(self) -> str:
        return f"{self.method}/{setting_name(self.grid)}"


def setting_name(grid: dict) -> str:
    """`lr=0.001,update-layers=5+6+7`: the grid values in the order given, or `defaults` without any."""
    show = lambda v: "+".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
    return ",".join(f"{k.replace('_', '-')}={show(v)}" for k, v in grid.items()) or "defaults"


# ------------------------------------------------------------------------------------------------------- the grid


def parse_value(key: str, text: str):
    """One grid value of `key` from its text (list items joined by /), or a RefError that names it."""
    try:
        if key == "layer":
            return int(text)
        return parse_text(Settings, Settings.__dataclass_fields__[key], text, sep="/")
    except RefError as e:
        raise RefError(f"--grid {key.replace('_', '-')}={text}: {e}") from None
    except (ValueError, KeyError):
        what = "a whole number" if key == "layer" else accepted(Settings, Settings.__dataclass_fields__[key], sep="/")
        raise RefError(f"--grid {key.replace('_', '-')}={text}: {text!r} is not {what}") from None


def parse_grid(text: str, methods: list[str]) -> dict[str, dict[str, list]]:
    """{method: {key: [values]}} from the --grid text; every key and method prefix checked."""
    grid: dict[str, dict[str, list]] = {m: {} for m in methods}
    for token in text.split():
        scope, _, body = token.partition(":") if ":" in token.split("=")[0] else ("", "", token)
        key, eq, values = body.partition("=")
        field = key.strip().replace("-", "_")
        if not eq or not values.strip():
            raise RefError(f"--grid {token!r}: write KEY=V1,V2,... (or METHOD:KEY=...), e.g. lr=1e-4,3e-4")
        if field not in GRID_KEYS:
            why = "a sweep-wide option, not a grid key" if field in Settings.__dataclass_fields__ else "not a setting"
            raise RefError(
                f"--grid {token!r}: {key} is {why}; grid keys: {', '.join(k.replace('_', '-') for k in GRID_KEYS)}"
            )
        if scope and scope not in methods:
            raise RefError(f"--grid {token!r}: {scope} is not one of the sweep's methods ({', '.join(methods)})")
        parsed = [parse_value(field, v.strip()) for v in values.split(",") if v.strip()]
        if len(set(map(str, parsed))) != len(parsed):
            raise RefError(f"--grid {token!r} repeats a value; name each once")
        for m in [scope] if scope else methods:
            if field in grid[m]:
                raise RefError(f"--grid gives {key} twice for {m}; give each key once")
            grid[m][field] = parsed
    for m, keys in grid.items():
        depth = {"tap_layer", "update_layers", "tox_layers"} & set(keys)
        if "layer" in keys and depth:
            raise RefError(f"--grid: layer sets the depth ({', '.join(sorted(depth))}) for {m}; give one or the other")
    return grid


def depth_settings(method: str, goal: str, layer: int, num_layers: int) -> dict:
    """What `layer=L` sets: ours on toxicity probes (and updates) L-1, L, L+1; the others tap L and update L-2..L."""
    if (method, goal) == ("ours", "toxicity"):
        return dict(tox_layers=sorted({min(max(i, 0), num_layers - 1) for i in (layer - 1, layer, layer + 1)}))
    return dict(tap_layer=layer, update_layers=list(range(max(0, layer - 2), layer + 1)))


def fields_of(method: str, goal: str, grid: dict, num_layers: int) -> dict:
    """The Settings fields a point's grid values set (`layer` turned into the layers it stands for)."""
    fields = {k: v for k, v in grid.items() if k != "layer"}
    return fields | (depth_settings(method, goal, grid["layer"], num_layers) if "layer" in grid else {})


def expand(base: Settings, grid: dict[str, dict[str, list]], out: Path, num_layers: int) -> list[Point]:
    """Every point: for each method, the cross product of its keys' values, as the Settings of a run in OUT/."""
    points = []
    for method, keys in grid.items():
        for values in itertools.product(*keys.values()):
            chosen = dict(zip(keys, values, strict=True))
            fields = fields_of(method, base.goal, chosen, num_layers)
            name = f"{method}/{setting_name(chosen)}"
            points.append(Point(method, chosen, replace(base, method=method, out=str(out / name), **fields)))
    return points


# ---------------------------------------------------------------------------------------------------- a point


def compared(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in NOT_COMPARED}


def check_point_folder(p: Point) -> None:
    """The point's folder, when it holds a run, holds this point's (its settings and toxicity balance); without a
    run.json it holds at most what a start cut before its run.json leaves (CUT_START: the point starts again)."""
    folder = Path(p.settings.out)
    run_json = folder / "run.json"
    if not run_json.is_file():
        names = [q.name for q in folder.iterdir()] if folder.is_dir() else []
        other = sorted(n for n in names if n not in CUT_START | CLAIM_FILES)
        if other:
            raise RefError(
                f"point {p.name}: its folder {folder} has no run.json but holds {', '.join(other[:5])}, "
                "not files of this sweep's run; move them out of the folder and rerun the sweep"
            )
        return
    try:
        recorded = json.loads(run_json.read_text())
        had, ran = recorded["settings"], recorded["plan"]["tox_balance"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RefError(
            f"{run_json} is damaged: the sweep cannot tell what ran there; move it or use another --out"
        ) from None
    now = compared(asdict(p.settings))
    diff = {k: (had.get(k), v) for k, v in now.items() if had.get(k) != v}
    if diff:
        listed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise RefError(
            f"{folder} holds a run with other settings ({listed}); rerun the sweep with the settings it "
            "had, or use another --out"
        )
    wanted = tox_balance(p.settings)
    if ran != wanted:
        raise RefError(
            f"{folder} holds a run of the {ran} toxicity balance, the point's is {wanted}: use another --out"
        )


def runnable(status: str) -> bool:
    """A point a launch runs: not started, stopped (resumed from its checkpoint) or failed (tried again)."""
    return status in ("new", "started") or status.startswith("failed")


def measures(folder: Path) -> dict:
    """A finished point's numbers: U, R, retain perplexity and S after, the same before, steps and seconds (the
    training's: the sum of its steps' times, over resumes too; the evaluation's: before and after)."""
    report = json.loads((folder / "report.json").read_text())
    rows = read_metrics(folder / "metrics.jsonl")
    out = dict(steps=len(rows), train_s=round(sum(r["tokens"] / r["tokens_per_s"] for r in rows), 2))  # resumes too
    out["eval_s"] = round(sum(report["details"][w].get("seconds", 0.0) for w in ("before", "after")), 1)
    for when, suffix in (("after", ""), ("before", "_before")):
        d = report["details"][when]
        out[f"U{suffix}"] = (d.get("forget") or {}).get("value")
        out[f"R{suffix}"] = (d.get("retain") or {}).get("value")
        out[f"ppl{suffix}"] = d.get("retain_perplexity")
        out[f"S{suffix}"] = (d.get("s_unlearning") or {}).get("s")
        # toxicity: fluency and diversity of the continuations (ref.evaluation.fluency)
        rtp = d.get("tasks", {}).get("rtp") or {}
        out[f"fluency{suffix}"], out[f"distinct2{suffix}"] = rtp.get("fluency_perplexity"), rtp.get("distinct_2")
    return out


# ---------------------------------------------------------------------------------------------------- selection


def retain_drop(m: dict, metric: str) -> float | None:
    """How much retain the point lost: accuracy points (before - after), or the relative rise of perplexity."""
    if metric == "accuracy":
        return None if m.get("R") is None or m.get("R_before") is None else m["R_before"] - m["R"]
    return None if m.get("ppl") is None or m.get("ppl_before") is None else m["ppl"] / m["ppl_before"] - 1.0


def select(rows: list[dict], budget: float | None, metric: str = "accuracy") -> dict[str, dict | None]:
    """Each method's chosen point among the finished rows: with a budget, the most forgetting (lowest U) among the
    points whose retain drop is at most `budget` (ties: higher S); without, the highest S-unlearning. None: no
    point qualifies."""
    chosen: dict[str, dict | None] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        done = [r for r in rows if r["method"] == method and r.get("metrics", {}).get("U") is not None]
        if budget is not None:
            ok = [r for r in done if (d := retain_drop(r["metrics"], metric)) is not None and d <= budget + 1e-12]
            best = min(ok, key=lambda r: (r["metrics"]["U"], -(r["metrics"].get("S") or 0.0)), default=None)
        else:
            scored = [r for r in done if r["metrics"].get("S") is not None]
            best = max(scored, key=lambda r: (r["metrics"]["S"], -r["metrics"]["U"]), default=None)
        chosen[method] = best
    return chosen


# ---------------------------------------------------------------------------------------------------- tables


def estimate(rows: list[dict], method: str) -> tuple[float, float] | None:
    """(seconds a training step, seconds of the rest of a point: loading, evaluation, saving) from the finished
    points of `method` (of any method when it has none yet), or None without any finished point."""
    done = [r for r in rows if r.get("metrics") and r["metrics"]["steps"]]
    done = [r for r in done if r["method"] == method] or done
    if not done:
        return None
    per_step = sum(r["metrics"]["train_s"] for r in done) / sum(r["metrics"]["steps"] for r in done)
    rest = [r.get("seconds", r["metrics"]["train_s"] + r["metrics"]["eval_s"]) - r["metrics"]["train_s"] for r in done]
    return per_step, sum(rest) / len(rest)


def guess(rows: list[dict], r: dict) -> float | None:
    """The seconds point `r` should take, or None (no finished point yet, or its steps unknown)."""
    est = estimate(rows, r["method"])
    return None if est is None or r["steps"] is None else r["steps"] * est[0] + est[1]


def plan_text(rows: list[dict], base: Settings) -> str:
    """The sweep's plan: every point, its steps and state, and the time the points still to run should take."""
    todo = [r for r in rows if runnable(r["status"])]
    points = []
    for i, r in enumerate(rows, 1):
        secs = guess(rows, r)
        when = "" if r not in todo else "unknown" if secs is None else f"{secs:.0f} s"
        points.append([i, r["name"], r["steps"] or "unknown", r["status"], when])
    lines = [
        f"sweep: {base.goal} on {base.model}, {len(rows)} points ({len(todo)} to run)",
        markdown_table(["#", "point", "steps", "state", "estimate"], points),
    ]
    secs = [guess(rows, r) for r in todo]
    if None in secs:
        total = "unknown until the first point finishes (then printed after every point)"
    else:
        total = (
            f"{len(todo)} points, ~{sum(secs) / 60:.1f} min (each method's time a step and the rest of a point, "
            "from its finished points)"
        )
    return "\n".join(lines + [f"time to run: {total}"])


def markdown(rows: list[dict], selection: dict, rule: str, goal: str) -> str:
    """The points table (base row first) and the selection (matched-retain) table."""
    u_name = "expected max toxicity" if goal == "toxicity" else "forget accuracy"
    header = ["method", "setting", f"U ({u_name})", "R (retain accuracy)", "retain perplexity", "fluency ppl"]
    header += ["distinct-2", "S", "steps", "train s", "eval s", "status"]
    points = []
    first = next((r["metrics"] for r in rows if r.get("metrics")), None)
    if first:
        before = [first["U_before"], first["R_before"], cell(first["ppl_before"], 2)]
        before += [cell(first.get("fluency_before"), 2), first.get("distinct2_before"), first["S_before"]]
        points.append(["base", "", *before, "", "", "", ""])
    for r in rows:
        m = r.get("metrics") or {}
        after = [m.get("U"), m.get("R"), cell(m.get("ppl"), 2), cell(m.get("fluency"), 2), m.get("distinct2")]
        seconds = [cell(m.get("train_s"), 0), cell(m.get("eval_s"), 0)]
        status = r["status"].split(":")[0]
        points.append([r["method"], r["setting"], *after, m.get("S"), m.get("steps", r["steps"]), *seconds, status])
    chosen = []
    for method, r in selection.items():
        if r is None:
            chosen.append([method, "none qualifies", "", "", "", ""])
        else:
            m = r["metrics"]
            chosen.append([method, r["setting"], m["U"], m["R"], cell(m["ppl"], 2), m["S"]])
    selected = markdown_table(["method", "setting", "U", "R", "retain perplexity", "S"], chosen)
    return f"{markdown_table(header, points)}\n\nSelected ({rule}):\n\n{selected}\n"


# ---------------------------------------------------------------------------------------------------- the sweep


def sweep(
    base: Settings,
    grid: dict[str, dict[str, list]],
    out: Path,
    budget: float | None = None,
    metric: str = "accuracy",
    dry_run: bool = False,
    stop_after: int | None = None,
    launcher: Launcher | None = None,
) -> dict:
    """Check every point, print the plan, write sweep.json, run the points not finished with the launcher, and
    collect the sweep (sweep.json, sweep.md). `stop_after` stops the sequential launcher after running that many
    points (tests: an interrupted sweep)."""
    launcher = launcher or Launcher()
    check_launcher(launcher)
    check_sweep_folder(out)
    cfg = architecture(base.model) if dry_run else read_config(resolve(base.model))  # a dry run downloads nothing
    points = expand(base, grid, out, cfg.num_layers)
    rows, plans = checked_points(points, base, out, cfg, dry_run)
    print(plan_text(rows, base), flush=True)
    if launcher.kind == "slurm":  # a task asks for what the largest point needs, unless told
        gpus = max(gpus_needed(plan, cfg) for plan in plans)
        launcher = replace(launcher, gpus_per_task=given(launcher.gpus_per_task, gpus))
        print(
            f"slurm: a job array of {sum(runnable(r['status']) for r in rows)} tasks, {launcher.gpus_per_task} "
            "GPUs a task",
            flush=True,
        )
    record = dict(
        model=base.model,
        goal=base.goal,
        budget=budget,
        retain_metric=metric,
        grid={m: {k: v for k, v in g.items()} for m, g in grid.items()},
        points=rows,
    )
    if dry_run:
        return record
    out.mkdir(parents=True, exist_ok=True)
    finish(record, out, budget, metric)  # before any point runs: --status and --collect read it
    spread = launcher.kind == "slurm" and launcher.gpus_per_task > 1 and base.device is None
    device = "auto" if spread else None  # a point over several GPUs: its blocks placed over them
    todo = [p for p, r in zip(points, rows, strict=True) if runnable(r["status"])]
    try:
        tasks = [Task(p.name, p.settings, str(log_path(out, p.name)), device) for p in todo]
        run_points(tasks, out, launcher, budget, metric, stop_after)
    except KeyboardInterrupt:
        collect(out, budget, metric)
        raise Stopped(STOPPED[launcher.kind].format(out=out)) from None
    except Exception:  # the sequential launcher stops at a point's error, as a single run does
        collect(out, budget, metric)
        raise
    return collect(out, budget, metric)


def checked_points(
    points: list[Point], base: Settings, out: Path, cfg: ModelConfig, dry_run: bool
) -> tuple[list[dict], list[Plan]]:
    """Every point checked before the first one runs (its plan, its folder, its data): its row of sweep.json (the
    measures of a finished one included) and its plan."""
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise RefError("--grid gives two points the same settings; remove the repeat")
    data_cache: dict = {}
    rows, plans = [], []
    for p in points:
        try:
            plan = resolve_plan(p.settings, cfg)
        except RefError as e:
            raise RefError(f"point {p.name}: {e}") from None
        check_point_folder(p)
        key = (plan.data, tuple(plan.topics or ()))
        if key not in data_cache:
            data_cache[key] = goal_data(plan, dry_run)
        plans.append(plan)
        rows.append(
            dict(
                method=p.method,
                setting=setting_name(p.grid),
                name=p.name,
                folder=p.settings.out,
                grid=p.grid,
                fields=fields_of(p.method, base.goal, p.grid, cfg.num_layers),
                settings=asdict(p.settings),
                steps=steps(data_cache[key], plan),
                status=point_status(Path(p.settings.out), log_path(out, p.name)),
            )
        )
    for r in rows:
        if r["status"] == "done":
            r["metrics"] = measures(Path(r["folder"]))
    return rows, plans


def run_points(
    tasks: list[Task], out: Path, launcher: Launcher, budget: float | None, metric: str, stop_after: int | None
) -> None:
    """The tasks through the launcher: in this process, in local workers, or as a SLURM job array."""
    if launcher.kind == "local":
        run_local(tasks, launcher)
    elif launcher.kind == "slurm":
        run_slurm(tasks, out, launcher)
    else:
        run_here(tasks, out, budget, metric, stop_after)


# What Ctrl-C leaves, by launcher.
STOPPED = {
    "sequential": "the sweep stopped; its finished points and the checkpoint of the point it was running are kept: "
    "rerun the same command to continue",
    "local": "the sweep stopped; its finished points and the workers' checkpoints are kept: rerun the same command "
    "to continue",
    "slurm": "stopped waiting; the SLURM jobs go on: python -m ref.sweep --status {out} follows them and --collect "
    "{out} builds the sweep from the points that have finished",
}


def run_here(tasks: list[Task], out: Path, budget: float | None, metric: str, stop_after: int | None) -> None:
    """The sequential launcher: the points one after another in this process, the sweep collected after each."""
    for i, task in enumerate(tasks[:stop_after], 1):
        print(f"point {i}/{len(tasks)}: {task.name}", flush=True)
        t0 = time.time()
        status = run_task(task)
        rows = collect(out, budget, metric)["points"]
        left = [guess(rows, q) for q in rows if runnable(q["status"])]
        eta = "" if None in left else f", ~{sum(left) / 60:.1f} min"
        print(f"point {i} {status.split(':')[0]} in {time.time() - t0:.0f} s; {len(left)} left{eta}", flush=True)


def check_sweep_folder(out: Path) -> None:
    """--out is new, empty or a sweep's folder; a run folder or a folder of other files is refused before anything is
    written there."""
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    if "run.json" in names:
        raise RefError(f"--out {out} is a ref.unlearn run folder, not a sweep's; choose a new or empty folder")
    other = sorted(n for n in names if not sweep_file(n))
    if other:
        raise RefError(
            f"--out {out} holds files a sweep did not write ({', '.join(other[:5])}); choose a new or empty folder"
        )


def sweep_file(name: str) -> bool:
    """A name a sweep folder holds: one of SWEEP_FILES, or the temporary form of one (left by a crash)."""
    return name in SWEEP_FILES or name.startswith(".") and name.endswith(".tmp") and name[1:-4] in SWEEP_FILES


def collect(out: Path, budget: float | None = None, metric: str | None = None) -> dict:
    """sweep.json and sweep.md from the point folders as they are now: each point's status, the finished points'
    measures, the selection among them (by the sweep's budget and metric unless given). Idempotent."""
    record = read_record(out)
    budget = record.get("budget") if budget is None else budget
    metric = metric or record.get("retain_metric") or "accuracy"
    record.update(budget=budget, retain_metric=metric)
    for r in record["points"]:
        log = log_path(out, r["name"])
        r["status"] = point_status(out / r["name"], log)
        r.pop("metrics", None)
        previous = r.pop("seconds", None)
        if r["status"] == "done":
            r["metrics"] = measures(out / r["name"])
            seconds = (read_outcome(log) or {}).get("seconds", previous)  # of the attempt that finished it
            if seconds is not None:
                r["seconds"] = seconds
    finish(record, out, budget, metric)
    return record


def read_record(out: Path) -> dict:
    """The sweep.json of a sweep folder, or a one-line error."""
    path = Path(out) / "sweep.json"
    if not path.is_file():
        raise RefError(f"{out} has no sweep.json: not a sweep folder (ref.sweep writes it before its first point)")
    try:
        record = json.loads(path.read_text())
        if not all(isinstance(r["name"], str) for r in record["points"]):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise RefError(f"{path} is damaged; rerun the sweep's command to write it again") from None
    return record


def status_lines(out: Path) -> list[str]:
    """`--status`: one line a point: done, running where, diverged or failed why, stopped, not started (and its
    SLURM job when one was submitted)."""
    record = read_record(out)
    queued = {name: job for s in submissions(out) for name, job in s["jobs"].items()}
    words = {"new": "not started", "started": "stopped; the next launch resumes it from its checkpoint"}
    lines = []
    for r in record["points"]:
        status = point_status(out / r["name"], log_path(out, r["name"]))
        job = f" (SLURM job {queued[r['name']]})" if status == "new" and r["name"] in queued else ""
        lines.append(f"{r['name']}: {words.get(status, status)}{job}")
    return lines


def goal_data(plan, dry_run: bool):
    """The plan's data, or None on a dry run whose hub data is not prepared yet (the steps stay unknown)."""
    folder = prepared_hub_dir(plan.goal) if dry_run and plan.data == "hub" else resolve_data_dir(plan.data, plan.goal)
    if folder is None:
        return None
    return load_goal_data(folder, plan.goal, topics=plan.topics, allow_outside=plan.allow_data_outside)


def steps(data, plan) -> int | None:
    return None if data is None else len(schedule(data, plan))


def rule_text(budget: float | None, metric: str) -> str:
    if budget is None:
        return "the highest S-unlearning"
    what = "retain accuracy drop" if metric == "accuracy" else "relative rise of the retain perplexity"
    return f"the most forgetting (lowest U) with a {what} of at most {budget:g}"


def finish(record: dict, out: Path, budget: float | None, metric: str) -> None:
    """The selection, sweep.json and sweep.md, written atomically."""
    selection = select(record["points"], budget, metric)
    record["selection"] = dict(
        rule=rule_text(budget, metric),
        selected={m: (r["name"] if r else None) for m, r in selection.items()},
        settings={m: (r["fields"] if r else None) for m, r in selection.items()},
    )
    write_json(out / "sweep.json", record)
    atomic_write_text(
        out / "sweep.md", markdown(record["points"], selection, rule_text(budget, metric), record["goal"])
    )


def sweep_record(path: Path) -> dict:
    """A sweep.json with its selection, or a one-line error."""
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record["selection"]["settings"], dict) or not {"model", "goal"} <= record.keys():
            raise KeyError
    except FileNotFoundError:
        raise RefError(f"--from-sweep {path}: no such file; pass the sweep.json of a ref.sweep run") from None
    except (ValueError, KeyError, TypeError):
        raise RefError(f"--from-sweep {path} is not a sweep.json of ref.sweep with a selection") from None
    return record


def selected_settings(path: Path, model: str, goal: str) -> dict[str, dict]:
    """{method: the Settings fields of its selected point} from a sweep.json, for ref.table1 --from-sweep."""
    record = sweep_record(path)
    if (record["model"], record["goal"]) != (model, goal):
        raise RefError(
            f"--from-sweep {path} is a sweep of {record['goal']} on {record['model']}, not {goal} on {model}"
        )
    folders = {r["name"]: Path(r["folder"]) for r in record["points"]}
    chosen = {m: f for m, f in record["selection"]["settings"].items() if f is not None}
    if goal == "toxicity" and "ours" in chosen and "tox_balance" not in chosen["ours"]:  # pin the balance it ran
        run_json = folders[record["selection"]["selected"]["ours"]] / "run.json"
        try:
            plan = json.loads(run_json.read_text())["plan"]
        except (OSError, ValueError, KeyError, TypeError):
            raise RefError(
                f"--from-sweep {path}: {run_json} is missing or damaged, so the toxicity balance of ours' "
                "selected point is unknown; restore the sweep folder"
            ) from None
        chosen["ours"] = chosen["ours"] | {"tox_balance": plan["tox_balance"]}
    return chosen


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ref.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=Settings.model, help="registry alias, local model folder, or hub id")
    p.add_argument("--goal", default=Settings.goal, choices=GOALS)
    p.add_argument("--method", default="ours,rmu,adaptive-rmu", help="comma-separated methods (default: all three)")
    p.add_argument("--grid", action="append", default=[], help="'[METHOD:]KEY=V1,V2 ...' (repeatable)")
    p.add_argument("--layers", default=None, help="shorthand for the grid key layer=L1,L2,... (every method)")
    p.add_argument("--data", default=None, help="hub | demo | a prepared data folder (default: the registry's)")
    p.add_argument("--out", default="runs/sweep", help="sweep folder: OUT/METHOD/SETTING run folders, sweep.json")
    p.add_argument("--max-steps", type=int, default=None, help="cap on the steps of every point")
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--eval-limit", type=int, default=None, help="first N questions / prompts of each task")
    p.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES, help="samples per toxicity prompt")
    p.add_argument(
        "--retain-budget",
        type=float,
        default=None,
        help="select the most forgetting within this retain drop (default: select by S-unlearning)",
    )
    p.add_argument(
        "--retain-metric",
        default=None,
        choices=RETAIN_METRICS,
        help="the budget's measure: accuracy drop (points, the default) or relative perplexity rise",
    )
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--dry-run", action="store_true", help="check every point and print the plan; run nothing")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="skip front.png and layers.png")
    p.add_argument(
        "--launcher",
        default="sequential",
        choices=LAUNCHERS,
        help="how the points run: sequential (one after another in this process, the default), local "
        "(--workers processes at once), slurm (a job array through submitit)",
    )
    p.add_argument("--workers", type=int, default=None, help="local: points at once (default: one a --devices entry)")
    p.add_argument(
        "--devices",
        default=None,
        help="local: a device for each worker, comma-separated (cuda:0,cuda:1; "
        "a worker over two GPUs: cuda:0+cuda:1); default: --device, the torch threads split",
    )
    p.add_argument("--slurm-partition", default=None, help="slurm: the partition")
    p.add_argument("--slurm-time", type=int, default=None, help="slurm: a point's time limit in minutes (required)")
    p.add_argument(
        "--slurm-gpus-per-task",
        type=int,
        default=None,
        help="slurm: GPUs for each point (default: as many as the largest point needs, as --dry-run counts them)",
    )
    p.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="slurm: another sbatch option, repeatable: account=proj, qos=high, exclusive",
    )
    p.add_argument(
        "--collect",
        metavar="SWEEP_DIR",
        default=None,
        help="build sweep.json, sweep.md and the figures of SWEEP_DIR from the points that have finished; run nothing",
    )
    p.add_argument(
        "--status",
        metavar="SWEEP_DIR",
        default=None,
        help="one line for each point of SWEEP_DIR: done, running where, failed why, not started",
    )
    return p


def command(argv: list[str] | None) -> int:
    a = parser().parse_args(argv)
    if a.status:
        print("\n".join(status_lines(Path(a.status))))
        return 0
    validate.number("--retain-budget", a.retain_budget, low=0)
    if a.collect:
        out = Path(a.collect)
        report(out, collect(out, a.retain_budget, a.retain_metric), a.figures)
        return 0
    methods = [m.strip() for m in a.method.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS) or len(set(methods)) != len(methods):
        raise RefError(f"--method is {a.method!r}; name some of {', '.join(METHODS)}, each once")
    out = Path(a.out)
    validate.writable_folder("--out", out)
    launcher = launcher_of(a)
    text = (f"layer={a.layers} " if a.layers else "") + " ".join(a.grid)
    grid = parse_grid(text, methods)
    if a.max_steps is not None and any("max_steps" in g for g in grid.values()):
        raise RefError("max-steps is given by --max-steps and by --grid; give it once")
    base = Settings(
        model=a.model,
        goal=a.goal,
        data=a.data,
        max_steps=a.max_steps,
        seed=a.seed,
        eval_limit=a.eval_limit,
        eval_samples=a.eval_samples,
        dtype=a.dtype,
        device=a.device,
        compile=a.compile,
    )
    record = sweep(
        base, grid, out, a.retain_budget, a.retain_metric or "accuracy", dry_run=a.dry_run, launcher=launcher
    )
    if a.dry_run:
        return 0
    failed = report(out, record, a.figures)
    if failed:
        print(
            f"error: {failed} point(s) failed (why: above, and in {out / 'logs'}); rerun the same command to try "
            "them again",
            file=sys.stderr,
        )
    return 1 if failed else 0


def launcher_of(a: argparse.Namespace) -> Launcher:
    """The --launcher options (each launcher's only with it; their values are checked by the sweep)."""
    only = {
        "--workers": (a.workers, "local"),
        "--devices": (a.devices, "local"),
        "--slurm-partition": (a.slurm_partition, "slurm"),
        "--slurm-time": (a.slurm_time, "slurm"),
        "--slurm-gpus-per-task": (a.slurm_gpus_per_task, "slurm"),
        "--slurm-option": (a.slurm_option, "slurm"),
    }
    for option, (value, kind) in only.items():
        if value not in (None, []) and a.launcher != kind:
            raise RefError(f"{option} applies to --launcher {kind} only")
    devices = [d.strip().replace("+", ",") for d in a.devices.split(",")] if a.devices else None
    if a.launcher == "local" and a.workers is None and devices is None:
        raise RefError("--launcher local needs --workers N (or --devices, one device a worker)")
    return Launcher(
        a.launcher,
        workers=a.workers if a.workers is not None else len(devices or [None]),
        devices=devices,
        partition=a.slurm_partition,
        time_min=a.slurm_time,
        gpus_per_task=a.slurm_gpus_per_task,
        sbatch=sbatch_options(a.slurm_option),
    )


def sbatch_options(given: list[str]) -> dict:
    """--slurm-option KEY=VALUE (or a bare KEY, a flag) -> {KEY: VALUE or True}."""
    options = {}
    for text in given:
        key, eq, value = text.partition("=")
        key = key.strip().removeprefix("--")
        if not key or " " in key or (eq and not value.strip()):
            raise RefError(
                f"--slurm-option {text!r}: write KEY=VALUE, an sbatch option without its dashes (account=proj)"
            )
        options[key] = value.strip() if eq else True
    return options


def report(out: Path, record: dict, figures: bool) -> int:
    """Print sweep.md and the points not done, draw the figures; the number of failed points."""
    print((out / "sweep.md").read_text())
    if figures:
        from ref.experiments.report import write_sweep_figures

        try:
            for path in write_sweep_figures(out):
                print(f"wrote {path}")
        except RefError as e:  # matplotlib missing: the sweep itself is complete
            print(f"note: no figures ({e})", file=sys.stderr)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}")
    for r in record["points"]:
        if r["status"] != "done":
            print(f"{r['name']}: {r['status']}")
    return sum(r["status"].startswith("failed") for r in record["points"])


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv)

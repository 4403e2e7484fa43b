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
from its checkpoint; a point that diverges is recorded and the sweep goes on. sweep.json (atomic, rewritten after
every point) holds every point's settings, metrics, time and status, the selection, and sweep.md the tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ref import validate
from ref.checkpoint import resolve
from ref.cli import run_command
from ref.config import read_config
from ref.data import load_goal_data, prepared_hub_dir, resolve_data_dir
from ref.errors import RefError
from ref.plan import GOALS, METHODS, TOX_BALANCES, Settings, ran_tox_balance, tox_balance
from ref.plan import resolve as resolve_plan
from ref.runlog import atomic_write_text, read_metrics, write_json
from ref.train import Diverged, schedule
from ref.unlearn import architecture, unlearn

# The settings a grid may vary (the ones that shape a run), each with its value parser; `layer` is the depth shorthand.
LIST_KEYS = ("update_layers", "tox_layers", "update_params")
GRID_KEYS = ("layer", "tap_layer", "update_layers", "update_params", "tox_layers", "alpha", "alpha0", "steering",
             "beta", "raw_probe_weights", "tox_balance", "probe_l2", "lr", "policy_lr", "epochs", "max_steps",
             "batch_size", "max_len", "seed")  # fmt: skip
INTS = {"layer", "tap_layer", "epochs", "max_steps", "batch_size", "max_len", "seed"}
RETAIN_METRICS = ("accuracy", "perplexity")
NOT_COMPARED = {"out", "resume", "overwrite", "dry_run"}  # settings of a run folder that may differ from the point's


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
    show = lambda v: "+".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ",".join(f"{k.replace('_', '-')}={show(v)}" for k, v in grid.items()) or "defaults"


# ------------------------------------------------------------------------------------------------------- the grid


def parse_value(key: str, text: str):
    """One grid value of `key` from its text (see the module docstring), or a RefError that names it."""
    try:
        if key in LIST_KEYS:
            items = [x.strip() for x in text.split("/") if x.strip()]
            if not items:
                raise ValueError(text)
            return items if key == "update_params" else [i for item in items for i in span(item)]
        if key == "raw_probe_weights":
            return {"true": True, "false": False}[text.lower()]
        if key == "probe_l2" and text == "auto":
            return None
        if key == "tox_balance":
            if text not in TOX_BALANCES:
                raise ValueError(text)
            return text
        return int(text) if key in INTS else float(text)
    except RefError as e:
        raise RefError(f"--grid {key.replace('_', '-')}={text}: {e}") from None
    except (ValueError, KeyError):
        what = {"raw_probe_weights": "true or false", "probe_l2": "auto or a number",
                "tox_balance": " or ".join(TOX_BALANCES)}.get(key, "")  # fmt: skip
        what = what or ("whole numbers joined by / (a-b a range)" if key in LIST_KEYS else "a whole number" if key in
                        INTS else "a number")  # fmt: skip
        raise RefError(f"--grid {key.replace('_', '-')}={text}: {text!r} is not {what}") from None


def span(item: str) -> list[int]:
    """`5` -> [5]; `5-7` -> [5, 6, 7]; `7-5` is refused (a RefError naming the range)."""
    lo, _, hi = item.partition("-")
    if hi and int(hi) < int(lo):
        raise RefError(f"{item} is a descending range; write it from low to high ({hi}-{lo})")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]


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
            raise RefError(f"--grid {token!r}: {key} is {why}; grid keys: "
                           f"{', '.join(k.replace('_', '-') for k in GRID_KEYS)}")  # fmt: skip
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


def state(p: Point) -> str:
    """finished (report.json with the point's settings) | started (a checkpoint to resume) | new."""
    folder = Path(p.settings.out)
    run_json = folder / "run.json"
    if not run_json.is_file():
        return "new"
    try:
        recorded = json.loads(run_json.read_text())
        had, ran = recorded["settings"], ran_tox_balance(recorded.get("plan") or {})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RefError(f"{run_json} is damaged: the sweep cannot tell what ran there; move it or use another "
                       "--out") from None  # fmt: skip
    now = compared(asdict(p.settings))
    diff = {k: (had.get(k), v) for k, v in now.items() if had.get(k) != v}
    if diff:
        listed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise RefError(f"{folder} holds a run with other settings ({listed}); rerun the sweep with the settings it "
                       "had, or use another --out")  # fmt: skip
    wanted = tox_balance(p.settings)
    if ran != wanted:  # a run from before --tox-balance existed had the paper's form
        raise RefError(f"{folder} holds a run of the {ran} toxicity balance (a sweep from before --tox-balance), "
                       f"the point's is {wanted}: use another --out")  # fmt: skip
    if (folder / "report.json").is_file():
        return "finished"
    return "started" if (folder / "checkpoint.pt").is_file() else "new"


def run_point(p: Point) -> str:
    """Run (or resume) one point; "done" or "diverged: ..." (a divergence is the point's result, not the sweep's)."""
    folder = Path(p.settings.out)
    started = state(p) == "started"
    s = replace(p.settings, resume=started, overwrite=folder.exists() and not started)
    try:
        unlearn(s)
    except RefError as e:
        if isinstance(e.__cause__, Diverged):
            return f"diverged: {e}"
        raise
    return "done"


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
        rtp = d.get("tasks", {}).get("rtp") or {}  # toxicity: fluency and diversity of the continuations (ref.fluency)
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


def fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


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
    todo = [r for r in rows if r["status"] in ("new", "started")]
    lines = [f"sweep: {base.goal} on {base.model}, {len(rows)} points ({len(todo)} to run)",
             "| # | point | steps | state | estimate |", "|---|---|---|---|---|"]  # fmt: skip
    for i, r in enumerate(rows, 1):
        secs = guess(rows, r)
        when = "" if r not in todo else "unknown" if secs is None else f"{secs:.0f} s"
        lines.append(f"| {i} | {r['name']} | {r['steps'] or 'unknown'} | {r['status']} | {when} |")
    secs = [guess(rows, r) for r in todo]
    if None in secs:
        total = "unknown until the first point finishes (then printed after every point)"
    else:
        total = f"{len(todo)} points, ~{sum(secs) / 60:.1f} min (each method's time a step and the rest of a point, " \
                "from its finished points)"  # fmt: skip
    return "\n".join(lines + [f"time to run: {total}"])


def markdown(rows: list[dict], selection: dict, rule: str, goal: str) -> str:
    """The points table (base row first) and the selection (matched-retain) table."""
    u_name = "expected max toxicity" if goal == "toxicity" else "forget accuracy"
    head = (f"| method | setting | U ({u_name}) | R (retain accuracy) | retain perplexity | fluency ppl | "
            "distinct-2 | S | steps | train s | eval s | status |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    first = next((r["metrics"] for r in rows if r.get("metrics")), None)
    if first:
        lines.append(f"| base | | {fmt(first['U_before'])} | {fmt(first['R_before'])} | {fmt(first['ppl_before'], 2)} "
                     f"| {fmt(first.get('fluency_before'), 2)} | {fmt(first.get('distinct2_before'))} "
                     f"| {fmt(first['S_before'])} | | | | |")  # fmt: skip
    for r in rows:
        m = r.get("metrics") or {}
        status = r["status"].split(":")[0]
        lines.append(f"| {r['method']} | {r['setting']} | {fmt(m.get('U'))} | {fmt(m.get('R'))} | "
                     f"{fmt(m.get('ppl'), 2)} | {fmt(m.get('fluency'), 2)} | {fmt(m.get('distinct2'))} | "
                     f"{fmt(m.get('S'))} | {m.get('steps', r['steps'])} | "
                     f"{fmt(m.get('train_s'), 0)} | {fmt(m.get('eval_s'), 0)} | {status} |")  # fmt: skip
    lines += ["", f"Selected ({rule}):", "", "| method | setting | U | R | retain perplexity | S |", "|" + "---|" * 6]
    for method, r in selection.items():
        if r is None:
            lines.append(f"| {method} | none qualifies | | | | |")
        else:
            m = r["metrics"]
            lines.append(f"| {method} | {r['setting']} | {fmt(m['U'])} | {fmt(m['R'])} | {fmt(m['ppl'], 2)} | "
                         f"{fmt(m['S'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- the sweep


def sweep(base: Settings, grid: dict[str, dict[str, list]], out: Path, budget: float | None = None,
          metric: str = "accuracy", dry_run: bool = False, stop_after: int | None = None) -> dict:  # fmt: skip
    """Check every point, print the plan, run the points not finished, write sweep.json / sweep.md after each, and
    return the sweep's record. `stop_after` stops after running that many points (tests: an interrupted sweep)."""
    cfg = architecture(base.model) if dry_run else read_config(resolve(base.model))  # a dry run downloads nothing
    points = expand(base, grid, out, cfg.num_layers)
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise RefError("--grid gives two points the same settings; remove the repeat")
    data_cache: dict = {}
    rows = []
    for p in points:  # everything checked before the first point runs
        try:
            plan = resolve_plan(p.settings, cfg)
        except RefError as e:
            raise RefError(f"point {p.name}: {e}") from None
        key = (plan.data, tuple(plan.topics or ()))
        if key not in data_cache:
            data_cache[key] = goal_data(plan, dry_run)
        rows.append(dict(method=p.method, setting=setting_name(p.grid), name=p.name, folder=p.settings.out,
                         grid=p.grid, fields=fields_of(p.method, base.goal, p.grid, cfg.num_layers),
                         settings=asdict(p.settings), steps=steps(data_cache[key], plan),
                         status=state(p)))  # fmt: skip
    previous = read_previous(out)
    for r in rows:
        old = previous.get(r["name"])
        if old and old["status"].startswith("diverged") and compared(old["settings"]) == compared(r["settings"]):
            r["status"] = old["status"]  # deterministic: it would diverge again
        if r["status"] == "finished":
            r["metrics"] = measures(Path(r["folder"]))
            if old and "seconds" in old:
                r["seconds"] = old["seconds"]
    print(plan_text(rows, base), flush=True)
    record = dict(model=base.model, goal=base.goal, budget=budget, retain_metric=metric,
                  grid={m: {k: v for k, v in g.items()} for m, g in grid.items()}, points=rows)  # fmt: skip
    if dry_run:
        return record
    out.mkdir(parents=True, exist_ok=True)
    ran = 0
    for i, (p, r) in enumerate(zip(points, rows, strict=True), 1):
        if r["status"] == "finished" or r["status"].startswith("diverged"):
            continue
        if stop_after is not None and ran >= stop_after:
            break
        print(f"point {i}/{len(rows)}: {r['name']}", flush=True)
        t0 = time.time()
        r["status"] = run_point(p)
        r["seconds"] = round(time.time() - t0, 1)
        if r["status"] == "done":
            r["metrics"] = measures(Path(r["folder"]))
        ran += 1
        finish(record, out, budget, metric)
        left = [guess(rows, q) for q in rows if q["status"] in ("new", "started")]
        eta = "" if None in left else f", ~{sum(left) / 60:.1f} min"
        print(f"point {i} {r['status'].split(':')[0]} in {r['seconds']:.0f} s; {len(left)} left{eta}", flush=True)
    finish(record, out, budget, metric)
    return record


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
    record["selection"] = dict(rule=rule_text(budget, metric),
                               selected={m: (r["name"] if r else None) for m, r in selection.items()},
                               settings={m: (r["fields"] if r else None) for m, r in selection.items()})  # fmt: skip
    write_json(out / "sweep.json", record)
    atomic_write_text(out / "sweep.md", markdown(record["points"], selection, rule_text(budget, metric),
                                                 record["goal"]))  # fmt: skip


def read_previous(out: Path) -> dict[str, dict]:
    """The points of an earlier sweep.json in `out` by name ({} without one; a damaged one is an error)."""
    path = out / "sweep.json"
    if not path.is_file():
        return {}
    try:
        return {r["name"]: r for r in json.loads(path.read_text())["points"]}
    except (ValueError, KeyError, TypeError):
        raise RefError(f"{path} is damaged; move it away to start the sweep's record again") from None


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
        raise RefError(f"--from-sweep {path} is a sweep of {record['goal']} on {record['model']}, not {goal} on "
                       f"{model}")  # fmt: skip
    folders = {r["name"]: Path(r["folder"]) for r in record["points"]}
    chosen = {m: f for m, f in record["selection"]["settings"].items() if f is not None}
    if goal == "toxicity" and "ours" in chosen and "tox_balance" not in chosen["ours"]:  # pin the balance it ran
        run_json = folders[record["selection"]["selected"]["ours"]] / "run.json"
        try:
            plan = json.loads(run_json.read_text())["plan"]
        except (OSError, ValueError, KeyError, TypeError):
            raise RefError(f"--from-sweep {path}: {run_json} is missing or damaged, so the toxicity balance of ours' "
                           "selected point is unknown; restore the sweep folder") from None  # fmt: skip
        chosen["ours"] = chosen["ours"] | {"tox_balance": ran_tox_balance(plan)}
    return chosen


def command(argv: list[str] | None) -> int:
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
    p.add_argument("--eval-samples", type=int, default=Settings.eval_samples, help="samples per toxicity prompt")
    p.add_argument("--retain-budget", type=float, default=None, help="select the most forgetting within this retain "
                   "drop (default: select by S-unlearning)")  # fmt: skip
    p.add_argument("--retain-metric", default="accuracy", choices=RETAIN_METRICS,
                   help="the budget's measure: accuracy drop (points) or relative perplexity rise")  # fmt: skip
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--dry-run", action="store_true", help="check every point and print the plan; run nothing")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="skip front.png and layers.png")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.method.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS) or len(set(methods)) != len(methods):
        raise RefError(f"--method is {a.method!r}; name some of {', '.join(METHODS)}, each once")
    validate.number("--retain-budget", a.retain_budget, low=0)
    out = Path(a.out)
    validate.writable_folder("--out", out)
    text = (f"layer={a.layers} " if a.layers else "") + " ".join(a.grid)
    grid = parse_grid(text, methods)
    if a.max_steps is not None and any("max_steps" in g for g in grid.values()):
        raise RefError("max-steps is given by --max-steps and by --grid; give it once")
    base = Settings(model=a.model, goal=a.goal, data=a.data, max_steps=a.max_steps, seed=a.seed,
                    eval_limit=a.eval_limit, eval_samples=a.eval_samples, dtype=a.dtype, device=a.device,
                    compile=a.compile)  # fmt: skip
    sweep(base, grid, out, a.retain_budget, a.retain_metric, dry_run=a.dry_run)
    if a.dry_run:
        return 0
    print((out / "sweep.md").read_text())
    if a.figures:
        from ref.report import write_sweep_figures

        try:
            for path in write_sweep_figures(out):
                print(f"wrote {path}")
        except RefError as e:  # matplotlib missing: the sweep itself is complete
            print(f"note: no figures ({e})", file=sys.stderr)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv)


if __name__ == "__main__":
    sys.exit(main())

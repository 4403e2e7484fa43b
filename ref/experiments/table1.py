"""The paper's Table 1 in one command: base, rmu, adaptive-rmu and ours on both goals for each model, evaluated,
with S-unlearning.

    python -m ref.table1 --models mistral-7b,llama3.1-8b,qwen2.5-7b,olmo3-7b          # GPU box with hub access
    python -m ref.table1 --models smollm2-135m --data demo --max-steps 10              # offline, this CPU

Each run goes to OUT/MODEL/GOAL-METHOD (a normal ref.unlearn run folder; MODEL as folder_names gives it); a run
whose report.json exists is not run again when its run.json names the same model files and settings, and is
refused otherwise. The base row is the "before" evaluation of the runs (the same for every method).
`--from-sweep SWEEP_DIR/sweep.json` (repeatable, one per model and goal) runs each method with the setting that
ref.sweep selected for it (at its retain budget, or by S-unlearning) instead of the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ref.attacks import attack
from ref.attacks.attack import ATTACKS, AttackSettings
from ref.experiments.sweep import compared, selected_settings, sweep_record
from ref.io import validate
from ref.io.checkpoint import model_identity, resolve
from ref.io.cli import run_command
from ref.io.data import GOALS, PROMPTS_TASK, resolve_data_dir
from ref.io.errors import RefError
from ref.io.runlog import atomic_write_text, read_run_json, write_json
from ref.io.tables import cell, markdown_table
from ref.run.plan import METHODS, Settings
from ref.unlearn import unlearn

# goal -> (cell key, column name); toxicity adds the continuations' fluency (mean perplexity under the base model)
# and diversity (distinct-1/2/3), beside the toxicity they qualify (ref.evaluation.fluency)
COLUMNS = {
    "wmdp": (("U", "WMDP acc (U)"), ("R", "retain acc (R)"), ("S", "S")),
    "toxicity": (
        ("U", "toxicity (U)"),
        ("R", "retain acc (R)"),
        ("S", "S"),
        ("fluency", "fluency ppl"),
        ("distinct", "distinct-1/2/3"),
    ),
}


@dataclass(frozen=True)
class Table1Settings:
    """What `python -m ref.table1` runs, as its command line gives it (checked by `check`)."""

    models: tuple[str, ...]  # registry aliases or model folders
    out: Path = Path("runs/table1")
    data: str = "hub"  # hub | demo | a prepared data folder
    max_steps: int | None = None  # a cap on the steps of every run
    eval_samples: int = 25  # samples per toxicity prompt
    eval_limit: int | None = None  # the first N questions / prompts of each task
    compile: bool = True
    attacks: tuple[str, ...] = ()  # ref.attack attacks whose U each unlearned model gets a column for
    from_sweep: tuple[Path, ...] = ()  # sweep.json files whose selected settings replace the defaults


def run_all(s: Table1Settings, chosen: dict | None = None) -> dict:
    """Run what is missing; return {model: {goal: {row: {U, R, S}}}} with rows base, rmu, adaptive-rmu, ours, and,
    with s.attacks, U of each method's unlearned model under each attack (ref.attack, into RUN.attack/).
    `chosen`: {(model, goal): {method: Settings fields}} (a sweep's selection) replacing the defaults. A run folder
    that exists must hold a run of the same model and settings (`check_same_run`), finished (reused) or not (run
    again)."""
    names, runs = folder_names(list(s.models)), []
    for model in s.models:
        source = model_identity(resolve(model))
        for goal in GOALS:
            for method in METHODS:
                run = s.out / names[model] / f"{goal}-{method}"
                fields = (chosen or {}).get((model, goal), {}).get(method, {})
                kw = dict(
                    max_steps=s.max_steps, eval_samples=s.eval_samples, eval_limit=s.eval_limit, compile=s.compile
                )
                settings = Settings(model=model, goal=goal, method=method, data=s.data, out=str(run), **kw | fields)
                if (run / "run.json").is_file():  # every folder checked before the first run starts
                    check_same_run(run, settings, source)
                runs.append(settings)
    table: dict = {}
    for settings in runs:
        run = Path(settings.out)
        if not (run / "report.json").exists():
            unlearn(replace(settings, overwrite=run.exists()))
        report = json.loads((run / "report.json").read_text())
        rows = table.setdefault(settings.model, {}).setdefault(settings.goal, {})
        rows.setdefault("base", cells(report["details"]["before"]))
        rows[settings.method] = cells(report["details"]["after"]) | attacked(run, s)
    return table


def check_same_run(run: Path, settings: Settings, source: dict) -> None:
    """The run in `run` was made from the files of settings.model (`model_identity`) with the same settings (the model
    as named may differ: the same folder named otherwise); else a one-line error naming both."""
    recorded = read_run_json(run)
    had = recorded.get("source")
    if had is None:
        raise RefError(
            f"{run / 'run.json'} was written by another version of ref (it names no source): use another --out"
        )
    if had["folder"] != source["folder"]:
        raise RefError(
            f"{run} holds a run of {had['folder']}, not of {source['folder']} (--models {settings.model}): "
            "use another --out"
        )
    if had != source:
        raise RefError(
            f"{run} holds a run of {source['folder']} whose files changed since (config.json or a shard): "
            "use another --out to run it again"
        )
    now = {k: v for k, v in compared(asdict(settings)).items() if k != "model"}
    diff = {k: (recorded["settings"].get(k), v) for k, v in now.items() if recorded["settings"].get(k) != v}
    if diff:
        listed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise RefError(f"{run} holds a run with other settings ({listed}): use another --out, or the settings it had")


def attacked(run: Path, s: Table1Settings) -> dict[str, float | str | None]:
    """{"U after ATTACK": the unlearned model's U under its strongest setting (the largest U: the most recovered)},
    and "worst recovery": the run's robustness figure over those attacks (ref.attacks.recovery.worst_case: the largest
    net recovery of U, and which attack). An attack that does not apply to the run (ref.attacks.attack.why_not) is not
    run and its cell stays empty."""
    if not s.attacks:
        return {}
    out = run.with_name(run.name + ".attack")  # beside the run: its folder holds only what ref.unlearn writes
    names = tuple(a for a in s.attacks if a in attack.applicable(run))
    if names and not (out / "attack.json").exists():
        attack.attack(AttackSettings(run, out, names, eval_samples=s.eval_samples, limit=s.eval_limit))
    report = json.loads((out / "attack.json").read_text()) if names else dict(attacks={}, worst_case=None)

    def strongest(results: dict) -> float | None:
        return max((r["unlearned"]["U"] for r in results.values() if r["unlearned"]["U"] is not None), default=None)

    cells = {f"U after {name}": strongest(report["attacks"].get(name, {})) for name in s.attacks}
    w = report["worst_case"]
    return cells | {"worst recovery": None if w is None else f"{w['net_recovery']:.3f} ({w['attack']} {w['setting']})"}


def folder_names(models: list[str]) -> dict[str, str]:
    """Each model's folder under --out: an alias as is, a hub id with '/' as '--', a local folder by its last path
    component, or by as many of its last components (joined by '--') as tell it from the others."""
    local = {m: Path(os.path.abspath(Path(m).expanduser())).parts[1:] for m in models if Path(m).expanduser().is_dir()}
    for k in range(1, max(map(len, local.values()), default=1) + 1):
        names = {m: "--".join(local[m][-k:]) if m in local else m.replace("/", "--") for m in models}
        if len(set(names.values())) == len(models):
            return names
    twice = sorted(m for m in models if list(names.values()).count(names[m]) > 1)
    raise RefError(f"--models names the same model twice ({', '.join(twice)}); name each once")


def cells(report: dict) -> dict:
    """U, R, S of one evaluation; with the toxicity prompts, also the continuations' fluency (mean perplexity) and
    distinct-1/2/3."""
    s = report.get("s_unlearning") or {}
    out = dict(U=s.get("u"), R=s.get("r"), S=s.get("s"))
    tox = report["tasks"].get(PROMPTS_TASK)
    if tox:
        out |= dict(fluency=tox["fluency_perplexity"], distinct=[tox[f"distinct_{n}"] for n in (1, 2, 3)])
    return out


DIGITS = {"fluency": 1, "distinct": 2}  # decimals of a cell (3 unless named here)


def markdown(table: dict, attacks: list[str] = ()) -> str:
    extra = [f"U after {a}" for a in attacks] + (["worst recovery"] if attacks else [])
    keys = {g: [k for k, _ in COLUMNS[g]] + extra for g in GOALS}
    header = ["model", "method", *(f"{g}: {c}" for g in GOALS for c in [c for _, c in COLUMNS[g]] + extra)]
    rows = []
    for model, goals in table.items():
        for row in ("base", *METHODS):
            values = [cell(goals.get(g, {}).get(row, {}).get(k), DIGITS.get(k, 3)) for g in GOALS for k in keys[g]]
            rows.append([model, row, *values])
    return markdown_table(header, rows) + "\n"


# -------------------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    d = Table1Settings(models=())  # the defaults
    p = argparse.ArgumentParser(prog="python -m ref.table1", description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="comma-separated registry aliases or model folders")
    p.add_argument("--data", default=d.data, help="hub | demo | a prepared data folder")
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--max-steps", type=int, default=None, help="cap on the steps of every run")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="samples per toxicity prompt")
    p.add_argument("--eval-limit", type=int, default=None, help="first N questions / prompts of each task")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--attacks", default="", help="add U under these ref.attack attacks (e.g. relearn,quantize)")
    p.add_argument(
        "--from-sweep",
        type=Path,
        action="append",
        default=[],
        help="a sweep.json of ref.sweep: each method runs with the setting the sweep selected (repeatable: one per "
        "model and goal)",
    )
    return p


def settings_from(a: argparse.Namespace) -> Table1Settings:
    """The command line's Table1Settings (`check` checks the values)."""
    models = tuple(m.strip() for m in a.models.split(",") if m.strip())
    if not models:
        raise RefError(f"--models is {a.models!r}; name at least one model, e.g. --models smollm2-135m")
    attacks = tuple(x.strip() for x in a.attacks.split(",") if x.strip())
    if set(attacks) - set(ATTACKS):
        raise RefError(f"--attacks is {a.attacks!r}; use some of {', '.join(ATTACKS)}")
    given = vars(a) | dict(models=models, attacks=attacks, from_sweep=tuple(a.from_sweep))
    return Table1Settings(**{f.name: given[f.name] for f in fields(Table1Settings)})  # each field is its option


def check(s: Table1Settings) -> None:
    """Every value of `s` in range, --out writable, every model and the data found (one RefError line)."""
    validate.positive("--max-steps", s.max_steps, integer=True)
    validate.positive("--eval-samples", s.eval_samples, integer=True)
    validate.positive("--eval-limit", s.eval_limit, integer=True)
    validate.writable_folder("--out", s.out)
    for model in s.models:  # a wrong name fails now, not after hours of runs (a hub model is downloaded now)
        resolve(model)
    if s.data not in ("hub", "demo"):
        resolve_data_dir(s.data)


def sweep_choices(s: Table1Settings) -> dict:
    """{(model, goal): {method: Settings fields}}: the setting each --from-sweep sweep selected for each method."""
    chosen = {}
    for path in s.from_sweep:
        record = sweep_record(path)
        key = (record["model"], record["goal"])
        if key[0] not in s.models or key in chosen:
            raise RefError(f"--from-sweep {path} is a sweep of {key[0]} ({key[1]}): not in --models, or a second one")
        chosen[key] = selected_settings(path, *key)
        if s.max_steps is not None and any("max_steps" in f for f in chosen[key].values()):
            raise RefError(f"--max-steps and the sweep {path} both set max-steps; give it once")
    return chosen


def table1(s: Table1Settings) -> dict:
    """Check `s`, run what is missing and write table1.json and table1.md into s.out; returns the table."""
    check(s)
    table = run_all(s, sweep_choices(s))
    md = markdown(table, list(s.attacks))
    write_json(s.out / "table1.json", table)
    atomic_write_text(s.out / "table1.md", md)
    print(md)
    return table


def command(argv: list[str] | None) -> int:
    table1(settings_from(parser().parse_args(argv)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv)

"""The paper's Table 1 in one command: base, rmu, adaptive-rmu and ours on both goals for each model, evaluated,
with S-unlearning.

    python -m ref.table1 --models mistral-7b,llama3.1-8b,qwen2.5-7b,olmo3-7b          # GPU box with hub access
    python -m ref.table1 --models smollm2-135m --data demo --max-steps 10              # offline, this CPU

Each run goes to OUT/MODEL/GOAL-METHOD (a normal ref.unlearn run folder; MODEL as folder_name gives it); a run
whose report.json exists is not run again. The base row is the "before" evaluation of the runs (the same for
every method). `--from-sweep SWEEP_DIR/sweep.json` (repeatable, one per model and goal) runs each method with the
setting that ref.sweep selected for it (at its retain budget, or by S-unlearning) instead of the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ref import attack, validate
from ref.attack import ATTACKS, AttackSettings
from ref.checkpoint import resolve
from ref.cli import run_command
from ref.data import PROMPTS_TASK, resolve_data_dir
from ref.errors import RefError
from ref.runlog import atomic_write_text, write_json
from ref.sweep import selected_settings, sweep_record
from ref.unlearn import GOALS, METHODS, Settings, unlearn

# goal -> (cell key, column name); toxicity adds the continuations' fluency (mean perplexity under the base model)
# and diversity (distinct-1/2/3), beside the toxicity they qualify (ref.fluency)
COLUMNS = {
    "wmdp": (("U", "WMDP acc (U)"), ("R", "retain acc (R)"), ("S", "S")),
    "toxicity": (("U", "toxicity (U)"), ("R", "retain acc (R)"), ("S", "S"), ("fluency", "fluency ppl"),
                 ("distinct", "distinct-1/2/3")),
}  # fmt: skip


def run_all(models: list[str], out: Path, data: str, max_steps: int | None, extra: dict,
            attacks: list[str] = (), chosen: dict | None = None) -> dict:  # fmt: skip
    """Run what is missing; return {model: {goal: {row: {U, R, S}}}} with rows base, rmu, adaptive-rmu, ours, and,
    with `attacks`, U of each method's unlearned model under each attack (ref.attack, into RUN.attack/).
    `chosen`: {(model, goal): {method: Settings fields}} (a sweep's selection) replacing the defaults."""
    table: dict = {}
    for model in models:
        for goal in GOALS:
            for method in METHODS:
                run = out / folder_name(model) / f"{goal}-{method}"
                fields = (chosen or {}).get((model, goal), {}).get(method, {})
                if not (run / "report.json").exists():
                    s = Settings(model=model, goal=goal, method=method, data=data, out=str(run),
                                 overwrite=run.exists(), **{"max_steps": max_steps, **extra, **fields})  # fmt: skip
                    unlearn(s)
                elif fields:
                    had = json.loads((run / "run.json").read_text())["settings"]
                    if any(had.get(k) != v for k, v in fields.items()):
                        raise RefError(f"{run} was run with other settings than the sweep selected; use another --out")
                report = json.loads((run / "report.json").read_text())
                rows = table.setdefault(model, {}).setdefault(goal, {})
                rows.setdefault("base", cells(report["details"]["before"]))
                rows[method] = cells(report["details"]["after"]) | attacked(run, attacks, extra)
    return table


def attacked(run: Path, attacks: list[str], extra: dict) -> dict[str, float | str | None]:
    """{"U after ATTACK": the unlearned model's U under its strongest setting (the largest U: the most recovered)},
    and "worst recovery": the run's robustness figure over those attacks (ref.recovery.worst_case: the largest net
    recovery of U, and which attack). An attack that does not apply to the run (ref.attack.why_not) is not run and
    its cell stays empty."""
    if not attacks:
        return {}
    out = run.with_name(run.name + ".attack")  # beside the run: its folder holds only what ref.unlearn writes
    names = tuple(a for a in attacks if a in attack.applicable(run))
    if names and not (out / "attack.json").exists():
        limit = extra.get("eval_limit")
        attack.attack(AttackSettings(run, out, names, eval_samples=extra["eval_samples"], limit=limit))
    report = json.loads((out / "attack.json").read_text()) if names else dict(attacks={}, worst_case=None)

    def strongest(results: dict) -> float | None:
        return max((r["unlearned"]["U"] for r in results.values() if r["unlearned"]["U"] is not None), default=None)

    cells = {f"U after {name}": strongest(report["attacks"].get(name, {})) for name in attacks}
    w = report["worst_case"]
    return cells | {"worst recovery": None if w is None else f"{w['net_recovery']:.3f} ({w['attack']} {w['setting']})"}


def folder_name(model: str) -> str:
    """An alias as is, a local folder by its last component, a hub id with '/' as '--'."""
    path = Path(model).expanduser()
    return path.name if path.is_dir() else model.replace("/", "--")


def cells(report: dict) -> dict:
    """U, R, S of one evaluation; with the toxicity prompts, also the continuations' fluency (mean perplexity) and
    distinct-1/2/3."""
    s = report.get("s_unlearning") or {}
    out = dict(U=s.get("u"), R=s.get("r"), S=s.get("s"))
    tox = report["tasks"].get(PROMPTS_TASK)
    if tox and "fluency_perplexity" in tox:
        out |= dict(fluency=tox["fluency_perplexity"], distinct=[tox[f"distinct_{n}"] for n in (1, 2, 3)])
    return out


def fmt(v) -> str:
    """A cell: "-" when missing, text as it is, a list as a/b/c, a number with 3 decimals (a perplexity with 1)."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return "/".join(f"{x:.2f}" for x in v)
    return f"{v:.1f}" if v >= 10 else f"{v:.3f}"


def markdown(table: dict, attacks: list[str] = ()) -> str:
    extra = [f"U after {a}" for a in attacks] + (["worst recovery"] if attacks else [])
    keys = {g: [k for k, _ in COLUMNS[g]] + extra for g in GOALS}
    names = {g: [c for _, c in COLUMNS[g]] + extra for g in GOALS}
    head = "| model | method | " + " | ".join(f"{g}: {c}" for g in GOALS for c in names[g]) + " |"
    lines = [head, "|" + "---|" * (2 + sum(len(k) for k in keys.values()))]
    for model, goals in table.items():
        for row in ("base", *METHODS):
            vals = [fmt(goals.get(g, {}).get(row, {}).get(k)) for g in GOALS for k in keys[g]]
            lines.append(f"| {model} | {row} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def command(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m ref.table1", description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="comma-separated registry aliases or model folders")
    p.add_argument("--data", default="hub", help="hub | demo | a prepared data folder")
    p.add_argument("--out", default="runs/table1")
    p.add_argument("--max-steps", type=int, default=None, help="cap on the steps of every run")
    p.add_argument("--eval-samples", type=int, default=25, help="samples per toxicity prompt")
    p.add_argument("--eval-limit", type=int, default=None, help="first N questions / prompts of each task")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--attacks", default="", help="add U under these ref.attack attacks (e.g. relearn,quantize)")
    p.add_argument("--from-sweep", action="append", default=[], help="a sweep.json of ref.sweep: each method runs "
                   "with the setting the sweep selected (repeatable: one per model and goal)")  # fmt: skip
    a = p.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not models:
        raise RefError(f"--models is {a.models!r}; name at least one model, e.g. --models smollm2-135m")
    validate.positive("--max-steps", a.max_steps, integer=True)
    validate.positive("--eval-samples", a.eval_samples, integer=True)
    validate.positive("--eval-limit", a.eval_limit, integer=True)
    out = Path(a.out)
    validate.writable_folder("--out", out)
    for model in models:  # a wrong name fails now, not after hours of runs (a hub model is downloaded now)
        resolve(model)
    if a.data not in ("hub", "demo"):
        resolve_data_dir(a.data)
    extra = dict(eval_samples=a.eval_samples, eval_limit=a.eval_limit, compile=a.compile)
    attacks = [x.strip() for x in a.attacks.split(",") if x.strip()]
    if set(attacks) - set(ATTACKS):
        raise RefError(f"--attacks is {a.attacks!r}; use some of {', '.join(ATTACKS)}")
    chosen = {}
    for path in a.from_sweep:
        record = sweep_record(path)
        key = (record["model"], record["goal"])
        if key[0] not in models or key in chosen:
            raise RefError(f"--from-sweep {path} is a sweep of {key[0]} ({key[1]}): not in --models, or a second one")
        chosen[key] = selected_settings(path, *key)
        if a.max_steps is not None and any("max_steps" in f for f in chosen[key].values()):
            raise RefError(f"--max-steps and the sweep {path} both set max-steps; give it once")
    table = run_all(models, out, a.data, a.max_steps, extra, attacks, chosen)
    md = markdown(table, attacks)
    write_json(out / "table1.json", table)
    atomic_write_text(out / "table1.md", md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv)


if __name__ == "__main__":
    sys.exit(main())

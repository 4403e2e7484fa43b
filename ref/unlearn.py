"""Unlearning: RMU, Adaptive RMU, and the paper's goal-dependent objectives, from the command line.

    python -m ref.unlearn --model mistral-7b --goal wmdp                       # the paper's method (ours)
    python -m ref.unlearn --model smollm2-135m --goal toxicity --data demo --out runs/t

The settings are resolved once into a plan (ref.run.plan), the loop is ref.train, the objectives ref.objectives. This
file sets up around them: the run folder, data, model, probes, resume, Ctrl-C, evaluation and the summary.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import platform
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ref.config import DTYPES, ModelConfig
from ref.io import validate
from ref.io.checkpoint import load_model, load_rest, model_identity, resolve, save_model, shard_files
from ref.io.cli import run_command
from ref.io.config_json import config_from_dict, read_config
from ref.io.data import GOALS, GoalData, load_goal_data, load_probe, prepared_hub_dir, resolve_data_dir
from ref.io.errors import DiskFull, RefError
from ref.io.registry import REGISTRY, paper_final_alpha
from ref.io.runlog import (
    MetricsLog,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    check_replaceable,
    clear_run_folder,
    holds_files,
    read_metrics,
    read_run_json,
    write_json,
)
from ref.io.tables import markdown_table
from ref.io.tokenizer import load_tokenizer
from ref.io.validate import same_or_inside
from ref.model import Transformer
from ref.objectives import random_directions
from ref.probe import Probe, fit_layer_probes
from ref.run.options import add_arguments, resumable
from ref.run.plan import (
    BALANCE_WORDS,
    METHODS,
    REDUCTION_WORDS,
    Plan,
    Settings,
    as_dict,
    describe,
)
from ref.run.plan import resolve as resolve_plan
from ref.train import Run, TrainState, schedule, start_state, train

__all__ = ["GOALS", "METHODS", "Settings", "unlearn", "main"]


def unlearn(settings: Settings, stop_after_step: int | None = None) -> tuple[Run, TrainState, GoalData]:
    """Run (or resume) an unlearning run into settings.out. Everything that can fail before training is checked or
    done (settings, data, the run folder, the disk, the model's config and every shard's header, the tokenizer, the
    probes) before anything in --out is created or replaced. `stop_after_step` simulates an interruption after that
    many steps (tests)."""
    folder = resolve(settings.model)
    cfg = read_config(folder)
    plan = resolve_plan(settings, cfg)
    torch.manual_seed(plan.seed)
    data = load_goal_data(
        resolve_data_dir(plan.data, goal=plan.goal),
        plan.goal,
        topics=plan.topics,
        allow_outside=plan.allow_data_outside,
    )
    if plan.probe_file:
        path = Path(plan.probe_file)
        data.probe, data.probe_path, data.probe_source = load_probe(path), path, f"{path} (--probe-file)"
    if plan.tox_layers and not data.probe:
        raise RefError(
            f"the toxicity manifest of {plan.data} names no probe data: add a 'probe' file, or pass --probe-file"
        )
    steps = schedule(data, plan)
    out, ckpt = Path(settings.out), Path(settings.out) / "checkpoint.pt"
    check_out(out, settings, [("model", folder), ("data", data.root)], disk_needed(folder, cfg, plan, out))
    checkpoint, resumes = resume_point(out, plan, len(steps)) if settings.resume else (None, [])
    print(describe(plan, cfg, len(steps)), flush=True)
    model = load_model(folder, dtype=plan.dtype, device=plan.device, blocks=plan.loaded_blocks)
    tok = load_tokenizer(folder)
    run_json = dict(
        settings=asdict(settings),
        plan=as_dict(plan),
        versions=versions(),
        steps=len(steps),
        model_type=model.config.model_type,
        source=model_identity(folder),
        resumes=resumes,
    )
    probes = fit_probes(plan, model, tok, data)
    if probes:
        run_json["probe_data"] = probe_provenance(data)
        run_json["probe_auc"] = {
            i: dict(
                heldout_auc=p.heldout_auc,
                train_auc=p.train_auc,
                l2=p.l2,
                cv_auc=p.cv_auc,
                weight_norm=float(p.weight.float().norm()),
            )
            for i, p in probes.items()
        }
    if settings.overwrite and out.is_dir():
        clear_run_folder(out)  # only now: nothing before training is left to fail
    u = random_directions(list(data.forget), cfg.hidden_size, plan.seed, model_device(model), plan.u_distribution)
    run = Run(plan, model, tok, u, probe_directions(probes, plan, model_device(model)))
    state = start_state(plan, model)
    if checkpoint is not None:
        state.load_state_dict(checkpoint, lr=plan.lr)
    saved = [state.step] if checkpoint is not None else []  # the steps of the intact checkpoints

    def save() -> None:
        atomic_torch_save(ckpt, state.state_dict())
        saved.append(state.step)

    with advice_on_full_disk(ckpt, saved):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", run_json)
        if probes:
            atomic_write_bytes(out / "probes.safetensors", safetensors_bytes(probe_tensors(probes)))
        log = MetricsLog(out / "metrics.jsonl", keep_until_step=state.step)
        if checkpoint is None:
            save()  # step 0: a divergence at the first step still leaves a checkpoint to continue from
        with stop_on_ctrl_c() as interrupted:
            stop = lambda k: interrupted() or (stop_after_step is not None and k >= stop_after_step)
            train(run, state, steps, log.append, save, stop, str(ckpt))
        finish(run, state, data, out, log.rows(), run_json)
    return run, state, data


@contextmanager
def advice_on_full_disk(ckpt: Path, saved: list[int]) -> Iterator:
    """Inside: a full disk (DiskFull) ends in one line naming what was being written and what is left to resume from:
    the last checkpoint in `saved` (every write is atomic, so it is intact)."""
    try:
        yield
    except DiskFull as e:
        if not saved:
            left = "no checkpoint was written yet: free some space and run again with --overwrite"
        else:
            left = f"the checkpoint of step {saved[-1]} in {ckpt} is intact: free some space and rerun with --resume"
        raise RefError(f"disk full while writing {e.path}; {left}") from e


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_out(out: Path, settings: Settings, sources: list[tuple[str, Path]], need_bytes: int) -> None:
    """--out: never the model or data folder (or inside or around one), a writable folder with room for the run,
    and, when it exists, continued (--resume), replaced when it is a run folder of ours (--overwrite), else refused."""
    for what, source in sources:
        if same_or_inside(out, source) or same_or_inside(source, out):
            raise RefError(
                f"--out {out} overlaps the {what} folder {source}: the run would write into or replace "
                "source files; choose another --out"
            )
    validate.writable_folder("--out", out, need_bytes)
    exists = holds_files(out)
    if settings.resume and not exists:
        raise RefError(f"nothing to resume in {out}: run without --resume")
    if exists and settings.overwrite:
        check_replaceable(out)
    elif exists and not settings.resume:
        raise RefError(f"output folder {out} already exists: pass --resume to continue it or --overwrite")


def disk_needed(folder: Path, cfg: ModelConfig, plan: Plan, out: Path) -> int:
    """Bytes the run writes: two checkpoints at once (the new one before the old is replaced: the trained tensors
    and two AdamW states each), updated.safetensors, and model/ (the shards holding a trained tensor rewritten, the
    others hard-linked, or copied when --out is on another disk than the model)."""
    bytes_per = torch.finfo(DTYPES[plan.dtype] if plan.dtype else torch.float32).bits // 8
    with torch.device("meta"):
        numel = dict((k, p.numel()) for k, p in Transformer(cfg).named_parameters())
    trained = sum(numel[k] for k in plan.tensors) * bytes_per
    where = shard_files(folder)
    rewritten = {where[k] for k in plan.tensors}
    existing = next(p for p in (out, *out.parents) if p.exists())
    same_disk = os.stat(existing).st_dev == os.stat(folder).st_dev
    shards = sum(p.stat().st_size for p in set(where.values()) if p in rewritten or not same_disk)
    return 2 * 3 * trained + trained + shards


def resume_point(out: Path, plan: Plan, n_steps: int) -> tuple[dict, list]:
    """(checkpoint state, the resume history for run.json) for --resume, after checking that the run can be continued
    with this plan: the settings that shape the trajectory are the same and the checkpoint is readable."""
    run = read_run_json(out)
    before = run.get("plan")
    if before is None:
        raise RefError(f"{out / 'run.json'} was written by another version of ref (it has no plan); use another --out")
    ckpt = out / "checkpoint.pt"
    if not ckpt.is_file():
        raise RefError(f"nothing to resume in {out}: no checkpoint.pt; start again with --overwrite")
    try:
        state = torch.load(ckpt, weights_only=True)
        step, tensors = int(state["step"]), set(state["updated"])
    except Exception as e:
        raise RefError(
            f"{ckpt} is damaged ({type(e).__name__}); the run cannot be continued from it: start again with --overwrite"
        ) from None
    now = as_dict(plan)
    unknown = [k for k in now if k not in before]
    if unknown:
        raise RefError(
            f"{out / 'run.json'} was written by another version of ref (its plan has no "
            f"{', '.join(unknown)}): this version cannot continue it; start again with --overwrite or in "
            "another --out"
        )
    changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
    fixed = [k for k in changed if k not in RESUMABLE]
    if fixed:
        listed = ", ".join(f"{option_name(k)} ({changed[k][0]} -> {changed[k][1]})" for k in fixed)
        raise RefError(
            f"--resume with settings that shape the run changed: {listed}; use the original values, or "
            "start a new run in another --out"
        )
    lr_before, lr_now = before.get("lr"), plan.lr
    if lr_before is not None and lr_now > lr_before:
        raise RefError(
            f"--resume with --lr {lr_now:g}, higher than the run's {lr_before:g}: a resumed run may only lower the "
            "learning rate (after a divergence); to train at a higher one, start a new run in another --out"
        )
    if tensors != set(plan.tensors):
        raise RefError(
            f"{ckpt} holds {sorted(tensors)}, not the plan's tensors: it belongs to another run; start "
            "again with --overwrite"
        )
    if (out / "metrics.jsonl").is_file():
        read_metrics(out / "metrics.jsonl")  # a damaged line is refused here, before run.json records the resume
    if step > n_steps:
        raise RefError(
            f"the checkpoint is at step {step} but this plan has {n_steps} steps; raise --max-steps or "
            "--epochs to at least that"
        )
    history = run.get("resumes", []) + [dict(at_step=step, changed={k: list(v) for k, v in changed.items()})]
    if changed:
        print(
            f"resuming at step {step} with "
            + ", ".join(f"{option_name(k)} {a} -> {b}" for k, (a, b) in changed.items()),
            flush=True,
        )
    return state, history


# Plan values a resumed run may change (recorded in run.json "resumes"), the options marked `resume`: a lower lr after
# a divergence (never a higher one), more steps, how often to save, and how to evaluate. Everything else shapes the
# trajectory and must stay.
RESUMABLE = resumable(Settings)


def option_name(field: str) -> str:
    """The command-line option of a plan field (the derived taps and tensors keep their name)."""
    return field if field in ("taps", "tensors") else f"--{field.replace('_', '-')}"


def fit_probes(plan: Plan, model: Transformer, tok, data: GoalData) -> dict[int, Probe]:
    """The probes of eq. 6 (ours on toxicity; else none), fitted on the original weights (before a resumed checkpoint
    is loaded, so a resumed run gets the same probes)."""
    if not plan.tox_layers:
        return {}
    kw = dict(max_len=plan.max_len, batch_size=plan.batch_size * 4, seed=plan.seed, l2=plan.probe_l2)
    return fit_layer_probes(model, tok, data.probe, plan.tox_layers, **kw)


def probe_directions(probes: dict[int, Probe], plan: Plan, device: torch.device) -> torch.Tensor | None:
    """The w_i of eq. 6 [L, D]: the probes' unit directions (or raw weights with --raw-probe-weights); None without
    probes."""
    if not probes:
        return None
    rows = [(p.weight if plan.raw_probe_weights else p.direction) for p in probes.values()]
    return torch.stack(rows).float().to(device)


def probe_provenance(data: GoalData) -> dict:
    """What the probes of eq. 6 were trained on: the file, its sha256 and counts, and its source in words (the paper
    trained them on TRuST's human-annotated training split)."""
    path, source = data.probe_path, data.probe_source or "not stated (the data manifest has no probe_source)"
    return dict(
        file=str(path),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        texts=len(data.probe),
        toxic=sum(label for _, label in data.probe),
        source=source,
    )


def probe_tensors(probes: dict[int, Probe]) -> dict[str, torch.Tensor]:
    """probes.safetensors: layer{i}.weight [D] and layer{i}.bias [1], fp32."""
    out = {f"layer{i}.weight": p.weight.float().contiguous() for i, p in probes.items()}
    return out | {f"layer{i}.bias": torch.tensor([p.bias], dtype=torch.float32) for i, p in probes.items()}


@contextmanager
def stop_on_ctrl_c() -> Iterator:
    """Inside: Ctrl-C only raises a flag (the loop stops between steps, so the checkpoint is at a step boundary)."""
    pressed = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True)) if main else None
    try:
        yield lambda: bool(pressed)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def alpha_trajectory(alpha0: float, rows: list[dict]) -> dict[str, float]:
    """The policy's mean alpha exp(mu) over a run, from alpha0 through each step's logged `policy_mean`: start, end,
    min and max."""
    path = [alpha0, *(r["policy_mean"] for r in rows if "policy_mean" in r)]
    return dict(start=path[0], end=path[-1], min=min(path), max=max(path))


def versions() -> dict:
    import numpy
    import safetensors
    import tokenizers

    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        numpy=numpy.__version__,
        safetensors=safetensors.__version__,
        tokenizers=tokenizers.__version__,
    )


def finish(run: Run, st: TrainState, data: GoalData, out: Path, rows: list[dict], run_json: dict) -> None:
    """Write updated.safetensors, the HF-format model/ folder, report.json (unless --no-eval) and summary.md; run.json
    gains the steering coefficients Adaptive RMU computed (topic -> c)."""
    if any(st.calibration.values()):  # Adaptive RMU's c, the scaled eq. 6's divisors: topic -> {field: value}
        run_json["calibration"] = {t: dict(c) for t, c in st.calibration.items()}
    if st.policy:
        paper = paper_final_alpha(run.plan.model, run.plan.goal)
        run_json["alpha_trajectory"] = alpha_trajectory(run.plan.alpha0, rows) | dict(paper_final_alpha=paper)
    write_json(out / "run.json", run_json)
    updated = {k: p.detach().cpu().contiguous() for k, p in st.params.items()}
    atomic_write_bytes(out / "updated.safetensors", safetensors_bytes(updated))
    save_model(run.model, out / "model", replaced=dict(st.params))
    report = evaluate_before_after(run, st, data) if run.plan.evaluate else None  # reads the blocks above the taps
    if report is not None:
        if run.plan.log_samples:  # --log-samples: one row a question / prompt, "model" before or after
            from ref.evaluation.evaluate import write_samples

            records = [{"model": k, **r} for k in ("before", "after") for r in report["details"][k].pop("samples")]
            write_samples(out / "samples.jsonl", records)
        write_json(out / "report.json", report)
    atomic_write_text(out / "summary.md", summary(run, st, rows, run_json, report))


@torch.no_grad()
def evaluate_before_after(run: Run, st: TrainState, data: GoalData) -> dict:
    """Evaluate the base model (the original values put back in place) and the unlearned one on the goal's tasks."""
    from ref.evaluation.evaluate import available_tasks, evaluate, fluency_reading, headline
    from ref.evaluation.scorers import make_scorer, scorer_info
    from ref.io.data import PROMPTS_TASK

    plan = run.plan
    load_rest(run.model)
    # a separate, frozen copy, loaded once when first needed: the probe scorer's base and the fluency reference
    base = functools.cache(lambda: load_model(plan.model, dtype=plan.dtype, device=plan.device))
    tasks = list(available_tasks(data))
    scorer = make_scorer(data, plan.goal, tasks, base, run.tok, seed=plan.seed, device=plan.device)
    reference = base() if PROMPTS_TASK in tasks else None
    kw = dict(
        limit=plan.eval_limit,
        samples=plan.eval_samples,
        greedy=plan.eval_greedy,
        seed=plan.seed,
        scorer=scorer,
        log_samples=plan.log_samples,
        reference=reference,
        reference_name=plan.model,
    )
    trained = {k: t.detach().clone() for k, t in st.params.items()}
    for k, t in st.params.items():
        t.copy_(st.originals[k])
    # the originals put back: the model is the base, so it scores its own continuations' fluency as it samples them
    before = evaluate(run.model, run.tok, data, plan.goal, **(kw | dict(reference=run.model if reference else None)))
    for k, t in st.params.items():
        t.copy_(trained[k])
    after = evaluate(run.model, run.tok, data, plan.goal, **kw)
    return dict(
        goal=plan.goal,
        method=plan.method,
        model=plan.model,
        scorer=scorer_info(scorer, plan.model),
        before=headline(before),
        after=headline(after),
        details=dict(before=before, after=after),
        **fluency_reading(before, after),
    )


def summary(run: Run, st: TrainState, rows: list[dict], run_json: dict, report: dict | None = None) -> str:
    """summary.md: the run in a few lines, the losses at the start and the end, and the before/after table."""
    lines = [f"# Unlearning run: {run.plan.method} on {run.plan.goal}", "", *run_lines(run.plan, st, rows, run_json)]
    lines += ["", loss_table(rows)]
    lines += [
        "",
        "retain_share: alpha * L_R / (L_F + alpha * L_R), the weighted retain term's share of eq. 1's loss; "
        "moved_share: the share of the trained tensors' elements a step changed in the model's dtype.",
    ]
    if "probe_auc" in run_json:
        aucs = [
            f"{i}: {a['heldout_auc']:.3f} (L2 {a['l2']:g}, |w| {a['weight_norm']:.3g})"
            for i, a in run_json["probe_auc"].items()
        ]
        lines += ["", "Probe held-out AUC per layer: " + ", ".join(aucs)]
    if report is not None:
        lines += evaluation_lines(report)
    if rows:
        lines += ["", f"Training time: {rows[-1]['elapsed_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def run_lines(plan: Plan, st: TrainState, rows: list[dict], run_json: dict) -> list[str]:
    """The run in a few lines: model, data, steps, trained tensors, taps, alpha, the objective's options."""
    traj = run_json.get("alpha_trajectory")
    alpha = f"fixed {plan.alpha:g}" if plan.alpha is not None else "REINFORCE"
    if traj:
        alpha = (
            f"REINFORCE; the policy's mean alpha: start {traj['start']:.4g}, end {traj['end']:.4g}, min "
            f"{traj['min']:.4g}, max {traj['max']:.4g}"
        )
        if traj["paper_final_alpha"] is not None:
            alpha += f"; the paper's final alpha for this model: {traj['paper_final_alpha']:g}"
    lines = [
        f"- model: `{plan.model}`, data: `{plan.data}`, steps: {len(rows)}, seed {plan.seed}",
        f"- updated tensors: {', '.join(plan.tensors)}",
        f"- taps: {list(plan.taps)}",
        f"- alpha: {alpha}",
        f"- token reduction: {REDUCTION_WORDS[plan.token_reduction]}",
        f"- master weights: {plan.master_weights}",
    ]
    if plan.tox_balance:
        balance = BALANCE_WORDS[plan.tox_balance]
        lines.append(f"- toxicity balance: {balance}; eq. 5 {plan.tox_retain_reduction}med over the probed layers")
    if "probe_data" in run_json:
        lines.append(f"- probe data: {run_json['probe_data']['source']} ({run_json['probe_data']['texts']} texts)")
    steering = {t: c["steering"] for t, c in st.calibration.items() if "steering" in c}
    if steering:
        values = ", ".join(f"{t} {c:.4g}" for t, c in steering.items())
        lines.append(f"- steering c (Adaptive RMU, beta {plan.beta:g}): {values}")
    return lines


def loss_table(rows: list[dict]) -> str:
    """The losses, alpha, eq. 1's retain share, the moved share and the speed, averaged over the first and the last
    10% of the steps."""

    def mean(key, part):
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else math.nan

    head, tail = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10) :]
    share = lambda r: r["alpha"] * r["retain_loss"] / r["loss"] if r["loss"] > 0 else math.nan
    head, tail = ([r | {"retain_share": share(r)} for r in part] for part in (head, tail))  # alpha L_R / L of eq. 1
    keys = ("loss", "forget_loss", "retain_loss", "alpha", "retain_share", "moved_share", "tokens_per_s")
    table = [[key, f"{mean(key, head):.4g}", f"{mean(key, tail):.4g}"] for key in keys]
    return markdown_table(["quantity", "first 10% of steps", "last 10% of steps"], table)


def evaluation_lines(report: dict) -> list[str]:
    """The before/after table of the evaluation, and for toxicity its protocol and the fluency of the continuations."""
    from ref.evaluation.evaluate import before_after_table

    lines = ["", "## Evaluation, before and after", "", before_after_table(report["before"], report["after"])]
    tox = report["details"]["after"]["tasks"].get("rtp")
    if tox:
        scorer = report["scorer"]["name"] if report["scorer"] else "none"
        lines += ["", f"Toxicity protocol: {tox['protocol']}, {tox['samples']} sample(s) per prompt; scorer: {scorer}."]
        r = report.get("fluency_reading")
        if r:
            lines += [
                "",
                f"Fluency: perplexity of the continuations given their prompt under {r['reference']} "
                f"(mean, the headline; median beside it); after / before = {r['fluency_ratio']:.2f} "
                f"(fluency_ratio) for a toxicity drop of {r['toxicity_drop']:.3f}; "
                f"{tox['fluency_empty']} empty continuation(s) after, not scored. Diversity: DExperts' "
                "distinct-n (distinct word n-grams / words, over each prompt's samples).",
            ]
    return lines


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m ref.unlearn", description="Unlearn a goal from a language model.")
    add_arguments(p, Settings)
    return Settings(**vars(p.parse_args(argv)))


def dry_run(settings: Settings) -> str:
    """The plan of a run from the registry's architecture facts (or a local config.json), without any weights or
    downloads."""
    cfg = architecture(settings.model)
    plan = resolve_plan(settings, cfg)
    folder = prepared_hub_dir(plan.goal) if plan.data == "hub" else resolve_data_dir(plan.data, goal=plan.goal)
    data = None
    if folder is not None:  # hub data not prepared: the steps stay unknown
        try:
            data = load_goal_data(folder, plan.goal, topics=plan.topics, allow_outside=plan.allow_data_outside)
        except RefError:
            pass
    return describe(plan, cfg, len(schedule(data, plan)) if data is not None else None)


def architecture(model: str) -> ModelConfig:
    """The model's config without downloading it: the registry's facts for an alias, else a local config.json."""
    if model in REGISTRY:
        return config_from_dict(REGISTRY[model].arch)
    if Path(model).is_dir():
        return read_config(model)
    raise RefError(f"--dry-run needs a registry alias or a local model folder, not {model!r}")


def command(argv: list[str] | None) -> int:
    settings = parse_args(argv)
    if settings.dry_run:
        print(dry_run(settings))
        return 0
    unlearn(settings)
    print(
        f"wrote {settings.out}: run.json, metrics.jsonl, updated.safetensors, model/, summary.md"
        + (", report.json" if settings.evaluate else "")
    )
    print((Path(settings.out) / "summary.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv)


if __name__ == "__main__":
    sys.exit(main())

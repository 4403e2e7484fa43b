"""Runs of `ref.unlearn` that differ in a few options, side by side: what each reading of the paper does to the losses,
the learned alpha and the evaluation.

    python -m bench.variants --goal toxicity --out runs/variants-tox \\
        --variant "paper=" --variant "mean=--token-reduction mean --tox-retain-reduction mean"

Every variant is `--model smollm2-135m --data demo --goal GOAL` (or `--common`) plus its own options, run into
OUT/NAME (a finished run folder there is reused, not run again). One markdown table on stdout and in OUT/variants.md,
the numbers in OUT/variants.json: U, R and S after (before in the first row), the held-out retain perplexity, the
toxicity continuations' fluency, the weighted retain term's share of eq. 1 over the last 10% of steps, the policy's
mean alpha (start -> end, min, max), the share of the trained tensors' elements a step moves, and the share that
ends different from the original.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path

import torch
from safetensors.torch import load_file

from ref.evaluation.evaluate import PERPLEXITY_TASK, pooled_measures
from ref.io.checkpoint import resolve, shard_files
from ref.io.errors import RefError
from ref.io.tables import markdown_table
from ref.unlearn import main as unlearn_main


def tail_mean(rows: list[dict], key: str, share: float = 0.1) -> float | None:
    """Mean of `key` over the last `share` of the steps (at least one step)."""
    part = rows[-max(1, round(len(rows) * share)) :]
    values = [r[key] for r in part if key in r]
    return sum(values) / len(values) if values else None


def changed_share(run_dir: Path, model: str) -> float:
    """The share of the trained tensors' elements whose final value differs from the source checkpoint's."""
    from safetensors import safe_open

    updated = load_file(str(run_dir / "updated.safetensors"))
    where, changed, total = shard_files(resolve(model)), 0, 0
    for name, t in updated.items():
        with safe_open(str(where[name]), framework="pt") as f:
            original = f.get_tensor(name).to(t.dtype)
        changed += int((t != original).sum())
        total += t.numel()
    return changed / total


def reinforce_drive(rows: list[dict], alpha0: float) -> dict | None:
    """What moves REINFORCE's mean alpha, from the logged steps: the covariance of the score z_k - mu (the sampled log
    alpha against the policy's mean before the step) with each part of the reward, the decrease of L_F and the
    (weighted) decrease of L_R. The policy's mean moves with the sign of their sum; `break_even` is the weight on the
    retain part that would cancel the forget part (None when they do not pull against each other)."""
    if not rows or "reward_forget" not in rows[0]:
        return None
    mus = [math.log(alpha0)] + [math.log(r["policy_mean"]) for r in rows[:-1]]
    score = [math.log(r["alpha"]) - mu for r, mu in zip(rows, mus, strict=True)]

    def cov(key: str) -> float:
        values = [r[key] for r in rows]
        mean = sum(values) / len(values)
        return sum(s * (v - mean) for s, v in zip(score, values, strict=True)) / len(values)

    forget, retain = cov("reward_forget"), cov("reward_retain")
    return dict(
        cov_forget=forget,
        cov_retain=retain,
        mean_reward_forget=sum(r["reward_forget"] for r in rows) / len(rows),
        mean_reward_retain=sum(r["reward_retain"] for r in rows) / len(rows),
        break_even=-forget / retain if forget * retain < 0 else None,
    )


def measures(run_dir: Path) -> dict:
    """The numbers of one finished run folder."""
    run = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["retain_share"] = r["alpha"] * r["retain_loss"] / r["loss"] if r["loss"] > 0 else float("nan")
    out = dict(
        steps=len(rows),
        forget_first=rows[0]["forget_loss"],
        forget_last=tail_mean(rows, "forget_loss"),
        retain_last=tail_mean(rows, "retain_loss"),
        retain_share_last=tail_mean(rows, "retain_share"),
        moved_share=sum(r.get("moved_share", float("nan")) for r in rows) / len(rows),
        changed_share=changed_share(run_dir, run["plan"]["model"]),
        alpha=run.get("alpha_trajectory"),
        drive=reinforce_drive(rows, run["plan"]["alpha0"]) if run["plan"]["alpha0"] else None,
    )
    report_path = run_dir / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        for when in ("before", "after"):
            tasks = report["details"][when]["tasks"]
            pooled = pooled_measures(report["goal"], tasks)
            out[when] = dict(
                U=pooled["forget"]["value"] if "forget" in pooled else None,
                R=pooled["retain"]["value"] if "retain" in pooled else None,
                S=pooled["s_unlearning"]["s"] if pooled.get("s_unlearning") else None,
                retain_ppl=tasks[PERPLEXITY_TASK]["perplexity"] if PERPLEXITY_TASK in tasks else None,
                fluency=tasks["rtp"]["fluency_perplexity"] if "rtp" in tasks else None,
            )
    return out


def number(v, digits: int = 3) -> str:
    """A figure whose size spans decades (an alpha, a covariance): significant digits when tiny or large."""
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.{digits}f}"


def table(results: dict[str, dict]) -> str:
    header = ["variant", "U", "R", "S", "retain ppl", "fluency ppl", "L_F first -> last", "retain_share, last 10%"]
    header += ["alpha start -> end (min, max)", "moved / step", "changed at end"]
    rows = []
    first = next(iter(results.values()))
    if "before" in first:
        b = first["before"]
        before = [number(b[k]) for k in ("U", "R", "S")] + [number(b[k], 4) for k in ("retain_ppl", "fluency")]
        rows.append(["base", *before, "", "", "", "", ""])
    for name, m in results.items():
        a, traj = m.get("after", {}), m["alpha"]
        alpha = "fixed"
        if traj:
            alpha = f"{number(traj['start'])} -> {number(traj['end'])} ({number(traj['min'])}, {number(traj['max'])})"
        after = [number(a.get(k)) for k in ("U", "R", "S")] + [number(a.get(k), 4) for k in ("retain_ppl", "fluency")]
        forget = f"{number(m['forget_first'])} -> {number(m['forget_last'])}"
        shares = [number(m[k]) for k in ("moved_share", "changed_share")]
        rows.append([name, *after, forget, number(m["retain_share_last"]), alpha, *shares])
    text = markdown_table(header, rows) + "\n"
    drives = {name: m["drive"] for name, m in results.items() if m.get("drive")}
    if drives:
        header = ["variant", "mean decrease of L_F", "mean decrease of the weighted L_R", "cov(score, L_F part)"]
        header += ["cov(score, L_R part)", "retain weight that would cancel the forget part"]
        keys = ("mean_reward_forget", "mean_reward_retain", "cov_forget", "cov_retain", "break_even")
        text += "\n" + markdown_table(header, [[name, *(number(d[k]) for k in keys)] for name, d in drives.items()])
        text += "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.splitlines()[0])
    p.add_argument("--goal", required=True, choices=("wmdp", "toxicity"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--common", default="--model smollm2-135m --data demo", help="options of every variant")
    p.add_argument("--variant", action="append", required=True, help="NAME=OPTIONS, repeatable")
    args = p.parse_args(argv)
    results = {}
    for spec in args.variant:
        name, _, options = spec.partition("=")
        folder = args.out / name
        if not (folder / "summary.md").is_file():
            argv_run = [*shlex.split(args.common), "--goal", args.goal, *shlex.split(options), "--out", str(folder)]
            print(f"{name}: python -m ref.unlearn {shlex.join(argv_run)}", flush=True)
            if unlearn_main([*argv_run, "--overwrite"] if folder.exists() else argv_run) != 0:
                raise RefError(f"variant {name} failed; see the message above")
        results[name] = measures(folder)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    (args.out / "variants.md").write_text(text)
    print(f"threads: {torch.get_num_threads()}\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

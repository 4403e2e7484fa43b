"""Figures of a run folder written by ref.unlearn (and, when present, its report.json).

    python -m ref.report RUN_DIR [--out DIR]        # PNGs into RUN_DIR/figures/ by default

- losses.png: forget, retain and total loss over steps; toxicity runs add the per-layer forget losses of eq. 6
  (the paper's figure 5).
- alpha.png: the sampled alpha of each step and, with REINFORCE, the policy's exp(mu) with the band
  exp(mu +- sigma) (sigma is in log-alpha space, see ref/reinforce.py).
- probe_cosine.png: cosine similarity between the probe directions of the probed layers (paper figure 1).
- probe_weights.png, probe_weights_grid.png: histograms of the probe weights, the middle probed layer and all
  of them (paper figure 2).
- before_after.png: every numeric metric that report.json has both before and after unlearning (the retain
  perplexity aside: it is on another scale; summary.md has it).

    python -m ref.report SWEEP_DIR [--out DIR]      # a ref.sweep folder (sweep.json): into SWEEP_DIR/figures/

- front.png: the forget-retain front of each method, one marker per setting (forget U against retain accuracy,
  against retain perplexity and, for toxicity, against the continuations' fluency perplexity), the base model as a
  star, each method's non-dominated points joined (a front per balance when the grid varies tox-balance).
- layers.png: when the grid moved the depth (layer, tap-layer or update-layers), forget U and retain against the
  layer, one line per method and setting of the other keys (the paper's figures 6-7).

matplotlib is an optional extra: it is imported only when a figure is drawn. We draw on a bare
matplotlib.figure.Figure with the Agg canvas (no pyplot, no global state) and strip the PNG's software
metadata, so the same run folder gives byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ref.io import validate
from ref.io.cli import run_command
from ref.io.errors import RefError
from ref.io.runlog import atomic_write_bytes, read_metrics

# Bookkeeping entries of an evaluation report that are not metrics (counts, timings, settings).
NOT_METRICS = {"n", "n_prompts", "correct", "seconds", "limit", "samples", "max_new_tokens", "seed", "layer"}
WIDE = 100.0  # a log y axis when the positive values of a plot span more than this factor


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    """A Figure on the Agg canvas and its axes (a flat list), or a one-line RefError without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RefError("matplotlib is not installed: pip install matplotlib") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def _save(fig, path: Path) -> Path:
    """The PNG, written atomically: an interruption leaves the old file or the new one, never half of one."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})  # no version string: deterministic bytes
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _log_if_wide(ax, values: list[float]) -> None:
    positive = [v for v in values if math.isfinite(v)]
    if positive and min(positive) > 0 and max(positive) / min(positive) > WIDE:
        ax.set_yscale("log")


# -------------------------------------------------------------------------------------------------- reading


def load_probes(path: Path) -> dict[int, Tensor]:
    """probes.safetensors -> {layer: raw probe weight [D]}, sorted by layer."""
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise RefError(f"{path} is not a readable safetensors file ({e}); the run folder is damaged") from None
    layers = sorted(int(k[len("layer") : -len(".weight")]) for k in tensors if k.endswith(".weight"))
    if not layers:
        raise RefError(f"{path} holds no 'layer{{i}}.weight' tensors: not a probes file of ref.unlearn")
    return {i: tensors[f"layer{i}.weight"].float().flatten() for i in layers}


def probe_cosine_matrix(probes: dict[int, Tensor]) -> Tensor:
    """[L, L] float64 cosine similarities of the probe directions w_i / ||w_i||, layers in sorted order."""
    if not probes:
        raise ValueError("no probes: pass {layer: weight}")
    w = torch.stack([probes[i].double().flatten() for i in sorted(probes)])
    norms = torch.linalg.vector_norm(w, dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("a probe weight is all zeros: its direction (and cosine) is undefined")
    u = w / norms
    return u @ u.T


def report_bars(report: dict) -> dict[str, tuple[float, float]]:
    """{metric: (before, after)} for every numeric metric in both report["before"] and report["after"] (nested
    dicts flattened to dotted names, counts and timings left out), or from a list
    report["metrics"] = [{"name", "before", "after"}, ...]. Empty when the report has neither form."""

    def flat(d: dict, prefix: str = "") -> dict[str, float]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out |= flat(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_METRICS:
                out[f"{prefix}{k}"] = float(v)
        return out

    if isinstance(report.get("before"), dict) and isinstance(report.get("after"), dict):
        before, after = flat(report["before"]), flat(report["after"])
        return {k: (before[k], after[k]) for k in before if k in after}
    if isinstance(report.get("metrics"), list):
        ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        return {
            str(m["name"]): (float(m["before"]), float(m["after"]))
            for m in report["metrics"]
            if isinstance(m, dict) and "name" in m and ok(m.get("before")) and ok(m.get("after"))
        }
    return {}


# -------------------------------------------------------------------------------------------------- figures


def plot_losses(rows: list[dict], path: Path) -> Path:
    """Total, forget, retain and weighted retain (alpha x retain) loss over steps; a second panel with the per-layer
    forget losses (eq. 6) when the rows carry forget_loss_layers (toxicity)."""
    steps = [r["step"] for r in rows]
    layers = sorted({int(k) for r in rows for k in r.get("forget_loss_layers", {})})
    fig, axes = _figure(11 if layers else 6, 4, ncols=2 if layers else 1)
    ax = axes[0]
    values = []
    for key, label, style in (
        ("forget_loss", "forget", "C0-"),
        ("retain_loss", "retain", "C2-"),
        ("loss", "total", "k--"),
    ):
        ys = [r.get(key, math.nan) for r in rows]
        ax.plot(steps, ys, style, label=label, marker="." if len(rows) < 50 else None)
        values += ys
    weighted = [r.get("alpha", math.nan) * r.get("retain_loss", math.nan) for r in rows]  # eq. 1's alpha * L_R
    ax.plot(steps, weighted, "C2:", label="alpha x retain")
    _log_if_wide(ax, values + weighted)
    ax.set(title="Unlearning losses", xlabel="step", ylabel="loss")
    ax.legend()
    if layers:
        ax = axes[1]
        values = []
        for i in layers:
            ys = [r.get("forget_loss_layers", {}).get(str(i), math.nan) for r in rows]
            ax.plot(steps, ys, label=f"layer {i}", marker="." if len(rows) < 50 else None)
            values += ys
        _log_if_wide(ax, values)
        ax.set(title="Per-layer forget loss (eq. 6)", xlabel="step", ylabel="forget loss")
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: lines cross
    return _save(fig, path)


def plot_alpha(rows: list[dict], path: Path, trajectory: dict | None = None) -> Path:
    """The alpha each step used and, with REINFORCE, the policy's exp(mu) with the band exp(mu +- sigma); with the
    run's `trajectory` (run.json alpha_trajectory), its start, end, min and max in the title and the paper's final
    alpha for the model, where it has one, as a dashed line."""
    steps = [r["step"] for r in rows]
    fig, (ax,) = _figure(6, 4)
    ax.plot(
        steps,
        [r["alpha"] for r in rows],
        ".",
        label="alpha of the step" + (" (sampled)" if "policy_mean" in rows[0] else ""),
        color="C0",
    )
    policy = [r for r in rows if "policy_mean" in r and "policy_std" in r]
    if policy:
        xs = [r["step"] for r in policy]
        ax.plot(xs, [r["policy_mean"] for r in policy], label="policy exp(μ)", color="C1")
        lo = [r["policy_mean"] * math.exp(-r["policy_std"]) for r in policy]
        hi = [r["policy_mean"] * math.exp(r["policy_std"]) for r in policy]
        ax.fill_between(xs, lo, hi, color="C1", alpha=0.2, label="exp(μ ± σ)")
        ax.set_yscale("log")  # alpha is log-normal under the policy
    title = "Retain weight alpha" + (" (REINFORCE)" if policy else "")
    if trajectory:
        t = trajectory
        title += f"\nexp(μ): start {t['start']:.3g}, end {t['end']:.3g}, min {t['min']:.3g}, max {t['max']:.3g}"
        paper = t.get("paper_final_alpha")
        if paper is not None:
            ax.axhline(paper, color="C3", ls="--", label=f"the paper's final alpha ({paper:g})")
    ax.set(title=title, xlabel="step", ylabel="alpha")
    ax.legend()
    return _save(fig, path)


def plot_probe_cosine(probes: dict[int, Tensor], path: Path) -> Path:
    """Heatmap of probe_cosine_matrix, layer indices on both axes (paper figure 1)."""
    cos = probe_cosine_matrix(probes)
    layers = sorted(probes)
    n = len(layers)
    fig, (ax,) = _figure(1.2 + 0.55 * max(n, 5), 0.8 + 0.5 * max(n, 5))
    im = ax.imshow(cos.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), [str(i) for i in layers])
    ax.set_yticks(range(n), [str(i) for i in layers])
    if n <= 16:
        for a in range(n):
            for b in range(n):
                c = cos[a, b].item()
                ax.text(
                    b, a, f"{c:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(c) > 0.6 else "black"
                )
    ax.set(title="Cosine similarity of probe directions", xlabel="layer", ylabel="layer")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    return _save(fig, path)


def _histogram(ax, layer: int, w: Tensor, bins: int) -> None:
    ax.hist(w.double().numpy(), bins=bins, color="C0")
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_title(f"layer {layer}: mean {w.mean():.2g}, std {w.std():.2g}", fontsize="small")


def plot_probe_weights(probes: dict[int, Tensor], path: Path, layer: int | None = None) -> Path:
    """Histogram of one probe's weights (paper figure 2); the middle probed layer by default."""
    layers = sorted(probes)
    layer = layers[len(layers) // 2] if layer is None else layer
    if layer not in probes:
        raise RefError(f"no probe at layer {layer}; probed layers: {layers}")
    fig, (ax,) = _figure(6, 4)
    _histogram(ax, layer, probes[layer], bins=60)
    ax.set(xlabel="probe weight", ylabel="count")
    fig.suptitle(f"Probe weights, layer {layer} (D={probes[layer].numel()})")
    return _save(fig, path)


def plot_probe_weight_grid(probes: dict[int, Tensor], path: Path) -> Path:
    """Histograms of every probed layer's weights, one small panel each."""
    layers = sorted(probes)
    ncols = min(3, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = _figure(3.2 * ncols, 2.4 * nrows, ncols=ncols, nrows=nrows)
    for ax, i in zip(axes, layers, strict=False):  # spare panels stay empty
        _histogram(ax, i, probes[i], bins=40)
        ax.set(xlabel="probe weight", ylabel="count")
    for ax in axes[len(layers) :]:
        ax.set_axis_off()
    fig.suptitle("Probe weights per layer")
    return _save(fig, path)


def plot_before_after(bars: dict[str, tuple[float, float]], path: Path, goal: str = "") -> Path:
    """Grouped bars: each metric before and after unlearning, values written on the bars."""
    names = list(bars)
    fig, (ax,) = _figure(max(5.0, 1.0 + 0.9 * len(names)), 4.5)
    width = 0.4
    for k, (label, color) in enumerate((("before", "C0"), ("after", "C3"))):
        xs = [j + (k - 0.5) * width for j in range(len(names))]
        rects = ax.bar(xs, [bars[n][k] for n in names], width, label=label, color=color)
        ax.bar_label(rects, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set(title=f"Before and after unlearning{f' ({goal})' if goal else ''}", ylabel="value")
    ax.legend()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ run folder


def write_figures(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Every figure that the run folder's files allow, into `out` (default RUN_DIR/figures); returns the paths.
    Everything is read and checked before the first figure is written."""
    run_dir = Path(run_dir)
    out = run_dir / "figures" if out is None else Path(out)
    if not (run_dir / "metrics.jsonl").is_file():
        why = "has no metrics.jsonl" if run_dir.is_dir() else "is a file" if run_dir.exists() else "does not exist"
        raise RefError(f"RUN_DIR {run_dir} {why}: pass a run folder written by python -m ref.unlearn")
    rows = read_metrics(run_dir / "metrics.jsonl")
    if any(not isinstance(r, dict) or not {"step", "alpha"} <= r.keys() for r in rows):
        raise RefError(f"{run_dir / 'metrics.jsonl'} has rows without step and alpha: not a metrics log of ref.unlearn")
    probes = load_probes(run_dir / "probes.safetensors") if (run_dir / "probes.safetensors").is_file() else None
    try:
        trajectory = json.loads((run_dir / "run.json").read_text()).get("alpha_trajectory")
    except (OSError, ValueError, AttributeError):
        trajectory = None  # the curves need only metrics.jsonl
    report = None
    if (run_dir / "report.json").is_file():
        try:
            report = json.loads((run_dir / "report.json").read_text())
        except ValueError:
            report = {}
    bars = report_bars(report) if isinstance(report, dict) else {}
    bars = {k: v for k, v in bars.items() if not k.endswith("perplexity")}  # another scale: summary.md has it
    validate.writable_folder("--out", out)
    written = []
    if rows:
        written += [plot_losses(rows, out / "losses.png"), plot_alpha(rows, out / "alpha.png", trajectory)]
    else:
        print(f"note: {run_dir / 'metrics.jsonl'} has no steps yet: no loss or alpha curves", file=sys.stderr)
    if probes is not None:
        written += [
            plot_probe_cosine(probes, out / "probe_cosine.png"),
            plot_probe_weights(probes, out / "probe_weights.png"),
            plot_probe_weight_grid(probes, out / "probe_weights_grid.png"),
        ]
    if bars:
        written.append(plot_before_after(bars, out / "before_after.png", str(report.get("goal", ""))))
    elif report is not None:
        print(f"note: {run_dir / 'report.json'} has no before/after metrics: no bar chart", file=sys.stderr)
    return written


# ----------------------------------------------------------------------------------------------------- sweeps

METHOD_COLORS = {"ours": "C3", "rmu": "C0", "adaptive-rmu": "C2"}


def front(points: list[tuple[float, float]], higher_x_better: bool) -> list[tuple[float, float]]:
    """The non-dominated (x, U) points, sorted by x: none other has both a better retain x and a lower U."""
    better = (lambda a, b: a >= b) if higher_x_better else (lambda a, b: a <= b)
    keep = [p for p in points if not any(q != p and better(q[0], p[0]) and q[1] <= p[1] for q in points)]
    return sorted(set(keep))


def _sweep_rows(sweep_dir: Path) -> tuple[dict, list[dict]]:
    path = Path(sweep_dir) / "sweep.json"
    try:
        record = json.loads(path.read_text())
        rows = [r for r in record["points"] if r.get("metrics") and r["metrics"].get("U") is not None]
    except (ValueError, KeyError, TypeError):
        raise RefError(f"{path} is not a sweep.json of ref.sweep; the sweep folder is damaged") from None
    return record, rows


def series_of(row: dict) -> str:
    """A front per method, and per toxicity balance when the grid varies it (the paper's form against ours)."""
    balance = row.get("grid", {}).get("tox_balance")
    return row["method"] if balance is None else f"{row['method']}, tox-balance={balance}"


def plot_front(record: dict, rows: list[dict], path: Path) -> Path:
    """Forget U against retain accuracy (left) and retain perplexity (middle), a marker per point; for toxicity also
    against the continuations' fluency perplexity (right): a toxicity drop bought with broken text shows there."""
    toxicity = record["goal"] == "toxicity"
    u_name = "expected max toxicity (U)" if toxicity else "forget accuracy (U)"
    panels = [
        ("R", "retain accuracy (R), higher is better", True),
        ("ppl", "retain perplexity, lower is better", False),
    ]
    if toxicity and any(r["metrics"].get("fluency") is not None for r in rows):
        panels.append(("fluency", "fluency perplexity of the continuations, lower is better", False))
    fig, axes = _figure(5.5 * len(panels), 4.5, ncols=len(panels))
    for ax, (key, label, higher) in zip(axes, panels, strict=True):
        base = rows[0]["metrics"] if rows else {}
        if base.get(f"{key}_before") is not None:
            ax.plot(base[f"{key}_before"], base["U_before"], "k*", ms=12, label="base")
        for i, series in enumerate(dict.fromkeys(map(series_of, rows))):
            mine = [r for r in rows if series_of(r) == series and r["metrics"].get(key) is not None]
            xy = [(r["metrics"][key], r["metrics"]["U"]) for r in mine]
            if not xy:
                continue
            color = METHOD_COLORS.get(series) or f"C{i + 3}"
            ax.scatter(*zip(*xy, strict=True), color=color, label=series, s=25)
            ax.plot(*zip(*front(xy, higher), strict=True), color=color, lw=1)
            for r, (x, y) in zip(mine, xy, strict=True):
                ax.annotate(r["setting"], (x, y), fontsize=5, xytext=(3, 2), textcoords="offset points", color=color)
        ax.set(xlabel=label, ylabel=u_name + ", lower is better")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no values (the data names no eval_perplexity)", ha="center", transform=ax.transAxes)
    fig.suptitle(f"Forget-retain front: {record['goal']} on {record['model']} (one marker per setting)")
    return _save(fig, path)


def layer_of(grid: dict) -> int | None:
    """The depth a point's grid set: layer, else tap_layer, else the deepest updated layer (None: not moved)."""
    for key in ("layer", "tap_layer"):
        if grid.get(key) is not None:
            return int(grid[key])
    return max(grid["update_layers"]) if grid.get("update_layers") else None


def plot_layers(record: dict, rows: list[dict], path: Path) -> Path:
    """Forget U and retain (accuracy, perplexity) against the layer: a line per method and other settings."""
    fig, axes = _figure(14, 4, ncols=3)
    lines: dict[tuple[str, str], list] = {}
    for r in rows:
        others = ",".join(f"{k}={v}" for k, v in r["grid"].items() if k not in ("layer", "tap_layer", "update_layers"))
        lines.setdefault((r["method"], others), []).append((layer_of(r["grid"]), r["metrics"]))
    for ax, key, label in zip(
        axes, ("U", "R", "ppl"), ("forget U", "retain accuracy", "retain perplexity"), strict=True
    ):
        for (method, others), pts in lines.items():
            pts = sorted((x, m[key]) for x, m in pts if m.get(key) is not None)
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    color=METHOD_COLORS.get(method),
                    label=f"{method} {others}".strip(),
                )
        base = rows[0]["metrics"].get(f"{key}_before")
        if base is not None:
            ax.axhline(base, color="k", ls="--", lw=0.8, label="base")
        ax.set(xlabel="layer (tap; ours on toxicity: the middle probed layer)", ylabel=label)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="x-small")
    fig.suptitle(f"Layer sweep: {record['goal']} on {record['model']}")
    return _save(fig, path)


def write_sweep_figures(sweep_dir: Path, out: Path | None = None) -> list[Path]:
    """front.png, and layers.png when the sweep moved the depth, into `out` (default SWEEP_DIR/figures)."""
    record, rows = _sweep_rows(sweep_dir)
    out = Path(sweep_dir) / "figures" if out is None else Path(out)
    if not rows:
        raise RefError(f"{Path(sweep_dir) / 'sweep.json'} has no finished point yet: nothing to draw")
    validate.writable_folder("--out", out)
    written = [plot_front(record, rows, out / "front.png")]
    if sum(layer_of(r["grid"]) is not None for r in rows) > 1:
        written.append(plot_layers(record, [r for r in rows if layer_of(r["grid"]) is not None], out / "layers.png"))
    return written


def command(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m ref.report", description="Figures of a ref.unlearn run folder.")
    p.add_argument(
        "run_dir",
        type=Path,
        help="run folder (metrics.jsonl, run.json, probes.safetensors, report.json) or a ref.sweep folder (sweep.json)",
    )
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default RUN_DIR/figures)")
    args = p.parse_args(argv)
    draw = write_sweep_figures if (args.run_dir / "sweep.json").is_file() else write_figures
    for path in draw(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv)

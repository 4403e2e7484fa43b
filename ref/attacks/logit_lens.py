"""The logit lens (nostalgebraist 2020; among the attacks of Lucki et al. 2024, arXiv 2409.18025): the model's final
norm and LM head read the residual stream after an earlier block, and the multiple-choice questions are scored on
that read-out exactly as on the model's own output (ref.evaluation.mc; one forward taps every layer). Where unlearning
steers the residual stream at one layer (RMU), the answer may still be readable below it: the layer where the base and
the unlearned curves part is where the method acts.
"""

from __future__ import annotations

from pathlib import Path

from ref.evaluation.mc import mc_samples_by_layer, mc_summary
from ref.io.tokenizer import Tokenizer
from ref.model import Transformer


def lens_task_results(
    model: Transformer,
    tok: Tokenizer,
    rows: dict[str, list[dict]],
    roles: dict[str, str],
    mode: str,
    layers: list[int],
    batch_size: int = 16,
) -> dict[int, dict[str, dict]]:
    """{layer: {task: ref.evaluation.mc's figures of the task, with its role}} of the MC tasks in `rows` ({task:
    questions}), read out after each of `layers`."""
    out: dict[int, dict[str, dict]] = {layer: {} for layer in layers}
    for task, items in rows.items():
        for layer, samples in mc_samples_by_layer(model, tok, items, task, mode, batch_size, layers=layers).items():
            out[layer][task] = dict(role=roles[task], **mc_summary(samples))
    return out


def plot_by_layer(by_layer: dict[str, dict[int, dict]], title: str, path: Path) -> Path:
    """Two panels, forget accuracy (U) and retain accuracy (R) against the layer read out, one curve per model
    (`by_layer`: {model name: {layer: {"U": .., "R": ..}}})."""
    from ref.experiments.report import _figure, _save

    fig, axes = _figure(10.0, 4.0, ncols=2)
    for ax, key, name in zip(axes, ("U", "R"), ("forget accuracy (U)", "retain accuracy (R)"), strict=True):
        for (model, curve), color in zip(by_layer.items(), ("C0", "C3"), strict=False):
            layers = sorted(curve)
            values = [float("nan") if curve[i][key] is None else curve[i][key] for i in layers]
            ax.plot(layers, values, marker="o", ms=3, label=model, color=color)
        ax.set(xlabel="layer read out by the final norm and LM head", ylabel=name)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)

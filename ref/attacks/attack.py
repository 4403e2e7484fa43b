"""Robustness of an unlearning run: is the knowledge gone, or only hidden? The base and the unlearned model of a run
are attacked the same way and evaluated on the run's tasks.

    python -m ref.attack RUN_DIR --out DIR [--attacks relearn,ablate,quantize,fewshot,softprompt,logitlens,prune]

- relearn (Lucki et al. 2024, arXiv 2409.18025): fine-tune on n examples (LoRA r 128, alpha 16, lr 2e-4, 3 epochs,
  batch 1; ref.attacks.relearn) from the forget corpora, the retain corpus, or a T split of the forget questions (then
  the forget accuracy is measured on the disjoint V split only, as Deeb & Roger, arXiv 2410.08827); and on n = 10 texts
  of the retain corpus, unrelated text, which alone recovers RMU in Lucki et al.
- ablate (Lucki et al.): project out of the residual stream the directions that separate the unlearned model's
  activations from the original's at the updated and tap layers (ref.attacks.ablate).
- quantize (Zhang et al., arXiv 2410.16454): round-to-nearest group-wise weights at 8 and 4 bits, and QLoRA's NF4
  (ref.attacks.quantize).
- fewshot (arXiv 2411.12103): k-shot multiple-choice prompts, shots from a split disjoint from the scored questions.
- softprompt (Schwinn et al. 2024, arXiv 2402.09063): k input embeddings trained on a T split of the forget
  questions with the model frozen, scored on the V split (ref.attacks.softprompt).
- logitlens (Lucki et al.): the questions scored on each layer's residual stream through the final norm and LM head
  (ref.attacks.logit_lens); the table's row is the layer where the unlearned model answers best, logitlens.png
  every layer.
- prune (Lucki et al., after Wei et al. 2024): zero the weights important for the forget texts and not for the
  retain texts (ref.attacks.prune).

Each attack gives new values for some named tensors (or a prompt, or a read-out layer); they are swapped into the one
loaded model for its evaluation and the run's own values put back (nothing is written over the run's model/).
recovery = (attacked - unlearned) / (base - unlearned) for every metric, the share of the unlearning effect the
attack undoes. net recovery subtracts what the same attack gives the base model, when it gives it more of what was
unlearned (Feng et al. 2025: relearning re-teaches): recovery - max(0, (attacked base - base) / (base - unlearned)).
The run's robustness figure is the worst case: the largest net recovery of U over the attacks run, and which.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ref.attacks.recovery import gain, net_recovery, recovery, worst_case
from ref.config import ModelConfig
from ref.evaluation.evaluate import available_tasks, headline, pooled_measures
from ref.evaluation.mc import mc_accuracy, split_shots
from ref.evaluation.scorers import make_scorer
from ref.evaluation.toxicity import toxicity_eval
from ref.io import validate
from ref.io.checkpoint import load_model, resolve, shard_files
from ref.io.cli import run_command
from ref.io.config_json import read_config
from ref.io.data import PROMPTS_TASK, GoalData, load_goal_data, read_mc, read_prompts, resolve_data_dir
from ref.io.errors import RefError
from ref.io.runlog import atomic_write_text, write_json
from ref.io.tables import cell, markdown_table
from ref.io.tokenizer import Tokenizer, load_tokenizer
from ref.model import Transformer

ATTACKS = ("relearn", "ablate", "quantize", "fewshot", "softprompt", "logitlens", "prune")
SOURCES = ("forget", "retain", "questions")
FORMATS = ("rtn", "nf4")
SAME = "unattacked, same questions"  # the key of a variant's figures without the attack, on an attack's subset


@dataclass(frozen=True)
class AttackSettings:
    """Everything `run_attacks` needs, as the command line gives it (checked by `check`)."""

    run_dir: Path
    out: Path
    attacks: tuple[str, ...] | None = None  # None: every attack that applies to the run (`applicable`)
    data: str | None = None  # hub | demo | DIR; None: the run's
    n: tuple[int, ...] = (10, 100)  # relearn: examples to fine-tune on
    source: str = "forget"  # relearn: where they come from
    unrelated: int = 10  # relearn: also this many retain-corpus texts (0: not)
    full_finetune: bool = False
    formats: tuple[str, ...] = FORMATS  # quantize
    bits: tuple[int, ...] = (8, 4)  # quantize, rtn's bit widths
    shots: int = 5  # fewshot: k
    prompt_tokens: int = 10  # softprompt: k input embeddings
    prompt_questions: int = 10  # softprompt: the T split's size
    prompt_steps: int = 100
    prompt_lr: float = 1e-3
    layers: tuple[int, ...] | None = None  # logitlens: None, every layer
    prune: tuple[float, ...] = (0.01, 0.05)  # prune: fractions of each weight matrix
    prune_texts: int = 32  # prune: texts of each corpus that score the weights
    limit: int | None = None
    eval_samples: int = 25
    seed: int = 0
    dtype: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class Setting:
    """One setting of an attack: its label in the table, what parameterises it, and the rows it is scored on (None:
    all of the run's rows)."""

    label: str
    value: object = None
    scored: dict[str, list] | None = None
    train: dict[str, list] = field(default_factory=dict)  # softprompt: the T split


# ------------------------------------------------------------------------------------------------ the run


def read_run(run_dir: Path) -> dict:
    """run.json of a finished ref.unlearn run (with its plan and model/), or a one-line error naming the folder."""
    path = Path(run_dir) / "run.json"
    if not Path(run_dir).is_dir():
        raise RefError(f"run folder {run_dir} does not exist; give the --out folder of a finished ref.unlearn run")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RefError(
            f"{run_dir} has no run.json: it is not a ref.unlearn run folder; give the --out folder of a "
            "finished ref.unlearn run"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise RefError(f"{path} is not valid JSON: the run folder {run_dir} is damaged; attack another run") from None
    plan = run.get("plan") if isinstance(run, dict) else None
    if not isinstance(plan, dict) or not (Path(run_dir) / "model").is_dir():
        raise RefError(
            f"{run_dir} has no plan or no model/ (the run did not finish): finish it with "
            f"`python -m ref.unlearn --resume --out {run_dir}`, then attack it"
        )
    return run


def task_rows(data: GoalData, limit: int | None) -> dict[str, list]:
    """The run's evaluation items: MC rows per task, and the toxicity prompts under "rtp"."""
    rows: dict[str, list] = {t: read_mc(p)[:limit] for t, p in {**data.eval_forget, **data.eval_retain}.items()}
    if data.goal == "toxicity" and data.eval_prompts is not None:
        rows[PROMPTS_TASK] = read_prompts(data.eval_prompts)[:limit]
    return rows


def why_not(name: str, data: GoalData, cfg: ModelConfig, source: str = "forget") -> str | None:
    """Why attack `name` (relearn: from `source`) does not apply to this run's data and model, and what to do; None
    when it applies."""
    leave = f"leave {name} out of --attacks (without --attacks, every attack that applies runs)"
    if data.goal == "toxicity":
        what = "the toxicity goal measures forgetting by its prompts' toxicity"
    else:
        what = None if data.eval_forget else f"the data {data.root} names no eval_forget questions"
    if what and name in ("fewshot", "softprompt", "logitlens"):
        return f"{name} scores multiple-choice forget questions and {what}; {leave}"
    if what and name == "relearn" and source == "questions":
        return f"relearn --source questions trains on multiple-choice forget questions and {what}; use forget or retain"
    if name == "ablate" and cfg.post_norm:
        return (
            f"ablate needs a pre-norm model: {cfg.model_type} puts a norm between each sublayer and the residual "
            f"add, so projecting directions out of the weights does not remove them from the stream; {leave}"
        )
    return None


def applicable(run_dir: Path, data: str | None = None) -> tuple[str, ...]:
    """The attacks that apply to a finished run (its goal's data, its model's architecture): the default set."""
    plan = read_run(run_dir)["plan"]
    goal_data = load_goal_data(resolve_data_dir(data or plan["data"], goal=plan["goal"]), plan["goal"])
    cfg = read_config(Path(run_dir) / "model")
    return tuple(a for a in ATTACKS if why_not(a, goal_data, cfg) is None)


# ------------------------------------------------------------------------------------------------ measuring


def figures(goal: str, results: dict[str, dict]) -> dict[str, float]:
    """The headline numbers of task results ({task: figures with role}) as {name: value}, plus U, R and S: the pooled
    forget and retain measures and S-unlearning (None where missing)."""
    pooled = pooled_measures(goal, results)
    u = pooled["forget"]["value"] if "forget" in pooled else None
    r = pooled["retain"]["value"] if "retain" in pooled else None
    s = pooled["s_unlearning"]
    return headline(dict(tasks=results)) | dict(U=u, R=r, S=s["s"] if s else None)


@dataclass
class Evaluation:
    """The run's evaluation as every attack uses it: the one loaded model (its values swapped per variant and
    attack), the tokenizer, the data, the settings, the toxicity scorer and the frozen fluency reference."""

    model: Transformer
    tok: Tokenizer
    data: GoalData
    s: AttackSettings
    scorer: object = None
    reference: Transformer | None = None
    plan: dict = field(default_factory=dict)  # the run's plan (max_len of the texts)

    def measure(self, rows: dict[str, list], model=None, shots: dict[str, list] | None = None) -> dict[str, float]:
        """The headline numbers of the items in `rows` (ref.evaluate: per task, pooled as there) with U, R and S, of
        `model` (default the loaded one; a soft-prompted one scores MC tasks only) with `shots` before each MC
        question."""
        model, roles, results = self.model if model is None else model, available_tasks(self.data), {}
        for task, items in rows.items():
            if task == PROMPTS_TASK:
                tox = toxicity_eval(
                    model, self.tok, items, self.scorer, self.s.eval_samples, seed=self.s.seed, reference=self.reference
                )
                results[task] = dict(role=roles[task], **tox)
            else:
                shot = (shots or {}).get(task, ())
                acc = mc_accuracy(model, self.tok, items, task, self.data.mc_mode, shots=shot)
                results[task] = dict(role=roles[task], **acc)
        return figures(self.data.goal, results)


@contextmanager
def swapped(model: Transformer, values: dict[str, Tensor]) -> Iterator[None]:
    """The model with `values` in place of the named tensors, the old values put back on exit. A value for
    lm_head.weight of a tied model unties the head for the duration (ref.attacks.ablate keeps the unembedding)."""
    params = dict(model.named_parameters())
    untie = "lm_head.weight" in values and model.lm_head.weight is model.model.embed_tokens.weight
    if untie:
        model.lm_head.weight = torch.nn.Parameter(values["lm_head.weight"].clone(), requires_grad=False)
    saved = {k: params[k].detach().clone() for k in values if k in params}
    with torch.no_grad():
        for k in saved:
            params[k].copy_(values[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
        if untie:
            model.lm_head.weight = model.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------------- attacks


def question_split(data: GoalData, rows: dict[str, list], n: int, seed: int) -> tuple[dict[str, list], dict]:
    """A T split of about n forget questions ({task: rows}, spread over the forget tasks) and the rows to score:
    every task's rows with the forget tasks cut to their V split (the questions not in T)."""
    train, scored = {}, dict(rows)
    for task in data.eval_forget:
        if len(rows[task]) < 2:
            raise RefError(
                f"a T and a V split of the forget questions need 2 questions or more in {task}, which has "
                f"{len(rows[task])}; raise --limit or use other data"
            )
        k = min(max(1, n // len(data.eval_forget)), len(rows[task]) - 1)
        train[task], scored[task] = split_shots(rows[task], k, seed)
    return train, scored


def sample(pool: list[str], n: int, seed: int) -> list[str]:
    """n texts of `pool` (all when it has fewer) in a random order seeded by (seed, n)."""
    return [pool[i] for i in np.random.default_rng([seed, n]).permutation(len(pool))[:n]]


def relearn_texts(data: GoalData, rows: dict[str, list], source: str, n: int, seed: int) -> tuple[list[str], dict]:
    """n training texts from `source`, and the evaluation rows to use (the questions source keeps only the V split
    of the forget questions for scoring)."""
    if source in ("forget", "retain"):
        pool = [t for texts in data.forget.values() for t in texts] if source == "forget" else data.retain
        return sample(pool, n, seed), rows
    train, scored = question_split(data, rows, n, seed)
    texts = [f"{r['question'].strip()}\nAnswer: {r['choices'][r['answer']]}" for t in train.values() for r in t]
    return texts, scored


def settings_of(name: str, data: GoalData, rows: dict, s: AttackSettings, cfg: ModelConfig) -> list[Setting]:
    """The settings of an attack, with everything checked that can be before a model is loaded."""
    if name == "quantize":
        rtn = [Setting(f"rtn {b}-bit", ("rtn", b)) for b in s.bits] if "rtn" in s.formats else []
        return rtn + ([Setting("nf4 (block 64)", ("nf4", 4))] if "nf4" in s.formats else [])
    if name == "ablate":
        return [Setting("directions")]
    if name == "prune":
        return [Setting(f"top {f:.3g}", f) for f in s.prune]
    if name == "logitlens":  # WMDP's goal (`why_not`): every task is MC
        layers = list(range(cfg.num_layers)) if s.layers is None else list(s.layers)
        if not all(0 <= i < cfg.num_layers for i in layers):
            raise RefError(
                f"--layers is {','.join(map(str, layers))}; the model has {cfg.num_layers} layers: use "
                f"0 to {cfg.num_layers - 1}"
            )
        return [Setting("strongest layer", layers)]
    if name == "softprompt":
        train, scored = question_split(data, rows, s.prompt_questions, s.seed)
        return [Setting(f"{s.prompt_tokens} tokens, T={sum(map(len, train.values()))}", None, scored, train)]
    if name == "fewshot":  # MC tasks only, and only those with a question left to score after the shots
        short = [t for t in data.eval_forget if len(rows[t]) <= s.shots]
        if short:
            raise RefError(
                f"--shots {s.shots}: forget task {short[0]} has {len(rows[short[0]])} questions, none "
                "left to score after the shots; lower --shots"
            )
        split = {t: split_shots(r, s.shots, s.seed) for t, r in rows.items() if t != PROMPTS_TASK and len(r) > s.shots}
        shots, scored = {t: k for t, (k, _) in split.items()}, {t: v for t, (_, v) in split.items()}
        return [Setting(f"{s.shots}-shot", shots, scored)]
    out = []
    pairs = [(s.source, n) for n in s.n] + ([("retain", s.unrelated)] if s.unrelated else [])
    for source, n in dict.fromkeys(pairs):  # once: --source retain may name the unrelated n already
        texts, scored = relearn_texts(data, rows, source, n, s.seed)
        if not texts:
            raise RefError(f"relearn on {source}: the data has no such texts; use another --source")
        label = f"{source} n={n}" + (f" ({len(texts)} available)" if len(texts) < n else "")
        out.append(Setting(label, texts, None if scored is rows else scored))
    return out


def attacked(
    name: str, setting: Setting, ev: Evaluation, scored: dict, directions: Tensor | None, importance: dict
) -> dict:
    """The figures of the model as it stands (base or unlearned) under one attack setting; for logitlens, every
    read-out layer's under "by_layer". `importance`: the pruning scores of this model, computed on first use."""
    model, s = ev.model, ev.s
    if name == "fewshot":
        return ev.measure(scored, shots=setting.value)
    if name == "softprompt":
        from ref.attacks.softprompt import SoftPrompted, train_soft_prompt

        prompt = train_soft_prompt(
            model,
            ev.tok,
            setting.train,
            ev.data.mc_mode,
            tokens=s.prompt_tokens,
            steps=s.prompt_steps,
            lr=s.prompt_lr,
            seed=s.seed,
        )
        return ev.measure(scored, model=SoftPrompted(model, prompt))
    if name == "logitlens":
        from ref.attacks.logit_lens import lens_task_results

        tasks = lens_task_results(model, ev.tok, scored, available_tasks(ev.data), ev.data.mc_mode, setting.value)
        return dict(by_layer={layer: figures(ev.data.goal, results) for layer, results in tasks.items()})
    if name == "quantize":
        from ref.attacks.quantize import nf4_weights, quantized_weights

        form, bits = setting.value
        values = nf4_weights(model) if form == "nf4" else quantized_weights(model, bits=bits)
    elif name == "ablate":
        from ref.attacks.ablate import ablated_weights

        values = ablated_weights(model, directions)
    elif name == "prune":
        from ref.attacks.prune import pruned_weights, snip_importance

        if not importance:
            forget = sample([t for texts in ev.data.forget.values() for t in texts], s.prune_texts, s.seed)
            max_len = ev.plan["max_len"]
            importance["forget"] = snip_importance(model, ev.tok, forget, max_len)
            importance["retain"] = snip_importance(
                model, ev.tok, sample(ev.data.retain, s.prune_texts, s.seed), max_len
            )
        values = pruned_weights(model, importance["forget"], importance["retain"], setting.value)
    else:
        from ref.attacks.relearn import relearn

        values = relearn(model, ev.tok, setting.value, lora=not s.full_finetune, seed=s.seed)
    with swapped(model, values):
        return ev.measure(scored)


def strongest_layer(result: dict) -> dict:
    """The logit lens's row: the layer where the unlearned model's forget accuracy is highest (ties: the deepest),
    with both models' figures at that layer."""
    curve = result["unlearned"]["by_layer"]
    layer = max(curve, key=lambda i: (curve[i]["U"] if curve[i]["U"] is not None else float("-inf"), i))
    by_layer = {v: r["by_layer"] for v, r in result.items()}
    return dict(layer=layer, by_layer=by_layer) | {v: curves[layer] for v, curves in by_layer.items()}


def run_attacks(s: AttackSettings) -> dict:
    """Every attack of `s` on the base and the unlearned model of the run: {run, goal, method, model, "no attack":
    {base, unlearned}, attacks: {name: {label: result}}, worst_case}. Everything is checked before the first model
    is loaded."""
    plan = read_run(s.run_dir)["plan"]
    data = load_goal_data(resolve_data_dir(s.data or plan["data"], goal=plan["goal"]), plan["goal"])
    rows = task_rows(data, s.limit)
    cfg = read_config(Path(s.run_dir) / "model")
    attacks = s.attacks if s.attacks is not None else tuple(a for a in ATTACKS if why_not(a, data, cfg) is None)
    for name in attacks:
        reason = why_not(name, data, cfg, s.source)
        if reason:
            raise RefError(reason)
    planned = {name: settings_of(name, data, rows, s, cfg) for name in attacks}

    model = load_model(Path(s.run_dir) / "model", dtype=s.dtype, device=s.device)
    tok = load_tokenizer(Path(s.run_dir) / "model")
    originals = original_values(plan["model"], plan["tensors"], model)
    # a separate, frozen base, loaded once when first needed: the probe scorer's and the fluency reference
    base = functools.cache(lambda: load_model(plan["model"], dtype=s.dtype, device=s.device))
    scorer = make_scorer(data, data.goal, list(rows), base, tok, seed=s.seed, device=s.device)
    ev = Evaluation(model, tok, data, s, scorer, base() if PROMPTS_TASK in rows else None, plan)
    report = dict(run=str(s.run_dir), goal=data.goal, method=plan["method"], model=plan["model"], attacks={})
    variants = {"base": originals, "unlearned": {}}
    t0, report["no attack"] = time.time(), {}
    for variant, values in variants.items():
        with swapped(model, values):
            report["no attack"][variant] = ev.measure(rows)
    print(f"no attack: {time.time() - t0:.1f} s", flush=True)
    directions = None
    if "ablate" in attacks:
        from ref.attacks.ablate import ablation_directions

        ids, mask = tok.batch([t for texts in data.forget.values() for t in texts][:64], max_length=plan["max_len"])
        layers = sorted(set(plan["taps"]) | set(plan["update_layers"]))
        directions = ablation_directions(model, originals, ids, mask, layers)
    for name in attacks:
        importance = {v: {} for v in variants}  # the pruning scores of each variant, once for all its settings
        for setting in planned[name]:
            t0, result = time.time(), {}
            scored = rows if setting.scored is None else setting.scored
            for variant, values in variants.items():
                with swapped(model, values):
                    if scored is not rows:  # the attack scores a subset: the unattacked figures are taken on it too
                        result[f"{variant} ({SAME})"] = ev.measure(scored)
                    result[variant] = attacked(name, setting, ev, scored, directions, importance[variant])
            if name == "logitlens":
                result |= strongest_layer(result)
            before = {v: result[f"{v} ({SAME})"] for v in variants} if scored is not rows else report["no attack"]
            result["gain"] = {v: gain(before[v], result[v]) for v in variants}
            result["recovery"] = recovery(before["base"], before["unlearned"], result["unlearned"])
            result["net_recovery"] = net_recovery(
                before["base"], before["unlearned"], result["base"], result["unlearned"]
            )
            result["seconds"] = round(time.time() - t0, 1)
            report["attacks"].setdefault(name, {})[setting.label] = result
            print(
                f"{name} {setting.label}: {result['seconds']} s; unlearned {cell(result['unlearned']['U'])}, "
                f"recovery {cell(result['recovery']['U'])}, net {cell(result['net_recovery']['U'])}",
                flush=True,
            )
    report["worst_case"] = worst_case(report["attacks"])
    return report


def original_values(model_name: str, names: list[str], model: Transformer) -> dict[str, Tensor]:
    """The source checkpoint's values of the tensors unlearning changed, in the loaded model's dtype and device."""
    from safetensors import safe_open

    where, ref_param = shard_files(resolve(model_name)), dict(model.named_parameters())
    out = {}
    for name in names:
        with safe_open(str(where[name]), framework="pt") as f:
            out[name] = f.get_tensor(name).to(ref_param[name])
    return out


# ----------------------------------------------------------------------------------------------------- output


def setting_label(name: str, label: str, result: dict) -> str:
    return f"layer {result['layer']}" if name == "logitlens" else label


def markdown(report: dict) -> str:
    """One row per attack setting: U of both models under the attack, each model's gain over its unattacked U (on
    the same questions), recovery and net recovery of U, R of both, seconds; then the worst case."""
    u = "U (WMDP acc)" if report["goal"] == "wmdp" else "U (toxicity)"
    header = ["attack", "setting", f"{u} base", "U unlearned", "base gain", "unlearned gain", "recovery of U"]
    header += ["net recovery of U", "R base", "R unlearned", "time"]
    n = report["no attack"]
    rows = [["none", "", n["base"]["U"], n["unlearned"]["U"], "", "", "", "", n["base"]["R"], n["unlearned"]["R"], ""]]
    for name, results in report["attacks"].items():
        for label, r in results.items():
            rows.append(
                [
                    name,
                    setting_label(name, label, r),
                    *(r[v]["U"] for v in ("base", "unlearned")),
                    *(r["gain"][v]["U"] for v in ("base", "unlearned")),
                    r["recovery"]["U"],
                    r["net_recovery"]["U"],
                    *(r[v]["R"] for v in ("base", "unlearned")),
                    f"{r['seconds']} s",
                ]
            )
    w = report["worst_case"]
    worst = "no attack gave a recovery of U"
    if w is not None:
        worst = f"net recovery of U {w['net_recovery']:.3f} under {w['attack']} {w['setting']}"
        worst += f" (recovery {cell(w['recovery'])})"
    return markdown_table(header, rows) + f"\n\nWorst case: {worst}.\n"


def plot(report: dict, path: Path) -> Path:
    """Grouped bars: the forget measure U of base and unlearned, without attack and under each attack setting."""
    from ref.experiments.report import _figure, _save

    labels = ["none"] + [
        f"{n}\n{setting_label(n, label, r)}" for n, rs in report["attacks"].items() for label, r in rs.items()
    ]
    values = [report["no attack"]] + [r for rs in report["attacks"].values() for r in rs.values()]
    fig, (ax,) = _figure(max(5.0, 1.0 + 1.1 * len(labels)), 4.5)
    for k, (v, color) in enumerate((("base", "C0"), ("unlearned", "C3"))):
        xs = [j + (k - 0.5) * 0.4 for j in range(len(labels))]
        bars = ax.bar(xs, [m[v]["U"] if m[v]["U"] is not None else 0.0 for m in values], 0.4, label=v, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    name = "forget accuracy" if report["goal"] == "wmdp" else "expected max toxicity"
    ax.set(title=f"Under attack: {report['method']} on {report['goal']}", ylabel=name)
    ax.legend()
    return _save(fig, path)


def write_report(report: dict, out: Path) -> None:
    """attack.json, attack.md, and the figures: attack.png, and logitlens.png when the logit lens ran."""
    write_json(out / "attack.json", report)
    atomic_write_text(out / "attack.md", markdown(report))
    print(markdown(report))
    try:
        print(f"wrote {plot(report, out / 'attack.png')}")
        if "logitlens" in report["attacks"]:
            from ref.attacks.logit_lens import plot_by_layer

            (lens,) = report["attacks"]["logitlens"].values()
            title = f"Logit lens: {report['method']} on {report['goal']}"
            print(f"wrote {plot_by_layer(lens['by_layer'], title, out / 'logitlens.png')}")
    except RefError as e:  # no matplotlib: the table and the json are there
        print(f"note: no figure ({e})", file=sys.stderr)


def attack(s: AttackSettings) -> dict:
    """Check `s`, run its attacks and write the report into s.out."""
    check(s)
    torch.manual_seed(s.seed)
    report = run_attacks(s)
    write_report(report, Path(s.out))
    return report


# -------------------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    d = AttackSettings(run_dir=Path("."), out=Path("."))  # the defaults

    def listed(values) -> str:
        return ",".join(map(str, values))

    p = argparse.ArgumentParser(prog="python -m ref.attack", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="a finished ref.unlearn run folder")
    p.add_argument("--out", type=Path, help="folder for attack.json, attack.md and the figures")
    p.add_argument("--dry-run", action="store_true", help="print the memory of the training attacks (--model)")
    p.add_argument("--model", default=None, help="--dry-run: registry alias or model folder (default: the run's)")
    p.add_argument("--attacks", help=f"some of {listed(ATTACKS)} (default: every attack that applies to the run)")
    p.add_argument("--data", default=None, help="hub | demo | DIR (default: the run's data)")
    p.add_argument("--n", default=listed(d.n), help="relearn: examples to fine-tune on, a comma-separated list")
    p.add_argument("--source", default=d.source, choices=SOURCES, help="relearn: where the examples come from")
    p.add_argument("--unrelated", type=int, default=d.unrelated, help="relearn: also on this many retain texts (0: no)")
    p.add_argument("--full-finetune", action="store_true", help="relearn: train the block weights, not LoRA")
    p.add_argument("--formats", default=listed(d.formats), help="quantize: rtn and/or nf4")
    p.add_argument("--bits", default=listed(d.bits), help="quantize: rtn's bit widths, a comma-separated list")
    p.add_argument("--shots", type=int, default=d.shots, help="fewshot: k")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="softprompt: input embeddings trained")
    p.add_argument("--prompt-questions", type=int, default=d.prompt_questions, help="softprompt: the T split's size")
    p.add_argument("--prompt-steps", type=int, default=d.prompt_steps, help="softprompt: Adam steps")
    p.add_argument("--prompt-lr", type=float, default=d.prompt_lr, help="softprompt: Adam's learning rate")
    p.add_argument("--layers", default=None, help="logitlens: layers to read out, comma-separated (default: all)")
    p.add_argument("--prune", default=listed(d.prune), help="prune: fractions of each weight matrix, comma-separated")
    p.add_argument("--prune-texts", type=int, default=d.prune_texts, help="prune: texts of each corpus scoring weights")
    p.add_argument("--limit", type=int, default=None, help="first N questions / prompts of each task")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="samples per toxicity prompt")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    return p


def settings_from(a: argparse.Namespace) -> AttackSettings:
    """The command line's AttackSettings (`check` checks the values)."""
    if a.run_dir is None or a.out is None:
        raise RefError("give the run folder and --out: python -m ref.attack RUN_DIR --out DIR")
    attacks = None
    if a.attacks is not None:
        attacks = tuple(x.strip() for x in a.attacks.split(",") if x.strip())
        if not attacks or set(attacks) - set(ATTACKS):
            raise RefError(f"--attacks is {a.attacks!r}; use some of {', '.join(ATTACKS)}")
    formats = tuple(x.strip() for x in a.formats.split(",") if x.strip())
    if not formats or set(formats) - set(FORMATS):
        raise RefError(f"--formats is {a.formats!r}; use rtn, nf4 or rtn,nf4")
    lists = dict(n=ints("--n", a.n), bits=ints("--bits", a.bits), prune=floats("--prune", a.prune))
    lists |= dict(layers=None if a.layers is None else ints("--layers", a.layers))
    given = vars(a) | lists | dict(run_dir=Path(a.run_dir), attacks=attacks, formats=formats)
    return AttackSettings(**{f.name: given[f.name] for f in fields(AttackSettings)})  # each field is its option


def check(s: AttackSettings) -> None:
    """Every value of `s` in range, --out writable and outside the run's model/ (one RefError line)."""
    for option, values, low, high in (
        ("--n", s.n, 1, None),
        ("--bits", s.bits, 2, 16),
        ("--layers", s.layers or (), 0, None),
    ):
        for v in values:
            validate.number(option, v, low=low, high=high, integer=True)
    for v in s.prune:
        if not 0 < v < 1:
            raise RefError(f"--prune is {v}; give fractions of each weight matrix between 0 and 1, e.g. 0.01,0.05")
    for option, value in (
        ("--shots", s.shots),
        ("--limit", s.limit),
        ("--eval-samples", s.eval_samples),
        ("--prompt-tokens", s.prompt_tokens),
        ("--prompt-questions", s.prompt_questions),
        ("--prompt-steps", s.prompt_steps),
        ("--prune-texts", s.prune_texts),
    ):
        validate.positive(option, value, integer=True)
    validate.positive("--prompt-lr", s.prompt_lr)
    validate.number("--unrelated", s.unrelated, low=0, integer=True)
    validate.number("--seed", s.seed, low=0, integer=True)
    validate.device("--device", s.device)
    validate.dtype("--dtype", s.dtype)
    validate.writable_folder("--out", s.out)
    if validate.same_or_inside(s.out, Path(s.run_dir) / "model"):
        raise RefError(f"--out {s.out} is inside the run's model/; write the attack results elsewhere")


def command(argv: list[str] | None) -> int:
    a = parser().parse_args(argv)
    if a.dry_run:
        if a.model is None and a.run_dir is None:
            raise RefError("--dry-run needs --model (a registry alias or model folder) or a run folder")
        print(dry_run(a.model or read_run(Path(a.run_dir))["plan"]["model"], a.prompt_tokens))
        return 0
    attack(settings_from(a))
    return 0


def dry_run(model: str, prompt_tokens: int = 10, r: int = 128, seq: int = 1024) -> str:
    """The peak memory (bf16 weights) of the attacks that train or tap every layer, beside the unlearning step's:
    relearning (LoRA r 128, batch 1 x 1024 tokens), the soft prompt (a chunk of ref.attacks.softprompt's questions of
    1024 tokens), the logit lens (ref.evaluation.mc's batch of 16 sequences of 1024 tokens)."""
    from ref.attacks.softprompt import CHUNK
    from ref.run.memory import estimate_peak_bytes, logit_lens_peak_bytes, lora_peak_bytes, softprompt_peak_bytes
    from ref.run.plan import Settings
    from ref.run.plan import resolve as resolve_plan
    from ref.unlearn import architecture

    cfg = architecture(model)
    step = estimate_peak_bytes(cfg, resolve_plan(Settings(model=model), cfg), 2)["ours"]
    lora = lora_peak_bytes(cfg, r, seq, 2)
    soft = softprompt_peak_bytes(cfg, prompt_tokens, CHUNK, seq, 2)
    batch = 16  # ref.evaluation.mc's batch of sequences a forward
    lens = logit_lens_peak_bytes(cfg, batch, seq, 2)

    def gib(b: int) -> str:
        return f"{b / 2**30:.1f} GiB"

    relearn = (
        f"relearn attack on {model} (LoRA r {r} on the 7 block linears, batch 1 x {seq} tokens, bf16 weights): peak "
        f"about {gib(lora['total'])} (weights {gib(lora['weights'])}, adapters with AdamW {gib(lora['adapters'])}, "
        f"activations {gib(lora['activations'])}); the unlearning step of its default plan: {gib(step)} "
        f"({lora['total'] / step:.2f}x)."
    )
    softprompt = (
        f"softprompt attack ({prompt_tokens} embeddings, questions in chunks of {CHUNK} x {seq} tokens, no weight "
        f"gradients): peak about {gib(soft['total'])} (weights {gib(soft['weights'])}, activations "
        f"{gib(soft['activations'])}; {soft['total'] / step:.2f}x the unlearning step)."
    )
    logitlens = (
        f"logitlens attack (every layer from one forward, batches of {batch} x {seq} tokens, no gradients): peak "
        f"about {gib(lens['total'])} (weights {gib(lens['weights'])}, every layer's residual stream "
        f"{gib(lens['taps'])}, activations {gib(lens['activations'])}; {lens['total'] / step:.2f}x the unlearning "
        "step). Estimates from the shapes."
    )
    return "\n".join([relearn, softprompt, logitlens])


def ints(option: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise RefError(f"{option} is {value!r}; give comma-separated whole numbers, e.g. 10,100") from None


def floats(option: str, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise RefError(f"{option} is {value!r}; give comma-separated numbers, e.g. 0.01,0.05") from None


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv)

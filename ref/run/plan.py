"""What an unlearning run does, resolved once: the user's `Settings` + the registry defaults + the model's config ->
a frozen `Plan`. The run, `--dry-run` and run.json all read the plan; nothing writes back into the settings.

    python -m ref.unlearn --model mistral-7b --goal wmdp --dry-run
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ref.config import ModelConfig
from ref.io import validate
from ref.io.data import GOALS
from ref.io.errors import RefError
from ref.io.placement import parse_devices, split_blocks
from ref.io.registry import UNLEARN_DEFAULTS, generic_defaults, paper_final_alpha
from ref.losses import REDUCTIONS
from ref.model import Transformer
from ref.objectives import U_DISTRIBUTIONS
from ref.reinforce import ALPHA0, ALPHA_RANGE
from ref.run.memory import estimate_peak_bytes, total_params
from ref.run.options import check_applies, check_values, option

METHODS = ("ours", "rmu", "adaptive-rmu")
TOX_BALANCES = ("paper", "scaled")  # the first is the default
MASTER_WEIGHTS = ("fp32", "model")  # the first is the default
EVAL_SAMPLES = 25  # samples per toxicity prompt in the evaluation (the RealToxicityPrompts protocol)


def _positive(flag: str, value: float) -> None:
    validate.positive(flag, value)


def _count(flag: str, value: int) -> None:
    validate.positive(flag, value, integer=True)


def _index(flag: str, value: int) -> None:
    validate.number(flag, value, low=0, integer=True)


def _alpha0(flag: str, value: float) -> None:
    validate.number(flag, value, low=ALPHA_RANGE[0], high=ALPHA_RANGE[1])


def _non_negative(flag: str, value: float) -> None:
    validate.number(flag, value, low=0)


def _names(flag: str, values: list) -> None:
    if not values:
        raise RefError(f"{flag} is empty; name at least one, or leave it out for the default")
    if len(set(values)) != len(values):
        raise RefError(f"{flag} names {values}, with repeats; name each once")


def _probe_l2(text: str) -> float | None:
    """--probe-l2: "auto" (None: chosen per layer by K-fold) or a number."""
    return None if text == "auto" else float(text)


def _rmu(s: Settings) -> bool:
    return s.method == "rmu"


def _adaptive(s: Settings) -> bool:
    return s.method == "adaptive-rmu"


def _reinforce(s: Settings) -> bool:
    return s.method == "ours" and s.alpha is None


def _ours_toxicity(s: Settings) -> bool:
    return (s.method, s.goal) == ("ours", "toxicity")


def _single_tap(s: Settings) -> bool:
    return not _ours_toxicity(s)


TOX = dict(applies=_ours_toxicity, where="--method ours --goal toxicity")
REINFORCE = dict(applies=_reinforce, where="REINFORCE (--method ours without --alpha)")


@dataclass
class Settings:
    """What the user asked for: the options of `python -m ref.unlearn`, each defined once (ref/run/options.py). None:
    not given, the plan takes the default."""

    model: str = option("smollm2-135m", "registry alias, local Hugging Face model folder, or hub id")
    goal: str = option("wmdp", "wmdp (dangerous knowledge) or toxicity", choices=GOALS)
    method: str = option("ours", "ours (the paper's), rmu or adaptive-rmu", choices=METHODS)
    data: str | None = option(
        None,
        "hub (the paper's datasets, prepared into the cache on first use), demo, or a folder with manifest.json",
        shown="demo for smollm2-135m, else hub",
    )
    out: str = option("runs/unlearn", "the run folder; an existing one is refused without --resume or --overwrite")
    topics: list[str] | None = option(
        None, "forget corpora to use, by file stem (they alternate step by step)", shown="all", check=_names
    )
    tap_layer: int | None = option(
        None,
        "layer whose residual stream the WMDP and RMU losses read",
        shown="registry (7)",
        check=_index,
        applies=_single_tap,
        where="the single-tap objectives (not ours on toxicity, which reads --tox-layers)",
        sweep=True,
    )
    update_layers: list[int] | None = option(
        None,
        "layers whose tensors are trained, comma-separated (a-b a range)",
        shown="registry (5,6,7); ours on toxicity: the probed layers",
        check=_names,
        sweep=True,
    )
    update_params: list[str] | None = option(
        None,
        "tensor names inside a layer, selected by name",
        shown="mlp.down_proj.weight",
        check=_names,
        sweep=True,
    )
    tox_layers: list[int] | None = option(
        None, "the probed layers of eq. 6", shown="3 early, 3 middle, 3 late", check=_names, sweep=True, **TOX
    )
    alpha: float | None = option(
        None,
        "a fixed alpha of eq. 1 (turns REINFORCE off)",
        shown="registry for rmu and adaptive-rmu; REINFORCE for ours",
        check=_non_negative,
        sweep=True,
    )
    alpha0: float | None = option(
        None,
        "initial alpha of REINFORCE, in [1e-3, 1e4], and the meta-objective's retain weight under --tox-balance scaled",
        shown="1",
        check=_alpha0,
        sweep=True,
        **REINFORCE,
    )
    steering: float | None = option(
        None,
        "RMU's steering coefficient c",
        shown="registry",
        check=_positive,
        applies=_rmu,
        where="--method rmu (RMU's fixed c)",
        sweep=True,
    )
    beta: float | None = option(
        None,
        "Adaptive RMU: c = beta x the mean token norm of each topic's first forget batch",
        shown="5",
        check=_positive,
        applies=_adaptive,
        where="--method adaptive-rmu",
        sweep=True,
    )
    raw_probe_weights: bool = option(
        False,
        "eq. 6 with the raw probe weights instead of unit directions (refused with --tox-balance scaled)",
        sweep=True,
        **TOX,
    )
    tox_balance: str | None = option(
        None,
        "paper: eq. 6 summed over the layers as published, REINFORCE's meta-objective L_F + L_R; scaled (ours): each "
        "layer's term divided by its value on the frozen model's first forget batch and averaged, meta-objective "
        "L_F + alpha0 L_R",
        shown="paper",
        choices=TOX_BALANCES,
        sweep=True,
        **TOX,
    )
    token_reduction: str | None = option(
        None,
        "how eq. 2-5 reduce a text's tokens: sum is the paper's (each text's sum, averaged over the texts), mean the "
        "mean over real tokens (eq. 2-3: and hidden units, the RMU reference's F.mse_loss)",
        shown="sum for ours, mean for rmu and adaptive-rmu",
        choices=REDUCTIONS,
        sweep=True,
    )
    u_distribution: str | None = option(
        None,
        "u of eq. 2 and 4: uniform in the positive orthant, normalised (the RMU reference's), or on the unit sphere",
        shown="orthant",
        choices=U_DISTRIBUTIONS,
        sweep=True,
    )
    tox_retain_reduction: str | None = option(
        None,
        "eq. 5 at the probed layers, summed or averaged over them",
        shown="sum",
        choices=REDUCTIONS,
        sweep=True,
        **TOX,
    )
    master_weights: str | None = option(
        None,
        "fp32: AdamW updates fp32 copies of the trained tensors of a bf16 model and rounds them into it after each "
        "step (no copies for an fp32 model); model: AdamW updates them in place, in the model's dtype",
        shown="fp32",
        choices=MASTER_WEIGHTS,
        sweep=True,
    )
    probe_file: str | None = option(
        None,
        'a jsonl of {"text": str, "label": 0 or 1} rows (1 = toxic) to train the eq. 6 probes on, e.g. TRuST\'s '
        "human-annotated training split, which the paper used",
        shown="the data manifest's probe",
        sweep=True,
        **TOX,
    )
    probe_l2: float | None = option(
        None,
        "L2 strength of the eq. 6 probes: auto chooses it per layer by stratified 5-fold held-out AUC over 1e-4..10 "
        "on the probes' training part (ties to the stronger penalty, as scikit-learn's LogisticRegressionCV); a "
        "number fixes it",
        shown="auto",
        check=_positive,
        parse=_probe_l2,
        sweep=True,
        **TOX,
    )
    lr: float | None = option(
        None,
        "AdamW learning rate (eps 1e-6, no weight decay)",
        shown="registry (5e-5; smollm2-135m 1e-3)",
        check=_positive,
        sweep=True,
        resume=True,
    )
    policy_lr: float | None = option(
        None, "REINFORCE's Adam learning rate", shown="1e-2", check=_positive, sweep=True, **REINFORCE
    )
    epochs: int = option(2, "passes over the forget corpora", check=_count, sweep=True, resume=True)
    max_steps: int | None = option(None, "a cap on the steps", shown="none", check=_count, sweep=True, resume=True)
    batch_size: int = option(4, "texts per batch", check=_count, sweep=True)
    max_len: int | None = option(
        None,
        "truncation of the texts, in tokens",
        shown="registry (512; smollm2-135m 128)",
        check=_count,
        sweep=True,
    )
    seed: int = option(0, "data order, u, REINFORCE: the same seed gives the same run on CPU", check=_index, sweep=True)
    dtype: str | None = option(None, "float32 or bfloat16", shown="fp32 on CPU, bf16 on GPU", check=validate.dtype)
    device: str | None = option(
        None,
        "cpu, cuda, cuda:N, or a list cuda:0,cuda:1,... or auto: the blocks split over the devices",
        shown="one device, cuda when there is one",
        check=validate.device,
        resume=True,
    )
    compile: bool = option(True, "run the losses of eq. 2-5 through torch.compile", flag="--no-compile", resume=True)
    save_every: int = option(25, "checkpoint interval in steps", check=_count, resume=True)
    evaluate: bool = option(
        True, "evaluate the base and the unlearned model at the end (report.json)", flag="--no-eval", resume=True
    )
    eval_limit: int | None = option(
        None, "evaluate on the first N questions / prompts of each task", shown="all", check=_count, resume=True
    )
    eval_samples: int | None = option(
        None, "samples per toxicity prompt", shown=str(EVAL_SAMPLES), check=_count, resume=True
    )
    eval_greedy: bool = option(
        False, "one greedy continuation per toxicity prompt (labelled: not comparable)", resume=True
    )
    log_samples: bool = option(
        False, "the evaluation also writes samples.jsonl, one row a question / prompt", resume=True
    )
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    overwrite: bool = option(False, "replace --out, a run folder of ours only")
    dry_run: bool = option(False, "print the plan and a peak-memory estimate; load no weights")
    allow_data_outside: bool = option(False, "let the data manifest name files outside the data folder")


@dataclass(frozen=True)
class Plan:
    """Every value a run uses. Layer i is the residual stream after block i (the RMU reference's layers[7] is 7)."""

    model: str
    goal: str
    method: str
    data: str
    topics: tuple[str, ...] | None
    taps: tuple[int, ...]  # the layers the objective reads: (tap layer,) or the probed layers
    tox_layers: tuple[int, ...]  # the probed layers of eq. 6 (ours on toxicity), else ()
    update_layers: tuple[int, ...]
    update_params: tuple[str, ...]
    tensors: tuple[str, ...]  # the trained tensors, by name: model.layers.{i}.{param}
    alpha: float | None  # the fixed alpha of eq. 1; None: learned by REINFORCE
    alpha0: float | None  # REINFORCE's initial alpha
    policy_lr: float | None
    steering: float | None  # RMU's fixed c
    beta: float | None  # Adaptive RMU: c = beta * mean forget norm on each topic's first batch
    raw_probe_weights: bool
    tox_balance: str | None  # ours on toxicity: "paper" (eq. 6 summed) or "scaled" (normalised per layer)
    token_reduction: str  # eq. 2-5: "sum" over each text's real tokens (the paper's), or "mean" over real tokens
    u_distribution: str  # eq. 2, 4: u uniform in the positive "orthant" (the RMU reference) or on the "sphere"
    tox_retain_reduction: str | None  # ours on toxicity: eq. 5 "sum" or "mean" over the probed layers; else None
    master_weights: str  # "fp32": AdamW updates fp32 copies of the trained tensors (a bf16 model); "model": in place
    probe_file: str | None  # ours on toxicity: the probes' data file instead of the manifest's probe
    probe_l2: float | None  # the probes' fixed L2 (ours on toxicity); None: chosen per layer by K-fold (or no probes)
    lr: float
    max_len: int
    batch_size: int
    epochs: int
    max_steps: int | None
    seed: int
    dtype: str | None
    device: str | None
    compile: bool
    save_every: int
    evaluate: bool
    eval_limit: int | None
    eval_samples: int
    eval_greedy: bool
    log_samples: bool
    allow_data_outside: bool

    @property
    def start(self) -> int:
        """First block run with gradients; the blocks below run once per batch under no_grad."""
        return min(self.update_layers)

    @property
    def loaded_blocks(self) -> int:
        """Blocks the training reads: 0..deepest tap (the rest of the model only for the evaluation)."""
        return max(self.taps) + 1

    @property
    def reinforce(self) -> bool:
        return self.alpha is None

    @property
    def meta_retain_weight(self) -> float:
        """lambda of REINFORCE's meta-objective L_F + lambda L_R (ref.reinforce): alpha0 under the scaled toxicity
        balance, else 1."""
        return self.alpha0 if self.tox_balance == "scaled" and self.reinforce else 1.0


def given(value, default):
    """The user's value when given, else the default: None means "not given", and 0 or [] are values."""
    return default if value is None else value


def tox_balance(user: Settings) -> str | None:
    """The toxicity balance a run of these settings uses: the user's, else the default; None outside ours on
    toxicity."""
    return given(user.tox_balance, TOX_BALANCES[0]) if (user.method, user.goal) == ("ours", "toxicity") else None


def token_reduction(user: Settings) -> str:
    """How eq. 2-5 reduce a text's tokens: the user's, else the paper's sum for ours (eq. 4-5) and the RMU reference's
    mean for rmu and adaptive-rmu (eq. 2-3, where alpha 1200 is tuned to F.mse_loss's scale)."""
    return given(user.token_reduction, "sum" if user.method == "ours" else "mean")


def check_settings(user: Settings) -> None:
    """Every value the user gave, alone (each option's choices and check) and in combination (where an option
    applies, and the pairs below), before anything is read, created or deleted. Layer indices are checked against the
    model in `resolve`."""
    check_values(user)
    check_applies(user)
    if user.raw_probe_weights and tox_balance(user) == "scaled":
        raise RefError(
            "--raw-probe-weights has no effect under --tox-balance scaled (each layer's eq. 6 term is divided by its "
            "own start, so the probe's norm cancels); leave one of them out"
        )
    if user.resume and user.overwrite:
        raise RefError("--resume and --overwrite contradict each other: pick one")
    if user.eval_greedy and user.eval_samples is not None:
        raise RefError(
            f"--eval-samples {user.eval_samples} and --eval-greedy contradict each other: greedy decoding takes one "
            "continuation per prompt; pick one"
        )


def resolve(settings: Settings, cfg: ModelConfig) -> Plan:
    """The plan of a run from its settings, the registry defaults and the model's config, validated."""
    user = settings
    check_settings(user)
    defaults = UNLEARN_DEFAULTS.get(user.model) or generic_defaults(cfg.num_layers)
    ours, toxicity = user.method == "ours", user.goal == "toxicity"
    tox = tuple(sorted(given(user.tox_layers, defaults.tox_layers))) if ours and toxicity else ()
    taps = tox or (given(user.tap_layer, defaults.tap_layer),)
    update = tuple(sorted(given(user.update_layers, tox or defaults.update_layers)))
    for i in taps + update:
        if not 0 <= i < cfg.num_layers:
            raise RefError(f"layer {i} is out of range: {user.model} has layers 0..{cfg.num_layers - 1}")
    if max(update) > max(taps):
        raise RefError(
            f"updated layer {max(update)} is above the deepest tap {max(taps)}: "
            "it would get no gradient; lower --update-layers or raise the tap"
        )
    if min(taps) < min(update):
        raise RefError(
            f"tap layer {min(taps)} is below the first updated layer {min(update)}: "
            "its loss could not change; update a layer at or below every tap"
        )
    params = tuple(given(user.update_params, defaults.update_params))
    reinforce = ours and user.alpha is None
    alpha0 = given(user.alpha0, ALPHA0)
    return Plan(
        model=user.model,
        goal=user.goal,
        method=user.method,
        data=given(user.data, defaults.data),
        topics=tuple(user.topics) if user.topics is not None else None,
        taps=taps,
        tox_layers=tox,
        update_layers=update,
        update_params=params,
        tensors=tensor_names(cfg, update, params),
        alpha=given(user.alpha, None if ours else defaults.rmu_alpha),
        alpha0=alpha0 if reinforce else None,
        policy_lr=given(user.policy_lr, defaults.policy_lr) if reinforce else None,
        steering=given(user.steering, defaults.steering) if user.method == "rmu" else None,
        beta=given(user.beta, defaults.beta) if user.method == "adaptive-rmu" else None,
        raw_probe_weights=user.raw_probe_weights,
        tox_balance=tox_balance(user),
        token_reduction=token_reduction(user),
        u_distribution=given(user.u_distribution, U_DISTRIBUTIONS[0]),
        tox_retain_reduction=given(user.tox_retain_reduction, "sum") if tox else None,
        master_weights=given(user.master_weights, MASTER_WEIGHTS[0]),
        probe_file=user.probe_file,
        probe_l2=user.probe_l2 if tox else None,
        lr=given(user.lr, defaults.lr),
        max_len=given(user.max_len, defaults.max_len),
        batch_size=user.batch_size,
        epochs=user.epochs,
        max_steps=user.max_steps,
        seed=user.seed,
        dtype=user.dtype,
        device=user.device,
        compile=user.compile,
        save_every=user.save_every,
        evaluate=user.evaluate,
        eval_limit=user.eval_limit,
        eval_samples=given(user.eval_samples, EVAL_SAMPLES),
        eval_greedy=user.eval_greedy,
        log_samples=user.log_samples,
        allow_data_outside=user.allow_data_outside,
    )


def tensor_names(cfg: ModelConfig, layers: tuple[int, ...], params: tuple[str, ...]) -> tuple[str, ...]:
    """model.layers.{i}.{name} for each layer and name, checked against the decoder's own parameter names."""
    with torch.device("meta"):  # the names without any weights
        named = {k for k, _ in Transformer(cfg).named_parameters()}
    for name in params:
        if f"model.layers.{layers[0]}.{name}" not in named:
            prefix = f"model.layers.{layers[0]}."
            inside = sorted(k[len(prefix) :] for k in named if k.startswith(prefix))
            raise RefError(f"unknown parameter name {name!r}: a layer has {', '.join(inside)}")
    return tuple(f"model.layers.{i}.{name}" for i in layers for name in params)


def as_dict(plan: Plan) -> dict:
    """The plan as run.json keeps it (tuples as lists)."""
    return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(plan) for v in [getattr(plan, f.name)]}


def describe(plan: Plan, cfg: ModelConfig, steps: int | None) -> str:
    """The plan in words: blocks run, taps, tensors updated, alpha, steps and the peak-memory estimate. The run
    prints it at its start and --dry-run prints it alone."""
    devices = parse_devices(plan.device)
    on_cpu = devices is not None and devices[0].type == "cpu"
    dtype = plan.dtype or ("float32" if on_cpu else "bfloat16")  # as load_model chooses on a GPU box
    bytes_per = torch.finfo(getattr(torch, dtype)).bits // 8
    est = estimate_peak_bytes(cfg, plan, bytes_per)
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    gpus = lambda b: math.ceil(b / GPU_BYTES)
    alpha = f"REINFORCE from alpha0 = {plan.alpha0:g}" if plan.reinforce else f"fixed {plan.alpha:g}"
    paper_alpha = paper_final_alpha(plan.model, plan.goal)
    if plan.reinforce and paper_alpha is not None:
        alpha += f" (the paper's final alpha for this model: {paper_alpha:g}, a reference)"
    probe_l2 = "chosen per layer by 5-fold AUC" if plan.probe_l2 is None else f"fixed {plan.probe_l2:g}"
    probe_data = f"--probe-file {plan.probe_file}" if plan.probe_file else f"the 'probe' file of the {plan.data} data"
    k, n = plan.loaded_blocks, cfg.num_layers
    rest = "the final norm and the LM head"
    if k < n:
        rest = f"blocks {k}..{n - 1}, {rest} ({gib(est['full_weights'] - est['weights'])})"
    lines = [
        f"plan: {plan.method} on {plan.goal}, model {plan.model} ({cfg.model_type}, {n} layers, "
        f"{total_params(cfg) / 1e9:.2f} B parameters)",
        f"- loads the embedding and blocks 0..{k - 1} ({gib(est['weights'])} of {gib(est['full_weights'])}); "
        f"{rest} are read only to evaluate",
        f"- blocks 0..{plan.start - 1} run once per batch under no_grad (shared by the updated and frozen passes)"
        if plan.start
        else "- no shared prefix (the first block is updated)",
        f"- blocks {plan.start}..{max(plan.taps)} run with gradients; none above {max(plan.taps)}; no LM head",
        f"- taps: {list(plan.taps)}",
        *(
            [
                f"- probes of eq. 6: {'raw weights' if plan.raw_probe_weights else 'unit directions'}, L2 {probe_l2}, "
                f"trained on {probe_data}",
                f"- balance: {BALANCE_WORDS[plan.tox_balance]}; eq. 5 {plan.tox_retain_reduction}med over the "
                "probed layers",
            ]
            if plan.tox_layers
            else []
        ),
        f"- token reduction of eq. {'4-5' if plan.method == 'ours' else '2-3'}: "
        f"{REDUCTION_WORDS[plan.token_reduction]}",
        f"- updated tensors ({len(plan.tensors)}, {gib(est['updated_tensors'])}): {', '.join(plan.tensors)}",
        f"- alpha: {alpha}; lr {plan.lr:g}"
        + (f"; steering c = {plan.steering:g}" if plan.steering is not None else "")
        + (f"; adaptive c, beta = {plan.beta:g}" if plan.beta is not None else ""),
        f"- master weights: {MASTER_WORDS[plan.master_weights]}"
        + (f"; fp32 copies, gradients and AdamW states {gib(est['master_weights'])}" if est["master_weights"] else ""),
        f"- steps: {'unknown' if steps is None else steps} (data {plan.data}"
        f"{' not prepared' if steps is None else ''}), batch {plan.batch_size} x {plan.max_len} tokens",
        f"- estimated peak memory of a step ({bytes_per * 8}-bit weights): ours {gib(est['ours'])}, "
        f"reference structure {gib(est['reference'])} ({est['ours'] / est['reference']:.2f}x)",
    ]
    if not on_cpu:
        lines.append(
            f"- 80 GiB GPUs needed: training {gpus(est['ours'])}, evaluation (the whole model, "
            f"{gib(est['full_weights'])} of weights) {gpus(est['full_weights'] * EVAL_OVERHEAD)}; "
            "split with --device cuda:0,cuda:1,... or auto"
        )
    if devices is not None and (len(devices) > 1 or plan.device == "auto"):
        lines.append(f"- placement: {split_blocks(cfg, devices).describe()}")
    return "\n".join(lines)


BALANCE_WORDS = {
    "paper": "paper: eq. 6 summed over the layers, REINFORCE's meta-objective L_F + L_R",
    "scaled": "scaled (ours): eq. 6 normalised per layer by its value on the first forget batch, REINFORCE's "
    "meta-objective L_F + alpha0 L_R",
}
REDUCTION_WORDS = {
    "sum": "sum over each text's real tokens, averaged over texts (the paper's E_x sum_t)",
    "mean": "mean over the batch's real tokens (eq. 2-3: and hidden units, the RMU reference's F.mse_loss)",
}
MASTER_WORDS = {
    "fp32": "fp32 (AdamW updates fp32 copies of the trained tensors, rounded into the model after each step; "
    "no copies for an fp32 model)",
    "model": "model (AdamW updates the trained tensors in the model's dtype)",
}

# One 80 GiB accelerator (A100 / H100 80GB); the evaluation's activations, KV cache and logits on top of the weights.
GPU_BYTES, EVAL_OVERHEAD = 80 * 2**30, 1.1

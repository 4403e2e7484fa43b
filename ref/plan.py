"""What an unlearning run does, resolved once: the user's `Settings` + the registry defaults + the model's config ->
a frozen `Plan`. The run, `--dry-run` and run.json all read the plan; nothing writes back into the settings.

    python -m ref.unlearn --model mistral-7b --goal wmdp --dry-run
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ref import validate
from ref.config import ModelConfig
from ref.errors import RefError
from ref.losses import REDUCTIONS
from ref.memory import estimate_peak_bytes, total_params
from ref.model import Transformer
from ref.objectives import U_DISTRIBUTIONS
from ref.placement import parse_devices, split_blocks
from ref.registry import UNLEARN_DEFAULTS, generic_defaults, paper_final_alpha
from ref.reinforce import ALPHA0, ALPHA_RANGE

METHODS = ("ours", "rmu", "adaptive-rmu")
GOALS = ("wmdp", "toxicity")
TOX_BALANCES = ("paper", "scaled")  # the first is the default
MASTER_WEIGHTS = ("fp32", "model")  # the first is the default
EVAL_SAMPLES = 25  # samples per toxicity prompt in the evaluation (the RealToxicityPrompts protocol)


@dataclass
class Settings:
    """What the user asked for (`python -m ref.unlearn` options). None: not given, the plan takes the default."""

    model: str = "smollm2-135m"
    goal: str = "wmdp"
    method: str = "ours"
    data: str | None = None  # hub | demo | a folder; None: the registry's (demo for smollm2-135m, else hub)
    out: str = "runs/unlearn"
    topics: list[str] | None = None  # forget corpora to use (default: all in the manifest)
    tap_layer: int | None = None
    update_layers: list[int] | None = None  # default: the registry's (toxicity + ours: the probed layers)
    update_params: list[str] | None = None  # names inside a layer, e.g. mlp.down_proj.weight
    tox_layers: list[int] | None = None  # default: 3 early, 3 middle, 3 late
    alpha: float | None = None  # a fixed alpha (turns REINFORCE off); rmu default: the registry's
    alpha0: float | None = None  # initial alpha of REINFORCE; None: 1 (ALPHA0)
    steering: float | None = None  # RMU's c
    beta: float | None = None  # Adaptive RMU
    raw_probe_weights: bool = False  # eq. 6 with the raw probe weights instead of unit directions
    tox_balance: str | None = None  # ours on toxicity: "paper" (default: eq. 6 summed) or "scaled" (ours)
    token_reduction: str | None = None  # eq. 2-5: "sum" (the paper's; default of ours) or "mean" (default of RMU)
    u_distribution: str | None = None  # eq. 2, 4: u "orthant" (default, the RMU reference's) or "sphere"
    tox_retain_reduction: str | None = None  # ours on toxicity: eq. 5 "sum"med (default) or "mean"ed over layers
    master_weights: str | None = None  # "fp32" (default: AdamW updates fp32 copies of the trained tensors) or "model"
    probe_file: str | None = None  # ours on toxicity: the probes' (text, label) jsonl instead of the manifest's
    probe_l2: float | None = None  # L2 of the eq. 6 probes; None: chosen per layer by K-fold AUC (--probe-l2 auto)
    lr: float | None = None
    policy_lr: float | None = None
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 4
    max_len: int | None = None
    seed: int = 0
    dtype: str | None = None  # None: fp32 on CPU, bf16 on GPU
    device: str | None = None  # None: cuda when available
    compile: bool = True
    save_every: int = 25
    evaluate: bool = True  # evaluate the base and the unlearned model at the end (report.json)
    eval_limit: int | None = None  # first N questions / prompts of each evaluation task
    eval_samples: int | None = None  # samples per toxicity prompt; None: EVAL_SAMPLES (one greedy with eval_greedy)
    eval_greedy: bool = False  # one greedy continuation per prompt (labelled: not comparable)
    log_samples: bool = False  # also write samples.jsonl: one row a question / prompt, before and after
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False  # print the plan and the memory estimate, load no weights
    allow_data_outside: bool = False  # the data manifest may name files outside the data folder


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


def ran_tox_balance(plan: dict) -> str | None:
    """The toxicity balance of a recorded plan (run.json); plans from before the option had the paper's form."""
    return plan.get("tox_balance", "paper" if plan.get("tox_layers") else None)


def token_reduction(user: Settings) -> str:
    """How eq. 2-5 reduce a text's tokens: the user's, else the paper's sum for ours (eq. 4-5) and the RMU reference's
    mean for rmu and adaptive-rmu (eq. 2-3, where alpha 1200 is tuned to F.mse_loss's scale)."""
    return given(user.token_reduction, "sum" if user.method == "ours" else "mean")


def check_settings(user: Settings) -> None:
    """Every value the user gave, alone (range, sign, finiteness) and in combination, before anything is read,
    created or deleted. Layer indices are checked against the model in `resolve`."""
    if user.goal not in GOALS or user.method not in METHODS:
        raise RefError(f"--goal must be one of {GOALS} and --method one of {METHODS}")
    for option, value in (("--lr", user.lr), ("--policy-lr", user.policy_lr), ("--steering", user.steering),
                          ("--beta", user.beta), ("--probe-l2", user.probe_l2)):  # fmt: skip
        validate.positive(option, value)
    validate.number("--alpha", user.alpha, low=0)
    validate.number("--alpha0", user.alpha0, low=ALPHA_RANGE[0], high=ALPHA_RANGE[1])
    for option, value in (("--epochs", user.epochs), ("--max-steps", user.max_steps), ("--batch-size", user.batch_size),
                          ("--max-len", user.max_len), ("--save-every", user.save_every),
                          ("--eval-limit", user.eval_limit), ("--eval-samples", user.eval_samples)):  # fmt: skip
        validate.positive(option, value, integer=True)
    validate.number("--seed", user.seed, low=0, integer=True)
    validate.number("--tap-layer", user.tap_layer, low=0, integer=True)
    for name in ("topics", "update_layers", "update_params", "tox_layers"):
        values, option = getattr(user, name), f"--{name.replace('_', '-')}"
        if values == []:
            raise RefError(f"{option} is empty; name at least one, or leave it out for the default")
        if values is not None and len(set(values)) != len(values):
            raise RefError(f"{option} names {values}, with repeats; name each once")
    for option, value, choices in (("--tox-balance", user.tox_balance, TOX_BALANCES),
                                   ("--token-reduction", user.token_reduction, REDUCTIONS),
                                   ("--u-distribution", user.u_distribution, U_DISTRIBUTIONS),
                                   ("--tox-retain-reduction", user.tox_retain_reduction, REDUCTIONS),
                                   ("--master-weights", user.master_weights, MASTER_WEIGHTS)):  # fmt: skip
        if value not in (None, *choices):
            raise RefError(f"{option} is {value!r}; use one of {', '.join(choices)}")
    validate.device("--device", user.device)
    validate.dtype("--dtype", user.dtype)
    ours_toxicity = (user.method, user.goal) == ("ours", "toxicity")
    reinforce = user.method == "ours" and user.alpha is None
    only = [("--steering", user.steering, user.method == "rmu", "--method rmu (RMU's fixed c)"),
            ("--beta", user.beta, user.method == "adaptive-rmu", "--method adaptive-rmu"),
            ("--alpha0", user.alpha0, reinforce, "REINFORCE (--method ours without --alpha)"),
            ("--policy-lr", user.policy_lr, reinforce, "REINFORCE (--method ours without --alpha)"),
            ("--tox-layers", user.tox_layers, ours_toxicity, "--method ours --goal toxicity"),
            ("--raw-probe-weights", user.raw_probe_weights or None, ours_toxicity, "--method ours --goal toxicity"),
            ("--tox-balance", user.tox_balance, ours_toxicity, "--method ours --goal toxicity"),
            ("--tox-retain-reduction", user.tox_retain_reduction, ours_toxicity, "--method ours --goal toxicity"),
            ("--probe-l2", user.probe_l2, ours_toxicity, "--method ours --goal toxicity"),
            ("--probe-file", user.probe_file, ours_toxicity, "--method ours --goal toxicity"),
            ("--tap-layer", user.tap_layer, not ours_toxicity, "the single-tap objectives (ours on toxicity reads "
             "the --tox-layers)")]  # fmt: skip
    for option, value, applies, where in only:
        if value is not None and not applies:
            raise RefError(f"{option} applies to {where} only; leave it out for --method {user.method} "
                           f"--goal {user.goal}")  # fmt: skip
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
        raise RefError(f"updated layer {max(update)} is above the deepest tap {max(taps)}: "
                       "it would get no gradient; lower --update-layers or raise the tap")  # fmt: skip
    if min(taps) < min(update):
        raise RefError(f"tap layer {min(taps)} is below the first updated layer {min(update)}: "
                       "its loss could not change; update a layer at or below every tap")  # fmt: skip
    params = tuple(given(user.update_params, defaults.update_params))
    reinforce = ours and user.alpha is None
    alpha0 = given(user.alpha0, ALPHA0)
    return Plan(
        model=user.model, goal=user.goal, method=user.method, data=given(user.data, defaults.data),
        topics=tuple(user.topics) if user.topics is not None else None,
        taps=taps, tox_layers=tox, update_layers=update, update_params=params,
        tensors=tensor_names(cfg, update, params),
        alpha=given(user.alpha, None if ours else defaults.rmu_alpha),
        alpha0=alpha0 if reinforce else None,
        policy_lr=given(user.policy_lr, defaults.policy_lr) if reinforce else None,
        steering=given(user.steering, defaults.steering) if user.method == "rmu" else None,
        beta=given(user.beta, defaults.beta) if user.method == "adaptive-rmu" else None,
        raw_probe_weights=user.raw_probe_weights, tox_balance=tox_balance(user),
        token_reduction=token_reduction(user), u_distribution=given(user.u_distribution, U_DISTRIBUTIONS[0]),
        tox_retain_reduction=given(user.tox_retain_reduction, "sum") if tox else None,
        master_weights=given(user.master_weights, MASTER_WEIGHTS[0]), probe_file=user.probe_file,
        probe_l2=user.probe_l2 if tox else None,
        lr=given(user.lr, defaults.lr), max_len=given(user.max_len, defaults.max_len),
        batch_size=user.batch_size, epochs=user.epochs, max_steps=user.max_steps, seed=user.seed, dtype=user.dtype,
        device=user.device, compile=user.compile, save_every=user.save_every, evaluate=user.evaluate,
        eval_limit=user.eval_limit, eval_samples=given(user.eval_samples, EVAL_SAMPLES), eval_greedy=user.eval_greedy,
        log_samples=user.log_samples, allow_data_outside=user.allow_data_outside,
    )  # fmt: skip


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
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    gpus = lambda b: math.ceil(b / GPU_BYTES)  # noqa: E731
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
        lines.append(f"- 80 GiB GPUs needed: training {gpus(est['ours'])}, evaluation (the whole model, "
                     f"{gib(est['full_weights'])} of weights) {gpus(est['full_weights'] * EVAL_OVERHEAD)}; "
                     "split with --device cuda:0,cuda:1,... or auto")  # fmt: skip
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

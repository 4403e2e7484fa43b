"""Unlearning: RMU, Adaptive RMU, and the paper's goal-dependent objectives, in one loop.

    python -m ref.unlearn --model mistral-7b --goal wmdp                       # the paper's method (ours)
    python -m ref.unlearn --model smollm2-135m --goal toxicity --data demo --out runs/t

Methods (eq. numbers are the paper's; L = L_F + alpha * L_R, eq. 1):
- rmu:          eq. 2 + eq. 3 at the tap layer, fixed alpha and steering coefficient c.
- adaptive-rmu: as rmu, with c = beta * mean token norm of the forget activations on each topic's first batch.
- ours, wmdp:   eq. 4 + eq. 5 at the tap layer, alpha learned by REINFORCE (ref.reinforce).
- ours, toxicity: eq. 6 over the 9 probed layers + eq. 5 averaged over the same layers, alpha by REINFORCE.

Memory and speed (DESIGN section 8): one copy of the weights. The frozen model is the same modules called with the
original values of the few updated tensors (torch.func.functional_call), the forward stops after the deepest tap and
never runs the LM head, and the prefix below the first updated layer is computed once per batch under no_grad and
shared by the updated and the frozen passes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch.func import functional_call
from tqdm.auto import tqdm

from ref import losses
from ref.checkpoint import load_model, save_model
from ref.data import batches, load_goal_data, prepared_hub_dir, resolve_data_dir
from ref.errors import RefError
from ref.model import Transformer
from ref.plan import defaults_for, describe, resolve_layers
from ref.probe import last_token_features, train_probe
from ref.registry import default_data
from ref.reinforce import AlphaPolicy
from ref.runlog import (
    MetricsLog,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    prepare_out_dir,
    write_json,
)
from ref.tokenizer import Tokenizer, load_tokenizer

METHODS = ("ours", "rmu", "adaptive-rmu")
GOALS = ("wmdp", "toxicity")


@dataclass
class Settings:
    model: str = "smollm2-135m"
    goal: str = "wmdp"
    method: str = "ours"
    data: str | None = None  # hub | demo | a folder; None: the registry default (demo for smollm2-135m, else hub)
    out: str = "runs/unlearn"
    topics: list[str] | None = None  # forget corpora to use (default: all in the manifest)
    tap_layer: int | None = None  # registry default
    update_layers: list[int] | None = None  # registry default (toxicity + ours: the probed layers)
    update_params: list[str] | None = None  # names inside a layer, e.g. mlp.down_proj.weight
    tox_layers: list[int] | None = None  # registry default: 3 early, 3 middle, 3 late
    alpha: float | None = None  # fixed alpha (turns REINFORCE off); rmu default: the registry's
    alpha0: float | None = None  # initial alpha of REINFORCE
    steering: float | None = None  # RMU c
    beta: float = 5.0  # Adaptive RMU
    raw_probe_weights: bool = False  # eq. 6 with the raw probe weights instead of unit directions
    probe_l2: float = 1e-2
    lr: float | None = None  # registry default (5e-5, the paper's)
    policy_lr: float = 1e-2
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 4
    max_len: int | None = None
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    compile: bool = True
    save_every: int = 25
    evaluate: bool = True  # evaluate the base and the unlearned model at the end (report.json)
    eval_limit: int | None = None  # first N questions / prompts of each evaluation task
    eval_samples: int = 25  # samples per toxicity prompt
    eval_greedy: bool = False  # one greedy continuation per prompt (labelled: not comparable)
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False  # print the plan and the memory estimate, load no weights
    resolved: dict = field(default_factory=dict)  # filled in: the values actually used

    def __post_init__(self):
        self.data = self.data or default_data(self.model)


class NonFiniteLoss(RefError):
    pass


class Unlearner:
    """Holds the model, the updated tensors and their original values, and runs one step at a time."""

    def __init__(self, s: Settings, model: Transformer, tok: Tokenizer, data):
        self.s, self.model, self.tok, self.data = s, model, tok, data
        d = defaults_for(s.model, model.config.num_layers)
        self.layers = resolve_layers(s, model.config.num_layers)
        self.ours_tox = s.method == "ours" and s.goal == "toxicity"
        self.tox_layers, self.taps = self.layers.tox_layers, self.layers.taps
        self.tap = self.taps[0] if not self.ours_tox else None
        self.update_layers, self.update_params = self.layers.update_layers, self.layers.update_params
        self.start = self.layers.start  # blocks below run once per batch under no_grad
        self.params = self.select_params()
        self.originals = {k: p.detach().clone() for k, p in self.params.items()}
        self.steering_fixed = s.steering if s.steering is not None else d.steering
        self.steering: dict[str, float] = {}  # per topic (adaptive-rmu fills it from the first batch)
        self.u = self.random_directions(model.config.hidden_size)
        self.probes, self.directions = {}, None
        rein = s.method == "ours" and s.alpha is None
        alpha0 = s.alpha0 or (d.alpha0_toxicity if s.goal == "toxicity" else d.alpha0)
        self.policy = AlphaPolicy(alpha0, lr=s.policy_lr, seed=s.seed) if rein else None
        self.alpha = s.alpha if s.alpha is not None else (d.rmu_alpha if s.method != "ours" else alpha0)
        self.max_len = s.max_len or d.max_len
        self.lr = s.lr or d.lr
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=self.lr, eps=1e-6, weight_decay=0.0)
        losses.set_compile(s.compile)
        s.resolved = dict(tap_layer=self.tap, taps=self.taps, update_layers=self.update_layers,
                          updated_tensors=list(self.params), tox_layers=self.tox_layers, alpha=self.alpha,
                          alpha0=alpha0 if rein else None, reinforce=rein, max_len=self.max_len, lr=self.lr,
                          steering=self.steering_fixed if s.method == "rmu" else None)  # fmt: skip

    def select_params(self) -> dict[str, torch.nn.Parameter]:
        """The trained tensors, by name: model.layers.{i}.{name} for each updated layer and parameter name."""
        named = dict(self.model.named_parameters())
        out = {}
        for i in self.update_layers:
            for name in self.update_params:
                full = f"model.layers.{i}.{name}"
                if full not in named:
                    inside = sorted(
                        k.split(f"model.layers.{i}.", 1)[1] for k in named if k.startswith(f"model.layers.{i}.")
                    )
                    raise RefError(f"unknown parameter name {name!r}: a layer has {', '.join(inside)}")
                out[full] = named[full].requires_grad_(True)
        return out

    def random_directions(self, dim: int) -> dict[str, torch.Tensor]:
        """One fixed random unit vector per forget corpus, uniform in the positive orthant then normalised (as the
        RMU reference's torch.rand), seeded by (seed, corpus index)."""
        dev = next(self.model.parameters()).device
        out = {}
        for i, topic in enumerate(self.data.forget):
            g = torch.Generator().manual_seed(self.s.seed * 1000 + i)
            u = torch.rand(dim, generator=g)
            out[topic] = (u / u.norm()).to(dev)
        return out

    # ---- forwards ----

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(self.model.parameters()).device
        ids, mask = self.tok.batch(texts, max_length=self.max_len)
        return ids.to(dev), mask.to(dev)

    @torch.no_grad()
    def prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Residual stream entering the first updated layer (the input ids when that is layer 0)."""
        if self.start == 0:
            return ids
        return self.model(ids, mask, taps=[self.start - 1], stop_after=self.start - 1).taps[self.start - 1]

    def _kwargs(self, prefix: torch.Tensor, mask: torch.Tensor) -> dict:
        kw = dict(attention_mask=mask, taps=self.taps, stop_after=max(self.taps))
        if self.start == 0:
            return dict(kw, input_ids=prefix)
        return dict(kw, hidden=prefix, start_layer=self.start)

    def updated_taps(self, prefix: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.model(**self._kwargs(prefix, mask)).taps

    @torch.no_grad()
    def frozen_taps(self, prefix: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """The original model's taps: the same modules, called with the original values of the updated tensors."""
        return functional_call(self.model, self.originals, args=(), kwargs=self._kwargs(prefix, mask)).taps

    # ---- objectives ----

    def objective(self, hf, fmask, hr, h0, rmask, topic) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """(L_F, L_R, per-layer forget losses) for the configured method and goal."""
        c = losses.compiled
        if self.ours_tox:
            h_last = [losses.last_token(hf[i], fmask) for i in self.tox_layers]
            lf, per_layer = losses.probe_projection_loss(h_last, self.directions)  # eager: see ref.losses
            lr = torch.stack([c(losses.cosine_retain_loss)(hr[i], h0[i], rmask) for i in self.tox_layers]).mean()
            return lf, lr, per_layer.tolist()
        if self.s.method == "ours":
            lf = c(losses.cosine_forget_loss)(hf[self.tap], self.u[topic], fmask)
            return lf, c(losses.cosine_retain_loss)(hr[self.tap], h0[self.tap], rmask), []
        lf = c(losses.rmu_forget_loss)(hf[self.tap], self.u[topic], self.steering[topic], fmask)
        return lf, c(losses.rmu_retain_loss)(hr[self.tap], h0[self.tap], rmask), []

    def fit_probes(self) -> dict:
        """Per-layer L2 logistic-regression probes on the frozen model's last-token states (toxicity, ours)."""
        texts = [t for t, _ in self.data.probe]
        labels = torch.tensor([y for _, y in self.data.probe])
        feats = {i: [] for i in self.tox_layers}
        for k in range(0, len(texts), self.s.batch_size * 4):
            ids, mask = self.encode(texts[k : k + self.s.batch_size * 4])
            for i, x in last_token_features(self.model, ids, mask, self.tox_layers).items():
                feats[i].append(x.cpu())
        self.probes = {i: train_probe(torch.cat(feats[i]), labels, seed=self.s.seed, l2=self.s.probe_l2)
                       for i in self.tox_layers}  # fmt: skip
        rows = [(p.weight if self.s.raw_probe_weights else p.direction) for p in self.probes.values()]
        self.directions = torch.stack(rows).float().to(next(self.model.parameters()).device)
        return {i: dict(heldout_auc=p.heldout_auc, train_auc=p.train_auc) for i, p in self.probes.items()}

    # ---- one step ----

    def step(self, forget_texts: list[str], retain_texts: list[str], topic: str) -> dict:
        fids, fmask = self.encode(forget_texts)
        rids, rmask = self.encode(retain_texts)
        fpre, rpre = self.prefix(fids, fmask), self.prefix(rids, rmask)
        h0 = self.frozen_taps(rpre, rmask)
        if self.s.method == "adaptive-rmu" and topic not in self.steering:
            first = self.frozen_taps(fpre, fmask)[self.tap]
            self.steering[topic] = float(losses.adaptive_steering_coefficient(first, fmask, self.s.beta))
        elif self.s.method == "rmu":
            self.steering[topic] = self.steering_fixed
        alpha = self.policy.sample() if self.policy else self.alpha
        lf, lr, per_layer = self.objective(self.updated_taps(fpre, fmask), fmask, self.updated_taps(rpre, rmask),
                                           h0, rmask, topic)  # fmt: skip
        loss = lf + alpha * lr
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is not finite (forget {lf.item()}, retain {lr.item()})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        row = dict(topic=topic, loss=loss.item(), forget_loss=lf.item(), retain_loss=lr.item(), alpha=alpha)
        if per_layer:
            row["forget_loss_layers"] = dict(zip(map(str, self.tox_layers), per_layer, strict=True))
        if self.policy:
            with torch.no_grad():
                lf2, lr2, _ = self.objective(self.updated_taps(fpre, fmask), fmask, self.updated_taps(rpre, rmask),
                                             h0, rmask, topic)  # fmt: skip
            info = self.policy.update((lf + lr).item() - (lf2 + lr2).item())
            row.update(reward=info["reward"], policy_mean=info["policy_mean"], policy_std=info["policy_std"])
        row["tokens"] = int(fmask.sum() + rmask.sum())
        return row

    # ---- checkpoints ----

    def state(self, step: int) -> dict:
        return dict(step=step, updated={k: p.detach().cpu() for k, p in self.params.items()},
                    optimizer=self.optimizer.state_dict(), policy=self.policy.state_dict() if self.policy else None,
                    steering=dict(self.steering))  # fmt: skip

    def load_state(self, st: dict) -> int:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(st["updated"][k])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.policy:
            self.policy.load_state_dict(st["policy"])
        self.steering = dict(st["steering"])
        return st["step"]


def schedule(data, s: Settings) -> list[tuple[int, str, list[str], list[str]]]:
    """(epoch, topic, forget batch, retain batch) for every step. Topics alternate as in the RMU reference; each
    epoch reshuffles deterministically from (seed, epoch), so a resumed run replays the same batches."""
    topics = list(data.forget)
    steps = []
    for epoch in range(s.epochs):
        fb = {t: batches(data.forget[t], s.batch_size, s.seed + 17 * i, epoch) for i, t in enumerate(topics)}
        rb = batches(data.retain, s.batch_size, s.seed + 7919, epoch)
        for j in range(min(len(b) for b in fb.values())):
            for ti, t in enumerate(topics):
                steps.append((epoch, t, fb[t][j], rb[(j * len(topics) + ti) % len(rb)]))
    return steps[: s.max_steps] if s.max_steps is not None else steps


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def versions() -> dict:
    import numpy
    import safetensors
    import tokenizers

    return dict(python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
                safetensors=safetensors.__version__, tokenizers=tokenizers.__version__)  # fmt: skip


def unlearn(s: Settings, stop_after_step: int | None = None) -> Unlearner:
    """Run (or resume) an unlearning run into s.out; returns the Unlearner. `stop_after_step` simulates an
    interruption after that many steps (tests)."""
    if s.goal not in GOALS or s.method not in METHODS:
        raise RefError(f"--goal must be one of {GOALS} and --method one of {METHODS}")
    out = Path(s.out)
    prepare_out_dir(out, s.resume, s.overwrite)
    torch.manual_seed(s.seed)
    data = load_goal_data(resolve_data_dir(s.data, goal=s.goal), s.goal, topics=s.topics)
    if s.goal == "toxicity" and s.method == "ours" and not data.probe:
        raise RefError(f"the toxicity manifest of {s.data} names no probe data: add a 'probe' file")
    model = load_model(s.model, dtype=s.dtype, device=s.device)
    u = Unlearner(s, model, load_tokenizer(s.model), data)
    steps = schedule(data, s)
    if not steps:
        raise RefError(f"no full batch: the forget corpora have fewer than --batch-size={s.batch_size} texts")
    ckpt_path = out / "checkpoint.pt"
    run_json = dict(settings=asdict(s), versions=versions(), steps=len(steps), model_type=model.config.model_type)
    start = 0
    if s.resume:
        if not ckpt_path.exists():
            raise RefError(f"nothing to resume in {out}: no checkpoint.pt (remove the folder or use --overwrite)")
        before = json.loads((out / "run.json").read_text())["settings"]
        changed = [k for k in ("model", "goal", "method", "data", "seed", "batch_size", "epochs", "lr")
                   if before.get(k) != getattr(s, k)]  # fmt: skip
        if changed:
            raise RefError(f"--resume with different settings ({', '.join(changed)}): use the original ones")
    if u.ours_tox:
        probe_aucs = u.fit_probes()  # deterministic: refitting on resume gives the same probes
        run_json["probe_auc"] = probe_aucs
        probes = {f"layer{i}.weight": p.weight.float().contiguous() for i, p in u.probes.items()}
        probes |= {f"layer{i}.bias": torch.tensor([p.bias], dtype=torch.float32) for i, p in u.probes.items()}
        atomic_write_bytes(out / "probes.safetensors", safetensors_bytes(probes))
    if s.resume:
        start = u.load_state(torch.load(ckpt_path, weights_only=True))
    write_json(out / "run.json", run_json)
    log = MetricsLog(out / "metrics.jsonl", keep_until_step=start)
    t0, last_good, k = time.time(), start, start
    stop = []  # Ctrl-C sets it; the loop stops between steps, so the checkpoint is always at a step boundary
    previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True)) if _main_thread() else None
    bar = tqdm(total=len(steps), initial=start, desc=f"{s.method} {s.goal}", unit="step", dynamic_ncols=True)
    try:
        for k in range(start, len(steps)):
            if stop or (stop_after_step is not None and k >= stop_after_step):
                atomic_torch_save(ckpt_path, u.state(k))
                raise KeyboardInterrupt
            epoch, topic, fb, rb = steps[k]
            ts = time.time()
            row = u.step(fb, rb, topic)
            dt = time.time() - ts
            row = dict(step=k + 1, epoch=epoch, **row, tokens_per_s=row.pop("tokens") / dt,
                       elapsed_s=time.time() - t0)  # fmt: skip
            log.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", alpha=f"{row['alpha']:.3g}")
            if (k + 1) % s.save_every == 0 or k + 1 == len(steps):
                atomic_torch_save(ckpt_path, u.state(k + 1))
                last_good = k + 1
    except NonFiniteLoss as e:
        raise RefError(f"step {k + 1}: {e}; stopped, the last good checkpoint (step {last_good}) is kept in "
                       f"{ckpt_path}; lower --lr or --alpha and --resume, or --overwrite") from e  # fmt: skip
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    finish(u, out, log.rows(), run_json)
    return u


def finish(u: Unlearner, out: Path, rows: list[dict], run_json: dict) -> None:
    """Write updated.safetensors, the HF-format model/ folder, report.json (unless --no-eval) and summary.md."""
    updated = {k: p.detach().cpu().contiguous() for k, p in u.params.items()}
    atomic_write_bytes(out / "updated.safetensors", safetensors_bytes(updated))
    save_model(u.model, out / "model", replaced=dict(u.params))
    report = evaluate_before_after(u) if u.s.evaluate else None
    if report is not None:
        write_json(out / "report.json", report)
    atomic_write_text(out / "summary.md", summary(u, rows, run_json, report))


@torch.no_grad()
def evaluate_before_after(u: Unlearner) -> dict:
    """Evaluate the base model (the original values put back in place) and the unlearned one on the goal's tasks."""
    from ref.evaluate import available_tasks, evaluate, headline
    from ref.scorers import make_scorer, scorer_info

    s = u.s
    base = lambda: load_model(s.model, dtype=s.dtype, device=s.device)  # noqa: E731 (a separate, frozen copy)
    scorer = make_scorer(u.data, s.goal, list(available_tasks(u.data)), base, u.tok, seed=s.seed, device=s.device)
    kw = dict(limit=s.eval_limit, samples=s.eval_samples, greedy=s.eval_greedy, seed=s.seed, scorer=scorer)
    trained = {k: p.detach().clone() for k, p in u.params.items()}
    for k, p in u.params.items():
        p.copy_(u.originals[k])
    before = evaluate(u.model, u.tok, u.data, s.goal, **kw)
    for k, p in u.params.items():
        p.copy_(trained[k])
    after = evaluate(u.model, u.tok, u.data, s.goal, **kw)
    return dict(goal=s.goal, method=s.method, model=s.model, scorer=scorer_info(scorer, s.model),
                before=headline(before), after=headline(after), details=dict(before=before, after=after))  # fmt: skip


def summary(u: Unlearner, rows: list[dict], run_json: dict, report: dict | None = None) -> str:
    s = u.s

    def mean(key, part):
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else math.nan

    head, tail = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10) :]
    lines = [f"# Unlearning run: {s.method} on {s.goal}", "",
             f"- model: `{s.model}`, data: `{s.data}`, steps: {len(rows)}, seed {s.seed}",
             f"- updated tensors: {', '.join(u.params)}", f"- taps: {u.taps}",
             f"- alpha: {'REINFORCE, final mean ' + format(u.policy.mean_alpha, '.4g') if u.policy else u.alpha}",
             "", "| quantity | first 10% of steps | last 10% of steps |", "|---|---|---|"]  # fmt: skip
    for key in ("loss", "forget_loss", "retain_loss", "alpha", "tokens_per_s"):
        lines.append(f"| {key} | {mean(key, head):.4g} | {mean(key, tail):.4g} |")
    if "probe_auc" in run_json:
        lines += ["", "Probe held-out AUC per layer: "
                  + ", ".join(f"{i}: {a['heldout_auc']:.3f}" for i, a in run_json["probe_auc"].items())]  # fmt: skip
    if report is not None:
        lines += ["", "## Evaluation, before and after", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {report['after'].get(k, math.nan):.3f} |" for k, v in report["before"].items()]
        tox = report["details"]["after"]["tasks"].get("rtp")
        if tox:
            lines += ["", f"Toxicity protocol: {tox['protocol']}, {tox['samples']} sample(s) per prompt; scorer: "
                      f"{report['scorer']['name'] if report['scorer'] else 'none'}."]  # fmt: skip
    if rows:
        lines += ["", f"Training time: {rows[-1]['elapsed_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m ref.unlearn", description="Unlearn a goal from a language model.")
    a = p.add_argument
    ints = lambda v: [int(x) for x in v.split(",")]
    strs = lambda v: [x.strip() for x in v.split(",")]
    a("--model", default=Settings.model, help="registry alias, local model folder, or hub id")
    a("--goal", default=Settings.goal, choices=GOALS)
    a("--method", default=Settings.method, choices=METHODS)
    a("--data", default=None, help="hub | demo | a prepared data folder (default: demo for smollm2-135m, else hub)")
    a("--out", default=Settings.out, help="run folder")
    a("--topics", type=strs, default=None, help="forget corpora to use, by name (default: all)")
    a("--tap-layer", type=int, default=None, help="layer whose residual stream the WMDP/RMU losses read")
    a("--update-layers", type=ints, default=None, help="comma-separated layers whose tensors are trained")
    a("--update-params", type=strs, default=None, help="tensor names inside a layer (default mlp.down_proj.weight)")
    a("--tox-layers", type=ints, default=None, help="the probed layers of eq. 6 (default: 3 early, 3 mid, 3 late)")
    a("--alpha", type=float, default=None, help="fixed retain weight alpha (turns REINFORCE off)")
    a("--alpha0", type=float, default=None, help="initial alpha of REINFORCE")
    a("--steering", type=float, default=None, help="RMU steering coefficient c")
    a("--beta", type=float, default=Settings.beta, help="Adaptive RMU: c = beta * mean forget activation norm")
    a("--raw-probe-weights", action="store_true", help="eq. 6 with raw probe weights instead of unit directions")
    a("--lr", type=float, default=None, help="AdamW learning rate (registry default; 5e-5 for the 7-8B models)")
    a("--policy-lr", type=float, default=Settings.policy_lr, help="REINFORCE (Adam) learning rate")
    a("--epochs", type=int, default=Settings.epochs)
    a("--max-steps", type=int, default=None)
    a("--batch-size", type=int, default=Settings.batch_size)
    a("--max-len", type=int, default=None, help="truncate texts to this many tokens (registry default)")
    a("--seed", type=int, default=Settings.seed)
    a("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    a("--device", default=None)
    a("--no-compile", dest="compile", action="store_false", help="run the losses eager")
    a("--save-every", type=int, default=Settings.save_every, help="checkpoint every N steps")
    a("--no-eval", dest="evaluate", action="store_false", help="skip the before/after evaluation")
    a("--eval-limit", type=int, default=None, help="evaluate on the first N questions / prompts of each task")
    a("--eval-samples", type=int, default=Settings.eval_samples, help="samples per toxicity prompt")
    a("--eval-greedy", action="store_true", help="one greedy continuation per toxicity prompt (not comparable)")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--overwrite", action="store_true", help="replace an existing --out folder")
    a("--dry-run", action="store_true", help="print the plan and a peak-memory estimate; load no weights")
    return Settings(**vars(p.parse_args(argv)))


def dry_run(s: Settings) -> str:
    """The plan of a run from the registry's architecture facts (or a local config.json), without any weights."""
    from ref.config import DTYPES, config_from_dict, read_config
    from ref.registry import REGISTRY

    if s.model in REGISTRY:
        cfg = config_from_dict(REGISTRY[s.model].arch)
    elif Path(s.model).is_dir():
        cfg = read_config(s.model)
    else:
        raise RefError(f"--dry-run needs a registry alias or a local model folder, not {s.model!r}")
    layers = resolve_layers(s, cfg.num_layers)
    folder = prepared_hub_dir(s.goal) if s.data == "hub" else resolve_data_dir(s.data, goal=s.goal)  # no download
    try:
        data = load_goal_data(folder, s.goal, topics=s.topics) if folder is not None else None
    except RefError:
        data = None
    steps = len(schedule(data, s)) if data is not None else None
    dtype = DTYPES[s.dtype] if s.dtype else (torch.bfloat16 if s.device != "cpu" else torch.float32)
    return describe(s.model, cfg, layers, s, steps, torch.finfo(dtype).bits // 8)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    try:
        if s.dry_run:
            print(dry_run(s))
            return 0
        unlearn(s)
    except RefError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: checkpoint saved in {s.out}; continue with --resume", file=sys.stderr)
        return 130
    print(f"wrote {s.out}: run.json, metrics.jsonl, updated.safetensors, model/, summary.md"
          + (", report.json" if s.evaluate else ""))  # fmt: skip
    print((Path(s.out) / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

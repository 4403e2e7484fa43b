"""The training loop: the paper's algorithm, one step after another.

One step (`step`): encode a forget batch and a retain batch; run the blocks below the first updated one once, under
no_grad, shared by every pass; take the frozen original model's taps on the retain batch (h0); draw alpha from the
REINFORCE policy (or take the fixed one); compute the objective of the method and goal on the updated model's taps
(`ref.objectives`) and eq. 1; one AdamW step; with REINFORCE, recompute the objective after the step and feed the
policy the decrease of L_F + lambda L_R as its reward (`ref.reinforce`). On a topic's first batch the objective may
calibrate constants on the frozen model (`Objective.calibrate`: Adaptive RMU's c, the scaled eq. 6's divisors).

Memory: one copy of the weights. The frozen model is the same modules called with the original values of the few
updated tensors (torch.func.functional_call); every forward stops after the deepest tap and never runs the LM head.
With fp32 master weights (`--master-weights fp32`, for a bf16 model) AdamW updates an fp32 copy of the trained
tensors and the model's tensors take its rounded values after each step: an update smaller than half a bf16 step of
the weight accumulates in the copy instead of rounding away.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from huggingface_hub.utils import tqdm
from torch import Tensor, nn
from torch.func import functional_call

from ref.io.data import GoalData, batches
from ref.io.errors import RefError, Stopped
from ref.io.tokenizer import Tokenizer
from ref.losses import unlearning_loss
from ref.model import Transformer
from ref.objectives import OBJECTIVES, Activations, Losses, Targets
from ref.reinforce import AlphaPolicy, reward
from ref.run.divergence import Diverged, divergence, divergence_advice, norm
from ref.run.fused import eager, fused
from ref.run.plan import Plan


@dataclass
class Run:
    """What stays fixed for the whole run."""

    plan: Plan
    model: Transformer
    tok: Tokenizer
    u: dict[str, Tensor]  # topic -> the fixed random unit vector of eq. 2 and 4
    directions: Tensor | None  # [L, D] probe directions of eq. 6 (ours on toxicity)


@dataclass
class TrainState:
    """What the steps change, and what a checkpoint holds for --resume."""

    params: dict[str, nn.Parameter]  # the trained tensors, by name
    originals: dict[str, Tensor]  # their values before training: with them, the modules are the frozen model
    masters: dict[str, Tensor] | None  # fp32 master copies that AdamW updates (--master-weights fp32), else None
    optimizer: torch.optim.Optimizer
    policy: AlphaPolicy | None  # REINFORCE on alpha, when alpha is not fixed
    calibration: dict[str, dict] = field(default_factory=dict)  # topic -> the Targets fields its objective
    # calibrated on the topic's first batch (Adaptive RMU's c, the scaled eq. 6's divisors)
    step: int = 0  # steps done

    def __post_init__(self):
        self.original_norms = {k: norm(t) for k, t in self.originals.items()}  # for `divergence`, once

    def state_dict(self) -> dict:
        trained = self.masters or self.params
        return dict(
            step=self.step,
            updated={k: p.detach().cpu() for k, p in trained.items()},
            optimizer=self.optimizer.state_dict(),
            calibration=dict(self.calibration),
            policy=self.policy.state_dict() if self.policy else None,
        )

    def load_state_dict(self, state: dict, lr: float) -> None:
        """Continue from a checkpoint, at learning rate `lr` (a resumed run may lower it after a divergence)."""
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["updated"][k])
                if self.masters is not None:
                    self.masters[k].copy_(state["updated"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.policy:
            self.policy.load_state_dict(state["policy"])
        self.calibration, self.step = dict(state["calibration"]), state["step"]


def start_state(plan: Plan, model: Transformer) -> TrainState:
    """The trained tensors selected by name (the rest stay frozen), their originals, their fp32 masters when asked
    for and the model's dtype is narrower, AdamW (on the masters when there are) and the policy."""
    named = dict(model.named_parameters())
    params = {k: named[k].requires_grad_(True) for k in plan.tensors}
    originals = {k: p.detach().clone() for k, p in params.items()}
    narrow = plan.master_weights == "fp32" and any(p.dtype != torch.float32 for p in params.values())
    masters = {k: p.detach().float().clone() for k, p in params.items()} if narrow else None
    optimizer = torch.optim.AdamW((masters or params).values(), lr=plan.lr, eps=1e-6, weight_decay=0.0)
    policy = AlphaPolicy(plan.alpha0, lr=plan.policy_lr, seed=plan.seed) if plan.reinforce else None
    return TrainState(params, originals, masters, optimizer, policy)


def optimizer_step(state: TrainState) -> float:
    """One AdamW step on the trained tensors from their gradients; returns the share of their elements whose value in
    the model changed (in bf16 without master weights, updates below half a bf16 step round away)."""
    before = {k: p.detach().clone() for k, p in state.params.items()}
    if state.masters is None:
        state.optimizer.step()
    else:
        for k, p in state.params.items():
            state.masters[k].grad, p.grad = p.grad.float(), None
        state.optimizer.step()
        with torch.no_grad():
            for k, p in state.params.items():
                p.copy_(state.masters[k])
    moved = sum(int((p.detach() != before[k]).sum()) for k, p in state.params.items())
    return moved / sum(p.numel() for p in state.params.values())


def schedule(data: GoalData, plan: Plan) -> list[tuple[int, str, list[str], list[str]]]:
    """(epoch, topic, forget batch, retain batch) for every step. Topics alternate as in the RMU reference; each
    epoch reshuffles deterministically from (seed, epoch), so a resumed run replays the same batches."""
    topics, steps = list(data.forget), []
    for epoch in range(plan.epochs):
        forget = {t: batches(data.forget[t], plan.batch_size, plan.seed + 17 * i, epoch) for i, t in enumerate(topics)}
        retain = batches(data.retain, plan.batch_size, plan.seed + 7919, epoch)
        for j in range(min(len(b) for b in forget.values())):
            for i, t in enumerate(topics):
                steps.append((epoch, t, forget[t][j], retain[(j * len(topics) + i) % len(retain)]))
    return steps[: plan.max_steps] if plan.max_steps is not None else steps


def encode(run: Run, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Left-padded ids and mask [B, T], each text cut to the plan's max_len tokens, on the model's device."""
    device = next(run.model.parameters()).device
    ids, mask = run.tok.batch(texts, max_length=run.plan.max_len)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def shared_prefix(run: Run, ids: Tensor, mask: Tensor) -> Tensor:
    """The residual stream entering the first updated block (the ids themselves when that is block 0)."""
    k = run.plan.start
    return ids if k == 0 else run.model(ids, mask, taps=[k - 1], stop_after=k - 1).taps[k - 1]


def taps(run: Run, x: Tensor, mask: Tensor, params: dict[str, Tensor] | None = None) -> dict[int, Tensor]:
    """The plan's taps, running blocks start..deepest tap from the shared prefix x; with `params`, those tensors'
    values stand in for the model's (the frozen model: the originals)."""
    plan = run.plan
    kw = dict(attention_mask=mask, taps=plan.taps, stop_after=max(plan.taps))
    kw |= dict(input_ids=x) if plan.start == 0 else dict(hidden=x, start_layer=plan.start)
    return (run.model(**kw) if params is None else functional_call(run.model, params, args=(), kwargs=kw)).taps


def topic_targets(run: Run, topic: str) -> Targets:
    """The constants of a topic's objective from the plan (before calibration)."""
    plan = run.plan
    return Targets(
        plan.taps,
        run.u[topic],
        plan.token_reduction,
        steering=plan.steering,
        beta=plan.beta,
        directions=run.directions,
        tox_balance=plan.tox_balance,
        retain_layers=plan.tox_retain_reduction or "sum",
    )


def step(run: Run, state: TrainState, topic: str, forget_texts: list[str], retain_texts: list[str]) -> dict:
    """One unlearning step on a forget batch of `topic` and a retain batch; returns its metrics row."""
    plan = run.plan
    forget_ids, forget_mask = encode(run, forget_texts)
    retain_ids, retain_mask = encode(run, retain_texts)
    forget_in, retain_in = shared_prefix(run, forget_ids, forget_mask), shared_prefix(run, retain_ids, retain_mask)
    objective = OBJECTIVES[plan.method, plan.goal]
    with torch.no_grad():
        frozen = taps(run, retain_in, retain_mask, state.originals)  # h0: the original model on the retain batch
        if objective.calibrate and topic not in state.calibration:  # once per topic, on its first forget batch
            h0 = taps(run, forget_in, forget_mask, state.originals)
            state.calibration[topic] = objective.calibrate(h0, forget_mask, topic_targets(run, topic))
    targets = replace(topic_targets(run, topic), **state.calibration.get(topic, {}))
    draw = state.policy.sample() if state.policy else None
    alpha = draw.alpha if draw else plan.alpha

    def losses() -> Losses:
        acts = Activations(
            taps(run, forget_in, forget_mask), forget_mask, taps(run, retain_in, retain_mask), frozen, retain_mask
        )
        return objective.losses(acts, targets, fused if plan.compile else eager)

    before = losses()
    loss = unlearning_loss(before.forget, before.retain, alpha)  # eq. 1
    if not torch.isfinite(loss):
        raise Diverged(f"loss is not finite (forget {before.forget.item()}, retain {before.retain.item()})")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    moved = optimizer_step(state)
    why = divergence(state)
    if why:
        raise Diverged(why)
    row = dict(
        topic=topic,
        loss=loss.item(),
        forget_loss=before.forget.item(),
        retain_loss=before.retain.item(),
        alpha=alpha,
        moved_share=moved,
    )
    if before.forget_per_layer is not None:
        per_layer = before.forget_per_layer.tolist()
        row["forget_loss_layers"] = dict(zip(map(str, plan.tox_layers), per_layer, strict=True))
    if before.retain_per_text is not None:  # RMU: the retain text that carries eq. 3 (a jump names its text)
        worst = int(before.retain_per_text.argmax())
        row.update(retain_worst_text=worst, retain_loss_worst_text=before.retain_per_text[worst].item())
    if state.policy:  # REINFORCE: the reward is what this step did to L_F + lambda L_R on the same batch
        with torch.no_grad():
            after = losses()
        if not torch.isfinite(after.forget + after.retain):
            raise Diverged(
                f"the loss after the step is not finite (forget {after.forget.item()}, retain {after.retain.item()})"
            )
        info = state.policy.update(draw, reward(before, after, plan.meta_retain_weight))
        row.update(
            reward=info["reward"],
            policy_mean=info["policy_mean"],
            policy_std=info["policy_std"],
            reward_forget=(before.forget - after.forget).item(),
            reward_retain=plan.meta_retain_weight * (before.retain - after.retain).item(),
        )
    row["tokens"] = int(forget_mask.sum() + retain_mask.sum())
    return row


def train(
    run: Run,
    state: TrainState,
    steps: list,
    log: Callable[[dict], None],
    save: Callable[[], None],
    stop: Callable[[int], bool],
    checkpoint: str = "checkpoint.pt",
) -> None:
    """Steps state.step..len(steps): each row to `log`, `save()` every plan.save_every steps and at the end. When
    `stop(k)` says so before step k, save and raise Stopped (the checkpoint is at a step boundary). A step that
    diverges is not saved: the last checkpoint holds the weights from before it."""
    t0, last_good = time.time(), state.step
    bar = tqdm(
        total=len(steps), initial=state.step, desc=f"{run.plan.method} {run.plan.goal}", unit="step", dynamic_ncols=True
    )
    try:
        for k in range(state.step, len(steps)):
            if stop(k):
                save()
                raise Stopped(f"the checkpoint of step {k} is in {checkpoint}; continue with --resume")
            epoch, topic, forget_texts, retain_texts = steps[k]
            ts = time.time()
            try:
                row = step(run, state, topic, forget_texts, retain_texts)
            except Diverged as e:
                advice = divergence_advice(run, state, topic, last_good, checkpoint)
                raise RefError(f"step {k + 1} diverged: {e}. {advice}") from e
            state.step = k + 1
            log(
                dict(
                    step=k + 1,
                    epoch=epoch,
                    **row,
                    tokens_per_s=row["tokens"] / (time.time() - ts),
                    elapsed_s=time.time() - t0,
                )
            )
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", alpha=f"{row['alpha']:.3g}")
            if state.step % run.plan.save_every == 0 or state.step == len(steps):
                save()
                last_good = state.step
    finally:
        bar.close()

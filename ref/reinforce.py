"""REINFORCE on alpha: learn the forget/retain balance of eq. 1 (L = L_F + alpha * L_R) during training.

The paper says only that alpha is meta-learned with REINFORCE (Adam, lr 1e-2). Our reading, one step k:
    1. draw z_k ~ Normal(mu, sigma), alpha_k = exp(z_k) clamped to [alpha_min, alpha_max]    (`AlphaPolicy.sample`)
    2. the model takes one optimizer step on L_F + alpha_k * L_R
    3. reward r_k = M_before - M_after: the decrease, on the same batch, of the meta-objective M = L_F + lambda L_R
       caused by that step                                                                    (`reward`)
    4. advantage A_k = r_k - b_k, loss -A_k * log pi(z_k), one Adam step on (mu, log sigma), then mu is clamped
       to [log alpha_min, log alpha_max] and sigma to [sigma_min, sigma_max]                  (`AlphaPolicy.update`)
lambda, the exchange rate between the two losses in the meta-objective, is 1 (the unweighted sum) except for the
toxicity objective's scaled balance (`--tox-balance scaled`, ours), where it is alpha0: with L_F in units of its
start, an unweighted M is all L_F, and a policy rewarded by it only learns to shrink alpha
(docs/investigations/toxicity-balance.md; why alpha falls: docs/investigations/alpha.md).
b_k is an exponential moving average of the past rewards, initialised to the first reward: the first advantage
is 0 and the first update moves nothing (no reward history says whether r_1 is good). log pi is the density of the
raw draw z_k: clamping alpha is part of the environment, so the estimator stays the plain score-function gradient.
Deterministic given `seed`; `state_dict()` (nn.Module, Adam and generator state included) resumes the trajectory.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

ALPHA_RANGE = (1e-3, 1e4)  # alpha_min, alpha_max: where the policy's alpha is clamped by default
ALPHA0 = 1.0  # the policy's initial alpha for every model and goal: eq. 1's unweighted sum, no balance assumed


class Draw(NamedTuple):
    z: float  # the raw draw of log(alpha)
    alpha: float  # exp(z) clamped: the alpha the step is taken with


def reward(before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor], retain_weight: float = 1.0) -> float:
    """r_k = M_before - M_after with M = L_F + lambda L_R (lambda = `retain_weight`): (L_F, L_R) before and after the
    step, on the same batch."""
    return (before[0] + retain_weight * before[1]).item() - (after[0] + retain_weight * after[1]).item()


class AlphaPolicy(nn.Module):
    """Gaussian policy on log(alpha), trained with REINFORCE and an EMA reward baseline."""

    def __init__(
        self,
        alpha0: float = ALPHA0,
        *,
        lr: float = 1e-2,
        sigma0: float = 0.5,
        learn_sigma: bool = True,
        alpha_min: float = ALPHA_RANGE[0],
        alpha_max: float = ALPHA_RANGE[1],
        sigma_min: float = 0.01,
        sigma_max: float = 2.0,
        baseline_decay: float = 0.9,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < alpha_min <= alpha0 <= alpha_max:
            raise ValueError(f"need 0 < alpha_min <= alpha0 <= alpha_max, got {alpha_min}, {alpha0}, {alpha_max}")
        if not 0 < sigma_min <= sigma0 <= sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma0 <= sigma_max, got {sigma_min}, {sigma0}, {sigma_max}")
        if not (0 <= baseline_decay < 1 and lr > 0):
            raise ValueError(f"need baseline_decay in [0, 1) and lr > 0, got {baseline_decay}, {lr}")
        self.z_min, self.z_max = math.log(alpha_min), math.log(alpha_max)
        self.log_sigma_min, self.log_sigma_max = math.log(sigma_min), math.log(sigma_max)
        self.baseline_decay, self.learn_sigma = baseline_decay, learn_sigma
        # float64: two scalars, so precision is free and keeps long runs bit-stable
        self.mu = nn.Parameter(torch.tensor(math.log(alpha0), dtype=torch.float64))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma0), dtype=torch.float64), requires_grad=learn_sigma)
        self.optimizer = torch.optim.Adam([self.mu, self.log_sigma] if learn_sigma else [self.mu], lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline: float | None = None  # EMA of the rewards; None until the first update
        self.steps = 0  # updates done

    @property
    def mean_alpha(self) -> float:
        """exp(mu): the policy's central alpha, the value to report as "the learned alpha"."""
        return math.exp(self.mu.item())

    @property
    def sigma(self) -> float:
        """Standard deviation of the policy, in log-alpha space."""
        return math.exp(self.log_sigma.item())

    def sample(self) -> Draw:
        """z ~ Normal(mu, sigma); alpha = exp(z) clamped to [alpha_min, alpha_max]."""
        z = self.mu.item() + self.sigma * torch.randn((), generator=self.generator, dtype=torch.float64).item()
        return Draw(z, math.exp(min(max(z, self.z_min), self.z_max)))

    def log_prob(self, z: float) -> Tensor:
        """log Normal(z; mu, sigma), differentiable in mu and log sigma."""
        return -0.5 * ((z - self.mu) / self.log_sigma.exp()) ** 2 - self.log_sigma - 0.5 * math.log(2 * math.pi)

    def update(self, draw: Draw, r: float) -> dict[str, float]:
        """One REINFORCE step for `draw` with its reward `r`; returns the values to log."""
        if not math.isfinite(r):
            raise ValueError(f"reward must be finite, got {r}; check the meta-objective for NaN/inf")
        if self.baseline is None:
            self.baseline = r
        advantage = r - self.baseline
        log_prob = self.log_prob(draw.z)
        self.optimizer.zero_grad()
        (-advantage * log_prob).backward()
        self.optimizer.step()
        with torch.no_grad():
            self.mu.clamp_(self.z_min, self.z_max)
            self.log_sigma.clamp_(self.log_sigma_min, self.log_sigma_max)
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * r
        self.steps += 1
        return dict(
            alpha=draw.alpha,
            log_prob=log_prob.item(),
            reward=r,
            advantage=advantage,
            baseline=self.baseline,
            policy_mean=self.mean_alpha,
            policy_std=self.sigma,
        )

    def get_extra_state(self) -> dict:
        return dict(
            optimizer=self.optimizer.state_dict(),
            generator=self.generator.get_state(),
            baseline=self.baseline,
            steps=self.steps,
            learn_sigma=self.learn_sigma,
        )

    def set_extra_state(self, state: dict) -> None:
        if state["learn_sigma"] != self.learn_sigma:
            raise ValueError(f"state has learn_sigma={state['learn_sigma']}; build the policy with the same")
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline, self.steps = state["baseline"], state["steps"]

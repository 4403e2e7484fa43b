"""REINFORCE on alpha: learn the forget/retain balance of Eq. 1 (L = L_F + alpha * L_R) during training.

The paper says only that alpha is meta-learned with REINFORCE (Adam, lr 1e-2). Our reading:

- Policy: z = log(alpha) ~ Normal(mu, sigma). mu is learnable (init log alpha0). sigma is learnable
  (parametrised as log sigma) or fixed (`learn_sigma=False`); it is a standard deviation in log-alpha space.
- Each step the caller
    1. draws alpha_k = policy.sample()                       (exp of z_k, clamped to [alpha_min, alpha_max]),
    2. takes a model step on L_F + alpha_k * L_R,
    3. measures the reward r_k = M_before - M_after, the decrease of the unweighted meta-objective
       M = L_F + L_R on the same batch, caused by that step,
    4. calls policy.update(r_k).
- Update: advantage A_k = r_k - b_k, with b_k an exponential moving average of the past rewards
  (b_{k+1} = d * b_k + (1 - d) * r_k). On the first step b is initialised to the first reward, so the first
  advantage is 0 and the first update leaves mu, sigma unchanged: no reward history, no signal about whether
  r_1 is good or bad (with b = 0 any positive first reward would pull mu towards alpha_1, good or not).
  Loss = -A_k * log pi(z_k); one Adam step (lr 1e-2, the paper's); then mu is clamped to
  [log alpha_min, log alpha_max] and sigma to [sigma_min, sigma_max].
- log pi is the density of the raw draw z_k; clamping alpha to its range is part of the environment, not of
  the policy, so the estimator stays the plain score-function gradient.
- Deterministic given `seed`: the policy owns a torch.Generator, and `state_dict()` carries mu, sigma, Adam
  state, baseline, generator state and step count, so a resumed run continues the same trajectory.
"""

from __future__ import annotations

import copy
import math

import torch


class AlphaPolicy:
    """Gaussian policy on log(alpha), trained with REINFORCE and an EMA reward baseline."""

    def __init__(
        self,
        alpha0: float = 1.0,
        *,
        lr: float = 1e-2,
        sigma0: float = 0.5,
        learn_sigma: bool = True,
        alpha_min: float = 1e-3,
        alpha_max: float = 1e4,
        sigma_min: float = 0.01,
        sigma_max: float = 2.0,
        baseline_decay: float = 0.9,
        seed: int = 0,
    ) -> None:
        if not 0 < alpha_min < alpha_max:
            raise ValueError(f"need 0 < alpha_min < alpha_max, got {alpha_min}, {alpha_max}")
        if not alpha_min <= alpha0 <= alpha_max:
            raise ValueError(f"alpha0={alpha0} is outside [alpha_min, alpha_max] = [{alpha_min}, {alpha_max}]")
        if not 0 < sigma_min <= sigma0 <= sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma0 <= sigma_max, got {sigma_min}, {sigma0}, {sigma_max}")
        if not 0 <= baseline_decay < 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.z_min, self.z_max = math.log(alpha_min), math.log(alpha_max)
        self.log_sigma_min, self.log_sigma_max = math.log(sigma_min), math.log(sigma_max)
        self.learn_sigma = learn_sigma
        self.baseline_decay = baseline_decay
        # float64: two scalars, so precision is free and keeps long runs bit-stable.
        self.mu = torch.tensor(math.log(alpha0), dtype=torch.float64, requires_grad=True)
        self.log_sigma = torch.tensor(math.log(sigma0), dtype=torch.float64, requires_grad=learn_sigma)
        params = [self.mu, self.log_sigma] if learn_sigma else [self.mu]
        self.opt = torch.optim.Adam(params, lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline: float | None = None  # EMA of rewards; None until the first update
        self.steps = 0  # number of updates done
        self.z: float | None = None  # raw draw of log(alpha) waiting for its reward

    @property
    def mean_alpha(self) -> float:
        """exp(mu): the policy's central alpha, the value to report as "the learned alpha"."""
        return math.exp(self.mu.item())

    @property
    def sigma(self) -> float:
        """Standard deviation of the policy, in log-alpha space."""
        return math.exp(self.log_sigma.item())

    def sample(self) -> float:
        """Draw alpha_k = exp(z_k), z_k ~ Normal(mu, sigma), clamped to [alpha_min, alpha_max]."""
        eps = torch.randn((), generator=self.generator, dtype=torch.float64).item()
        self.z = self.mu.item() + self.sigma * eps
        return math.exp(min(max(self.z, self.z_min), self.z_max))

    def log_prob(self, z: float) -> torch.Tensor:
        """log Normal(z; mu, sigma), differentiable in mu and log sigma."""
        return -0.5 * ((z - self.mu) / self.log_sigma.exp()) ** 2 - self.log_sigma - 0.5 * math.log(2 * math.pi)

    def update(self, reward: float) -> dict[str, float]:
        """One REINFORCE step for the alpha drawn by the last `sample()`; returns values to log."""
        if self.z is None:
            raise ValueError("update() needs a pending draw: call sample() before each update()")
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}; check the meta-objective for NaN/inf")
        z, self.z = self.z, None
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        log_prob = self.log_prob(z)
        self.opt.zero_grad()
        (-advantage * log_prob).backward()
        self.opt.step()
        with torch.no_grad():
            self.mu.clamp_(self.z_min, self.z_max)
            self.log_sigma.clamp_(self.log_sigma_min, self.log_sigma_max)
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * reward
        self.steps += 1
        return {
            "alpha": math.exp(min(max(z, self.z_min), self.z_max)),  # the alpha the step was taken with
            "log_prob": log_prob.item(),
            "reward": reward,
            "advantage": advantage,
            "baseline": self.baseline,  # after this update
            "policy_mean": self.mean_alpha,  # exp(mu), after this update
            "policy_std": self.sigma,  # sigma in log-alpha space, after this update
        }

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same trajectory; a deep copy, safe from later steps."""
        return copy.deepcopy(
            {
                "mu": self.mu.detach(),
                "log_sigma": self.log_sigma.detach(),
                "learn_sigma": self.learn_sigma,
                "opt": self.opt.state_dict(),
                "baseline": self.baseline,
                "generator": self.generator.get_state(),
                "steps": self.steps,
                "z": self.z,
            }
        )

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the policy must have been built with the same learn_sigma."""
        if state["learn_sigma"] != self.learn_sigma:
            raise ValueError(
                f"state has learn_sigma={state['learn_sigma']} but this policy has {self.learn_sigma}; "
                "build the policy with the same learn_sigma"
            )
        state = copy.deepcopy(state)
        with torch.no_grad():
            self.mu.copy_(state["mu"])
            self.log_sigma.copy_(state["log_sigma"])
        self.opt.load_state_dict(state["opt"])
        self.baseline = state["baseline"]
        self.generator.set_state(state["generator"])
        self.steps = state["steps"]
        self.z = state["z"]

"""Tests for ref/reinforce.py: REINFORCE on alpha (our reading of the paper, see the module docstring)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from ref.reinforce import AlphaPolicy, Draw
from ref.reinforce import reward as step_reward

# Toy bilevel quadratic. Inner parameter theta in R^2; "forget" f = kf/2 |theta - a|^2, "retain"
# g = kg/2 |theta - b|^2, meta-objective M = f + g. One episode: theta is drawn fresh around C, the caller
# takes one gradient step on f + alpha * g with step size ETA, and the reward is M(theta) - M(theta_new).
# g is 10x flatter than f, so a small alpha under-weights it and a large one overshoots: the best fixed
# alpha is interior (about 9.3, far from alpha0 = 1 and from the clamps 1e-3 / 1e4). Drawing theta fresh
# each episode makes the expected reward R(alpha) a fixed function, so "the best fixed alpha" is well defined.
KF, KG, ETA, SPREAD = 1.0, 0.1, 0.5, 0.2
A = torch.tensor([1.0, 0.0], dtype=torch.float64)
B = torch.tensor([0.0, 1.0], dtype=torch.float64)
C = torch.tensor([-2.0, -2.0], dtype=torch.float64)
STEPS = 3000  # about 2 s on one CPU core


def meta(theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * KF * ((theta - A) ** 2).sum(-1) + 0.5 * KG * ((theta - B) ** 2).sum(-1)


def reward(theta: torch.Tensor, alpha: float) -> torch.Tensor:
    """Decrease of M caused by one step on f + alpha * g (vectorised over leading dims of theta)."""
    step = KF * (theta - A) + alpha * KG * (theta - B)
    return meta(theta) - meta(theta - ETA * step)


def draw_theta(gen: torch.Generator, n: int | None = None) -> torch.Tensor:
    shape = (2,) if n is None else (n, 2)
    return C + SPREAD * torch.randn(shape, generator=gen, dtype=torch.float64)


def expected_reward_fn():
    """R(alpha) = E_theta[reward]; exactly quadratic in alpha (one gradient step on quadratics), so three
    Monte Carlo averages (alpha = -1, 0, 1 on the same 100k thetas) give it for every alpha."""
    theta = draw_theta(torch.Generator().manual_seed(12345), 100_000)
    r_m, r_0, r_p = (reward(theta, a).mean().item() for a in (-1.0, 0.0, 1.0))
    c1, c2 = (r_p - r_m) / 2, (r_p + r_m) / 2 - r_0
    # Check the quadratic form against a direct evaluation at an unrelated alpha.
    assert abs(r_0 + c1 * 7.0 + c2 * 49.0 - reward(theta, 7.0).mean().item()) < 1e-9
    return lambda alpha: r_0 + c1 * alpha + c2 * alpha**2


def run_toy(policy: AlphaPolicy, steps: int, seed: int) -> AlphaPolicy:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        draw = policy.sample()
        policy.update(draw, reward(draw_theta(gen), draw.alpha).item())
    return policy


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_sigma_finds_grid_optimum(seed):
    R = expected_reward_fn()
    grid = np.logspace(-3, 4, 7001)  # the whole clamp range, 0.1% spacing
    values = R(grid)
    best = grid[values.argmax()]
    assert 8.5 < best < 10.5  # measured 9.33; interior, far from alpha0 = 1 and from the clamps
    assert values.max() - max(R(best / 2), R(best * 2)) > 0.3  # the optimum is sharp enough to matter
    policy = run_toy(AlphaPolicy(alpha0=1.0, seed=seed), STEPS, seed=1000 + seed)
    # Measured over 20 seeds at 3000 steps: learned / grid optimum in [0.82, 1.28]; factor 1.5 leaves margin
    # while still failing a policy that did not move (ratio 9.3) or went the wrong way.
    assert best / 1.5 < policy.mean_alpha < best * 1.5, (policy.mean_alpha, best)
    assert policy.sigma < 0.5  # sigma shrinks from its init as the policy commits


def test_fixed_sigma_finds_optimum_of_smoothed_objective():
    # With sigma fixed, REINFORCE maximises E_{z ~ N(mu, sigma)} R(exp z), not R itself; its argmax sits below
    # the argmax of R because R drops faster above the optimum than below. Compute it by a grid over mu with
    # 60-node Gauss-Hermite quadrature over z.
    R = expected_reward_fn()
    sigma = 0.5
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    mus = np.linspace(math.log(1e-3), math.log(1e4), 7001)
    smoothed = (weights * R(np.exp(mus[:, None] + sigma * nodes))).sum(1)
    best = math.exp(mus[smoothed.argmax()])
    assert 5.5 < best < 7.5  # measured 6.41 (= 9.33 * exp(-1.5 sigma^2), the closed form for a quadratic R)
    policy = run_toy(AlphaPolicy(alpha0=1.0, sigma0=sigma, learn_sigma=False, seed=0), STEPS, seed=1000)
    # Measured over 20 seeds: learned / smoothed optimum in [0.87, 1.15].
    assert best / 1.3 < policy.mean_alpha < best * 1.3, (policy.mean_alpha, best)
    assert policy.sigma == pytest.approx(sigma, rel=1e-12)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_alpha_stays_in_range_under_huge_rewards(sign):
    policy = AlphaPolicy(alpha0=1.0, alpha_min=0.5, alpha_max=2.0, sigma0=1.0, sigma_min=0.1, sigma_max=1.5)
    alphas, mus = [], []
    for _ in range(300):
        draw = policy.sample()
        alphas.append(draw.alpha)
        policy.update(draw, sign * 1e100 * math.log(draw.alpha))  # pushes mu hard towards one end
        mus.append(policy.mu.item())
        assert 0.1 - 1e-12 <= policy.sigma <= 1.5 + 1e-12
    assert all(0.5 <= a <= 2.0 for a in alphas)
    # mu is pushed onto the clamp and held there (Adam moves it ~lr = 0.01 per step; log 2 = 0.69 away).
    end = math.log(2.0) if sign > 0 else math.log(0.5)
    assert mus[-1] == pytest.approx(end, abs=1e-12)
    assert all(math.log(0.5) <= m <= math.log(2.0) for m in mus)


def deterministic_run(policy: AlphaPolicy, steps: int) -> list[float]:
    alphas = []
    for _ in range(steps):
        draw = policy.sample()
        alphas.append(draw.alpha)
        policy.update(draw, -((math.log(draw.alpha) - 1.0) ** 2))  # reward peaks at alpha = e
    return alphas


def test_same_seed_same_trajectory_different_seed_different():
    a = deterministic_run(AlphaPolicy(seed=7), 50)
    b = deterministic_run(AlphaPolicy(seed=7), 50)
    c = deterministic_run(AlphaPolicy(seed=8), 50)
    assert a == b
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_state_dict_round_trip_continues_same_trajectory():
    policy = AlphaPolicy(seed=3)
    deterministic_run(policy, 10)
    buf = io.BytesIO()
    torch.save(policy.state_dict(), buf)  # must survive serialisation, not only an in-memory copy
    tail = deterministic_run(policy, 10)
    buf.seek(0)
    resumed = AlphaPolicy(seed=99)  # a different seed: the generator state must come from the checkpoint
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert deterministic_run(resumed, 10) == tail
    assert (resumed.mu.item(), resumed.sigma, resumed.baseline, resumed.steps) == (
        policy.mu.item(),
        policy.sigma,
        policy.baseline,
        policy.steps,
    )
    assert policy.steps == 20


def test_update_by_hand():
    # Hand-computed REINFORCE + Adam on mu (sigma fixed): checks the baseline rule and the sign of the step.
    lr, sigma = 1e-2, 0.5
    policy = AlphaPolicy(alpha0=2.0, lr=lr, sigma0=sigma, learn_sigma=False, seed=0)
    mu0 = math.log(2.0)
    info = policy.update(policy.sample(), 1.0)
    # First step: baseline initialised to the first reward, so advantage 0 and mu does not move.
    assert info["advantage"] == 0.0 and info["baseline"] == 1.0
    assert policy.mu.item() == mu0
    draw = policy.sample()
    z = draw.z
    assert draw.alpha == math.exp(z)  # inside the clamp range
    info = policy.update(draw, 3.0)
    adv = 3.0 - 1.0
    g = -adv * (z - mu0) / sigma**2  # d/dmu of -adv * log N(z; mu, sigma)
    m_hat = 0.1 * g / (1 - 0.9**2)  # Adam, betas (0.9, 0.999), second step after a zero gradient
    v_hat = 0.001 * g**2 / (1 - 0.999**2)
    expected_mu = mu0 - lr * m_hat / (math.sqrt(v_hat) + 1e-8)
    assert policy.mu.item() == pytest.approx(expected_mu, abs=1e-12)
    assert info["advantage"] == adv
    assert info["baseline"] == pytest.approx(0.9 * 1.0 + 0.1 * 3.0, abs=1e-15)
    assert info["alpha"] == pytest.approx(math.exp(z), rel=1e-12)
    assert info["policy_mean"] == pytest.approx(math.exp(expected_mu), rel=1e-12)
    assert info["policy_std"] == sigma
    # Positive advantage: mu moves towards the sampled log-alpha.
    assert (policy.mu.item() - mu0) * (z - mu0) > 0


def test_log_prob_matches_torch_normal():
    policy = AlphaPolicy(alpha0=3.0, sigma0=0.7)
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)
    expected = torch.distributions.Normal(f64(math.log(3.0)), f64(0.7)).log_prob(f64(0.2))
    assert policy.log_prob(0.2).item() == pytest.approx(expected.item(), abs=1e-12)


def test_clamped_draw_keeps_the_raw_z_for_the_gradient():
    policy = AlphaPolicy(alpha0=1.9, alpha_max=2.0, sigma0=2.0, sigma_max=2.0, seed=0)
    draws = [policy.sample() for _ in range(50)]
    high = [d for d in draws if d.z > math.log(2.0)]
    assert high and all(d.alpha == 2.0 for d in high)  # the environment clamps alpha ...
    assert all(d.alpha == pytest.approx(math.exp(d.z), rel=1e-12) for d in draws if d not in high)
    before = policy.mu.item()
    policy.update(Draw(z=5.0, alpha=2.0), 1.0)  # first update: advantage 0
    policy.update(Draw(z=5.0, alpha=2.0), 2.0)  # ... the score function uses the raw z = 5: mu moves up
    assert policy.mu.item() > before


def test_reward_is_the_decrease_of_the_unweighted_meta_objective():
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)
    assert step_reward((f32(2.0), f32(0.5)), (f32(1.25), f32(0.75))) == 0.5
    assert step_reward((f32(1.0), f32(0.0)), (f32(1.0), f32(1.0))) == -1.0  # the retain side got worse


def test_reward_weighs_the_retain_loss_by_lambda():
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)
    # M = L_F + 100 L_R: before 0.5 + 100 * 0.001 = 0.6, after 0.25 + 100 * 0.003 = 0.55
    assert step_reward((f32(0.5), f32(0.001)), (f32(0.25), f32(0.003)), 100.0) == pytest.approx(0.05, abs=1e-6)
    # the same step under lambda = 1 looks like a pure gain: the retain loss tripled but weighs nothing
    assert step_reward((f32(0.5), f32(0.001)), (f32(0.25), f32(0.003))) == pytest.approx(0.248, abs=1e-6)


def test_errors():
    policy = AlphaPolicy()
    with pytest.raises(ValueError, match="finite"):
        policy.update(policy.sample(), float("nan"))
    with pytest.raises(ValueError, match="alpha0"):
        AlphaPolicy(alpha0=1e5)
    with pytest.raises(ValueError, match="alpha_min"):
        AlphaPolicy(alpha_min=0.0)
    with pytest.raises(ValueError, match="baseline_decay"):
        AlphaPolicy(baseline_decay=1.0)
    with pytest.raises(ValueError, match="learn_sigma"):
        AlphaPolicy(learn_sigma=False).load_state_dict(AlphaPolicy().state_dict())

"""ref.probe: the Newton fit against the optimality condition and an independent solver; ref.evaluation.heldout: AUC,
splits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ref import probe as P
from ref.evaluation import heldout


def objective(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float) -> torch.Tensor:
    """The documented objective, written out independently: mean log-loss + l2/2 ||w||^2, raw features."""
    z = x @ w + b
    s = 2 * y - 1
    return torch.log1p(torch.exp(-s * z)).mean() + 0.5 * l2 * (w * w).sum()


def separable(n: int = 60, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).double()
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0  # offset: the intercept matters
    x[:, 0] += 4.0 * (2 * y - 1)  # margin of several units along feature 0
    return x, y


def overlapping(n: int = 200, d: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.4).double()
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 10.0], dtype=torch.float64)
    x[:, :2] += 0.8 * (2 * y - 1)[:, None]
    return x, y


def lbfgs(x, y, l2):
    """An independent solver of the same objective (raw features, no Newton): L-BFGS, strong-Wolfe search."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=5000, tolerance_grad=1e-13, tolerance_change=0, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        f = objective(x, y, w, b, l2)
        f.backward()
        return f

    opt.step(closure)
    return w.detach(), b.detach()


CASES = {
    "separable": (separable(), 1e-2),
    "overlapping": (overlapping(), 1e-2),
    "separable_d_gt_n": (separable(n=20, d=30, seed=3), 1e-3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fit_is_stationary_and_matches_lbfgs(name):
    (x, y), l2 = CASES[name]
    pr = P.fit_logistic_probe(x.float() if name == "overlapping" else x, y, l2=l2)
    w = pr.weight.clone().requires_grad_(True)
    b = torch.tensor(pr.bias, dtype=torch.float64, requires_grad=True)
    x64 = x.float().double() if name == "overlapping" else x  # the fit saw float32 features there
    gw, gb = torch.autograd.grad(objective(x64, y, w, b, l2), [w, b])
    # Newton stops within the quadratic-convergence region and takes one more full step, so the gradient
    # is at float64 round-off (~1e-15); 1e-9 leaves room for BLAS differences and is far below any real error.
    assert max(gw.abs().max().item(), gb.abs().item()) < 1e-9
    w_ref, b_ref = lbfgs(x64, y, l2)
    # L-BFGS converges only linearly-superlinearly to ~1e-10 in gradient; on these well-conditioned problems
    # (Hessian eigenvalues >= l2) that puts its parameters within ~1e-7 of the optimum.
    torch.testing.assert_close(pr.weight, w_ref, rtol=1e-6, atol=1e-6)
    assert pr.bias == pytest.approx(b_ref.item(), abs=1e-6)
    assert pr.weight.dtype == torch.float64
    torch.testing.assert_close(pr.direction, pr.weight / pr.weight.norm(), rtol=0, atol=1e-15)
    assert 1 <= pr.n_iter <= 20


def test_fit_separable_auc_and_determinism():
    x, y = separable()
    a, b = P.fit_logistic_probe(x, y), P.fit_logistic_probe(x, y)
    assert a.train_auc == 1.0 and a.heldout_auc is None
    assert torch.equal(a.weight, b.weight) and a.bias == b.bias  # bit-identical


def brute_force_auc(scores, labels):
    pos = [s for s, lab in zip(scores.tolist(), labels.tolist(), strict=True) if lab == 1]
    neg = [s for s, lab in zip(scores.tolist(), labels.tolist(), strict=True) if lab == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_pairwise_count_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(57, generator=g) < 0.3).long()
    scores = torch.randint(0, 6, (57,), generator=g).float() + 0.5 * labels  # many ties
    assert heldout.roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_roc_auc_known_values():
    labels = torch.tensor([0, 0, 1, 1])
    assert heldout.roc_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert heldout.roc_auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert heldout.roc_auc(torch.ones(4), labels) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        heldout.roc_auc(torch.ones(3), torch.ones(3))


def test_train_probe_split_is_stratified_deterministic_and_held_out():
    x, y = separable(n=50, d=5)
    a = P.train_probe(x, y, heldout_fraction=0.2, seed=0)
    b = P.train_probe(x, y, heldout_fraction=0.2, seed=0)
    assert torch.equal(a.weight, b.weight)
    assert a.train_auc == 1.0 and a.heldout_auc == 1.0
    assert not torch.equal(P.train_probe(x, y, seed=1).weight, a.weight)  # another seed, another split
    # pure noise labels with D close to N: the probe fits the training set, the held-out AUC must not follow
    g = torch.Generator().manual_seed(5)
    xn = torch.randn(100, 60, generator=g, dtype=torch.float64)
    yn = (torch.arange(100) % 2).double()
    noisy = P.train_probe(xn, yn, l2=1e-4)
    assert noisy.train_auc == 1.0
    assert abs(noisy.heldout_auc - 0.5) < 0.3  # ~1.0 would mean training examples leaked into held-out


def test_errors():
    x, y = separable()
    with pytest.raises(ValueError, match="only one class"):
        P.fit_logistic_probe(x, torch.ones(len(y)))
    with pytest.raises(ValueError, match="only one class"):
        P.train_probe(x, torch.zeros(len(y)))
    y_one_pos = torch.zeros(len(y))
    y_one_pos[3] = 1
    with pytest.raises(ValueError, match="class 1 has 1 example"):
        P.train_probe(x, y_one_pos)
    with pytest.raises(ValueError, match="0 or 1"):
        P.fit_logistic_probe(x, 2 * y)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        P.fit_logistic_probe(x, y, l2=0.0)
    with pytest.raises(ValueError, match=r"x \[N, D\]"):
        P.fit_logistic_probe(x, y[:-1])


def test_last_token_features_one_truncated_forward():
    calls = []

    def fake_model(input_ids, attention_mask, taps, stop_after):
        calls.append((list(taps), stop_after, torch.is_grad_enabled()))
        b, t = input_ids.shape
        # tap i at position t holds 10 i + t in every dim (exact in bf16)
        return SimpleNamespace(
            taps={i: (10.0 * i + torch.arange(t)).view(1, t, 1).expand(b, t, 3).bfloat16() for i in taps}
        )

    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])  # left-padded and right-padded rows
    feats = P.last_token_features(fake_model, ids, mask, [7, 2, 7])
    assert calls == [([2, 7], 7, False)]
    assert sorted(feats) == [2, 7]
    assert feats[7].dtype == torch.float32 and feats[7].shape == (2, 3)
    assert feats[2][:, 0].tolist() == [23.0, 21.0]
    assert feats[7][:, 0].tolist() == [73.0, 71.0]


def test_choose_l2_by_k_fold_is_deterministic_and_held_out():
    x, y = overlapping()
    l2, cv = P.choose_l2(x, y, seed=0)
    assert list(cv) == list(P.L2_GRID) and l2 in P.L2_GRID
    assert cv[l2] == max(cv.values()) and all(0.5 < a <= 1.0 for a in cv.values())
    assert P.choose_l2(x, y, seed=0) == (l2, cv)  # same seed: the same folds, the same choice
    # the folds: disjoint, covering, stratified
    folds = heldout.stratified_folds(y, 5, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(len(y)))
    assert all(0 < int(y[f].sum()) < len(f) for f in folds)
    # noise labels in D close to N: a weak penalty fits noise, held-out AUC finds no signal at any strength
    g = torch.Generator().manual_seed(5)
    xn, yn = torch.randn(100, 60, generator=g, dtype=torch.float64), (torch.arange(100) % 2).double()
    _, cvn = P.choose_l2(xn, yn)
    assert all(abs(a - 0.5) < 0.2 for a in cvn.values())
    # ties (every strength separates the clean data perfectly) go to the strongest penalty
    xs, ys = separable()
    assert P.choose_l2(xs, ys, grid=(1e-3, 1e-2, 1e-1)) == (1e-1, {1e-3: 1.0, 1e-2: 1.0, 1e-1: 1.0})


def test_train_probe_auto_l2_chooses_on_the_train_part_only():
    x, y = overlapping()
    auto = P.train_probe(x, y, seed=3, l2=None)
    train, held = heldout.stratified_split(y, 0.2, seed=3)
    assert (auto.l2, auto.cv_auc) == P.choose_l2(x[train], y[train], seed=3)  # the held-out part never seen
    fixed = P.train_probe(x, y, seed=3, l2=auto.l2)
    assert torch.equal(fixed.weight, auto.weight) and fixed.heldout_auc == auto.heldout_auc and fixed.cv_auc is None
    assert P.train_probe(x, y, seed=3, l2=None).weight.equal(auto.weight)  # deterministic
    assert P.train_probe(x, y, seed=3).l2 == P.DEFAULT_L2  # the fixed value stays the default of train_probe

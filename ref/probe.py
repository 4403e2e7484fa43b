"""Linear toxicity probes: L2-regularised logistic regression on last-token hidden states, one per layer.

The probe direction w_i of layer i is what eq. 6 of the paper pushes the last-token state to be orthogonal to.
The fit is our own (no scikit-learn): full-batch Newton in float64, deterministic, minimising

    f(w, b) = mean_n log(1 + exp(-s_n (x_n . w + b))) + l2/2 * ||w||^2,    s_n = 2 y_n - 1,

with the intercept b unregularised and the penalty on w in the raw feature space (features are only centred
internally, which changes nothing but the value of b, mapped back). In scikit-learn terms this is
LogisticRegression(C=1 / (l2 * N)). Since the penalty is on raw weights, its strength relative to the data
depends on the scale of the features (the residual norm grows with depth).

The strength l2 is chosen per layer on held-out data unless given (`train_probe(l2=None)`, the default of
ref.unlearn's `--probe-l2 auto`): stratified K-fold over the training part only (the held-out part that reports
`heldout_auc` is never seen by the choice), the value of L2_GRID with the best mean fold AUC, ties going to the
larger (stronger) penalty. The folds come from the seed, so the choice is deterministic.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ref import losses
from ref.evaluation.heldout import roc_auc, stratified_folds, stratified_split

# Default l2 for mean log-loss (sklearn C = 100 / N, e.g. 0.05 for 2000 examples). It bounds the weight norm
# (l2/2 ||w||^2 <= f(0) = log 2 gives ||w|| <= 11.8) so the fit is well-posed on separable data (D >= N is
# the usual case for 4096-dim states and a few thousand texts), keeps Newton to a handful of steps, and
# favours a direction that generalises over one that only separates the training set.
DEFAULT_L2 = 1e-2
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the k-fold choice's candidates, a decade apart
FOLDS = 5


@dataclass
class Probe:
    weight: Tensor  # [D] float64, raw feature space
    bias: float
    direction: Tensor  # [D] float64, weight / ||weight||
    train_auc: float
    heldout_auc: float | None = None  # None when fitted without a held-out split
    n_iter: int = 0  # Newton steps taken
    l2: float = DEFAULT_L2  # the penalty it was fitted with
    cv_auc: dict[float, float] | None = None  # l2 -> mean K-fold AUC, when l2 was chosen by `choose_l2`


def _check_xy(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need x [N, D] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.to(torch.float64)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("probe labels must be 0 or 1 (1 = toxic)")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        raise ValueError(f"probe data has only one class ({n_pos} positive of {y.numel()}); need both labels")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("probe features contain NaN or inf")
    return x, y.to(x.device)


def _objective(xc: Tensor, y: Tensor, theta: Tensor, l2: float) -> Tensor:
    """f at theta = [w; b] on centred features xc (see the module docstring)."""
    z = xc @ theta[:-1] + theta[-1]
    # log(1 + exp(-s z)) = softplus(z) - y z for y in {0, 1}
    return (torch.nn.functional.softplus(z) - y * z).mean() + 0.5 * l2 * theta[:-1].pow(2).sum()


def fit_logistic_probe(x: Tensor, y: Tensor, l2: float = DEFAULT_L2, max_iter: int = 50, tol: float = 1e-12) -> Probe:
    """Fit w, b minimising mean log-loss + l2/2 ||w||^2 (b unregularised) by Newton's method in float64.

    x [N, D] features (any float dtype, any device: the solve runs where x is), y [N] labels in {0, 1}.
    Each step solves the (D+1)x(D+1) Newton system (D = 4096 is fine); a backtracking line search keeps
    every step a descent step. Stops when half the squared Newton decrement, g . H^-1 g / 2 (an estimate of
    f - min f, independent of the feature scale), is below `tol`.
    The returned Probe has train_auc on (x, y) and no held-out AUC (see `train_probe`).
    """
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (got {l2}); without a penalty separable data has no solution")
    x, y = _check_xy(x, y)
    n, d = x.shape
    mean = x.mean(dim=0)
    xc = x - mean  # centring decouples b from w and helps conditioning; b is mapped back below
    xa = torch.cat([xc, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)  # [N, D+1]
    reg = torch.full((d + 1,), l2, dtype=x.dtype, device=x.device)
    reg[-1] = 0.0  # unregularised intercept
    theta = torch.zeros(d + 1, dtype=x.dtype, device=x.device)
    f = float(_objective(xc, y, theta, l2))
    n_iter = 0
    for _ in range(max_iter):
        n_iter += 1
        p = torch.sigmoid(xa @ theta)
        grad = xa.T @ (p - y) / n + reg * theta
        hess = (xa.T * (p * (1 - p) / n)) @ xa + torch.diag(reg)
        step = torch.linalg.solve(hess, grad)
        decrement = float(grad @ step)
        if decrement / 2 <= tol:
            theta = theta - step  # inside the quadratic-convergence region: the full step is safe
            break
        t = 1.0  # backtracking (Armijo) line search
        while float(_objective(xc, y, theta - t * step, l2)) > f - 1e-4 * t * decrement and t > 1e-8:
            t /= 2
        theta = theta - t * step
        f = float(_objective(xc, y, theta, l2))
    else:
        warnings.warn(f"fit_logistic_probe: Newton did not reach tol={tol} in {max_iter} steps", stacklevel=2)
    w = theta[:-1].cpu()
    b = float(theta[-1] - theta[:-1] @ mean)
    return Probe(
        weight=w,
        bias=b,
        direction=w / torch.linalg.vector_norm(w).clamp_min(1e-300),
        train_auc=roc_auc(x @ theta[:-1], y),
        n_iter=n_iter,
        l2=l2,
    )


def choose_l2(
    x: Tensor, y: Tensor, grid: Sequence[float] = L2_GRID, folds: int = FOLDS, seed: int = 0
) -> tuple[float, dict[float, float]]:
    """The l2 of `grid` with the best mean held-out AUC over stratified K folds of (x, y), ties to the larger l2;
    returns it and {l2: mean fold AUC}."""
    x, y = _check_xy(x, y)
    parts = stratified_folds(y, folds, seed)
    every = torch.arange(len(y))
    cv = {}
    for l2 in grid:
        aucs = []
        for held in parts:
            train = every[~torch.isin(every, held)].to(x.device)
            with warnings.catch_warnings():  # a weak penalty on separable folds may not reach tol: still a probe
                warnings.simplefilter("ignore")
                probe = fit_logistic_probe(x[train], y[train], l2=l2)
            aucs.append(roc_auc(x[held.to(x.device)].cpu() @ probe.weight, y[held.to(x.device)]))
        cv[float(l2)] = sum(aucs) / len(aucs)
    best = max(cv.values())
    return max(l2 for l2, auc in cv.items() if auc >= best - 1e-12), cv


def train_probe(
    x: Tensor, y: Tensor, heldout_fraction: float = 0.2, seed: int = 0, l2: float | None = DEFAULT_L2
) -> Probe:
    """Split (x, y) into train / held-out, stratified by label and deterministic for a seed, fit on train,
    and report the AUC on both. heldout_fraction=0 fits on everything (heldout_auc None). l2=None chooses the
    penalty by `choose_l2` on the train part (recorded in probe.l2 and probe.cv_auc)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    x, y = _check_xy(x, y)
    if heldout_fraction == 0.0:
        tr, he = torch.arange(len(y)), None
    else:
        try:
            tr, he = stratified_split(y, heldout_fraction, seed)
        except ValueError as e:
            raise ValueError(f"train_probe: {e}") from None
    tr = tr.to(x.device)
    cv = None
    if l2 is None:
        l2, cv = choose_l2(x[tr], y[tr], seed=seed)
    probe = fit_logistic_probe(x[tr], y[tr], l2=l2)
    probe.cv_auc = cv
    if he is not None:
        probe.heldout_auc = roc_auc(x[he.to(x.device)].cpu() @ probe.weight, y.cpu()[he])
    return probe


def last_token_features(
    model: Callable, input_ids: Tensor, attention_mask: Tensor, layers: Sequence[int]
) -> dict[int, Tensor]:
    """Last-real-token residual streams {layer i: [B, D] fp32} from ONE forward of the frozen model that
    stops after the deepest requested layer (layer i = the residual stream after block i)."""
    layers = sorted(set(int(i) for i in layers))
    if not layers:
        raise ValueError("last_token_features: give at least one layer")
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, taps=layers, stop_after=max(layers))
        return {i: losses.last_token(out.taps[i], attention_mask).float() for i in layers}


def fit_layer_probes(
    model: Callable,
    tok,
    rows: Sequence[tuple[str, int]],
    layers: Sequence[int],
    *,
    max_len: int,
    batch_size: int,
    seed: int,
    l2: float | None = DEFAULT_L2,
) -> dict[int, Probe]:
    """One probe per layer on the frozen model's last-token states of the (text, label) rows, label 1 = toxic; the
    texts go through the model in batches of `batch_size`, cut to `max_len` tokens. l2=None: chosen per layer by
    K-fold (`choose_l2`)."""
    device = next(model.parameters()).device
    feats: dict[int, list[Tensor]] = {i: [] for i in layers}
    for k in range(0, len(rows), batch_size):
        ids, mask = tok.batch([t for t, _ in rows[k : k + batch_size]], max_length=max_len)
        for i, x in last_token_features(model, ids.to(device), mask.to(device), layers).items():
            feats[i].append(x.cpu())
    labels = torch.tensor([y for _, y in rows])
    return {i: train_probe(torch.cat(feats[i]), labels, seed=seed, l2=l2) for i in layers}

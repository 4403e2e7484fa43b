"""Held-out evaluation of a binary classifier (the toxicity probes, ref.probe): stratified train / held-out splits,
stratified K folds, and the area under the ROC curve."""

from __future__ import annotations

import torch
from torch import Tensor


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties count 1/2.

    Computed from ranks (Mann-Whitney U), tied scores taking their average rank.
    """
    scores = scores.detach().to(torch.float64).flatten().cpu()
    labels = labels.detach().flatten().cpu()
    if scores.shape != labels.shape:
        raise ValueError(f"roc_auc: {scores.numel()} scores but {labels.numel()} labels")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("roc_auc: scores contain NaN or inf")
    pos = labels == 1
    n_pos = int(pos.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both classes among the labels")
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    last_rank = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of the last member of each tie group
    ranks = (last_rank - (counts - 1) / 2.0)[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, held-out) indices, sorted: `fraction` of each class held out (at least one, never all), the order
    drawn from the seed."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.detach().cpu().to(torch.int64)
    train_idx, held_idx = [], []
    for c in (0, 1):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() < 2:
            raise ValueError(f"class {c} has {idx.numel()} example(s); need at least 2 (one to train, one held out)")
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = min(max(1, round(fraction * idx.numel())), idx.numel() - 1)
        held_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return torch.sort(torch.cat(train_idx)).values, torch.sort(torch.cat(held_idx)).values


def stratified_folds(labels: Tensor, k: int, seed: int) -> list[Tensor]:
    """k disjoint index sets covering every example, each class dealt round-robin after a seeded shuffle (so each
    fold holds both classes); k is lowered to the smaller class's size when that is below k."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.detach().cpu().to(torch.int64)
    k = min(k, *(int((labels == c).sum()) for c in (0, 1)))
    if k < 2:
        raise ValueError("K-fold needs at least 2 examples of each class")
    folds: list[list[Tensor]] = [[] for _ in range(k)]
    for c in (0, 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        for f in range(k):
            folds[f].append(idx[f::k])
    return [torch.sort(torch.cat(f)).values for f in folds]

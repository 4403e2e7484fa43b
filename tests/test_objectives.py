"""ref.objectives: one objective per (method, goal), each computing the paper's equations on the taps."""

from __future__ import annotations

import pytest
import torch

from ref import losses
from ref.fused import eager
from ref.objectives import OBJECTIVES, Activations, Targets, random_directions
from ref.plan import GOALS, METHODS


def activations(layers, b=2, t=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: {i: torch.randn(b, t, d, generator=g) for i in layers}  # noqa: E731
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :2] = 0
    return Activations(mk(), mask, mk(), mk(), mask.flip(1))


def test_every_method_and_goal_has_an_objective():
    assert set(OBJECTIVES) == {(m, g) for m in METHODS for g in GOALS}


def test_objectives_are_the_papers_equations():
    a = activations([3])
    u = random_directions(["t"], 8, seed=0, device="cpu")["t"]
    t = Targets((3,), u, 4.0, None)
    rmu = OBJECTIVES["rmu", "wmdp"](a, t, eager)
    assert torch.equal(rmu.forget, losses.rmu_forget_loss(a.forget[3], u, 4.0, a.forget_mask))
    assert torch.equal(rmu.retain, losses.rmu_retain_loss(a.retain[3], a.frozen[3], a.retain_mask))
    assert OBJECTIVES["adaptive-rmu", "toxicity"] is OBJECTIVES["rmu", "wmdp"]  # only c differs
    ours = OBJECTIVES["ours", "wmdp"](a, Targets((3,), u, None, None), eager)
    assert torch.equal(ours.forget, losses.cosine_forget_loss(a.forget[3], u, a.forget_mask))
    assert torch.equal(ours.retain, losses.cosine_retain_loss(a.retain[3], a.frozen[3], a.retain_mask))
    assert ours.forget_per_layer is None

    layers = (1, 4, 6)
    a = activations(layers, seed=1)
    w = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    tox = OBJECTIVES["ours", "toxicity"](a, Targets(layers, u, None, w), eager)
    h_last = [losses.last_token(a.forget[i], a.forget_mask) for i in layers]
    expected = [(h_last[k] @ w[k]).pow(2).mean() for k in range(3)]  # eq. 6, layer by layer
    torch.testing.assert_close(tox.forget_per_layer, torch.stack(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(tox.forget, sum(expected), rtol=1e-6, atol=0)
    retain = [losses.cosine_retain_loss(a.retain[i], a.frozen[i], a.retain_mask) for i in layers]
    assert tox.retain.item() == pytest.approx(sum(r.item() for r in retain) / 3, rel=1e-6)


def test_random_directions_are_unit_positive_seeded_and_distinct():
    u = random_directions(["a", "b"], 16, seed=3, device="cpu")
    again = random_directions(["a", "b"], 16, seed=3, device="cpu")
    assert all(torch.equal(u[k], again[k]) for k in u)
    assert not torch.equal(u["a"], u["b"])
    for v in u.values():
        assert (v > 0).all() and v.norm().item() == pytest.approx(1.0, abs=1e-6)

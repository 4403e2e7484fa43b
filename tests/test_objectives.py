"""ref.objectives: one objective per (method, goal), each computing the paper's equations on the taps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ref import losses
from ref.io.data import GOALS
from ref.objectives import OBJECTIVES, Activations, Targets, random_directions
from ref.run.fused import eager
from ref.run.plan import METHODS


def activations(layers, b=2, t=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: {i: torch.randn(b, t, d, generator=g) for i in layers}
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :2] = 0
    return Activations(mk(), mask, mk(), mk(), mask.flip(1))


def test_every_method_and_goal_has_an_objective():
    assert set(OBJECTIVES) == {(m, g) for m in METHODS for g in GOALS}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_objectives_are_the_papers_equations(reduction):
    a = activations([3])
    u = random_directions(["t"], 8, seed=0, device="cpu")["t"]
    t = Targets((3,), u, reduction, steering=4.0)
    rmu = OBJECTIVES["rmu", "wmdp"].losses(a, t, eager)
    assert torch.equal(rmu.forget, losses.rmu_forget_loss(a.forget[3], u, 4.0, a.forget_mask, reduction))
    assert torch.equal(rmu.retain, losses.rmu_retain_loss(a.retain[3], a.frozen[3], a.retain_mask, reduction))
    assert OBJECTIVES["adaptive-rmu", "toxicity"].losses is OBJECTIVES["rmu", "wmdp"].losses  # only c differs
    ours = OBJECTIVES["ours", "wmdp"].losses(a, Targets((3,), u, reduction), eager)
    assert torch.equal(ours.forget, losses.cosine_forget_loss(a.forget[3], u, a.forget_mask, reduction))
    assert torch.equal(ours.retain, losses.cosine_retain_loss(a.retain[3], a.frozen[3], a.retain_mask, reduction))
    assert ours.forget_per_layer is None

    layers = (1, 4, 6)
    a = activations(layers, seed=1)
    w = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    for retain_layers in ("sum", "mean"):
        targets = Targets(layers, u, reduction, directions=w, tox_balance="paper", retain_layers=retain_layers)
        tox = OBJECTIVES["ours", "toxicity"].losses(a, targets, eager)
        h_last = [losses.last_token(a.forget[i], a.forget_mask) for i in layers]
        expected = [(h_last[k] @ w[k]).pow(2).mean() for k in range(3)]  # eq. 6, layer by layer
        torch.testing.assert_close(tox.forget_per_layer, torch.stack(expected), rtol=1e-6, atol=0)
        torch.testing.assert_close(tox.forget, sum(expected), rtol=1e-6, atol=0)
        retain = sum(
            losses.cosine_retain_loss(a.retain[i], a.frozen[i], a.retain_mask, reduction).item() for i in layers
        )
        assert tox.retain.item() == pytest.approx(retain / (3 if retain_layers == "mean" else 1), rel=1e-6)


def test_calibration_on_the_frozen_first_batch():
    layers = (1, 4, 6)
    a = activations(layers, seed=1)
    u = random_directions(["t"], 8, seed=0, device="cpu")["t"]
    w = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    tox = OBJECTIVES["ours", "toxicity"]
    paper = Targets(layers, u, "sum", directions=w, tox_balance="paper")
    assert tox.calibrate(a.forget, a.forget_mask, paper) == {}  # the paper's sum needs no divisor
    scaled = tox.calibrate(a.forget, a.forget_mask, replace(paper, tox_balance="scaled"))
    per_layer = tox.losses(a, paper, eager).forget_per_layer  # eq. 6 on these taps, layer by layer
    assert scaled["forget_scale"] == pytest.approx(per_layer.tolist(), rel=1e-6)
    # on the batch it was calibrated on, the scaled eq. 6 is exactly 1
    calibrated = replace(paper, tox_balance="scaled", **scaled)
    assert tox.losses(a, calibrated, eager).forget.item() == pytest.approx(1.0, rel=1e-6)

    one = activations([3])
    c = OBJECTIVES["adaptive-rmu", "wmdp"].calibrate(one.forget, one.forget_mask, Targets((3,), u, "mean", beta=5.0))
    norms = one.forget[3].norm(dim=-1)[one.forget_mask.bool()]
    assert c == {"steering": pytest.approx(5.0 * norms.mean().item(), rel=1e-6)}
    assert OBJECTIVES["rmu", "wmdp"].calibrate is None and OBJECTIVES["ours", "wmdp"].calibrate is None


def test_random_directions_sphere_is_seeded_unit_and_has_both_signs():
    u = random_directions(["a"], 64, seed=3, device="cpu", distribution="sphere")["a"]
    assert torch.equal(u, random_directions(["a"], 64, seed=3, device="cpu", distribution="sphere")["a"])
    assert u.norm().item() == pytest.approx(1.0, abs=1e-6) and (u < 0).any() and (u > 0).any()
    with pytest.raises(ValueError, match="distribution"):
        random_directions(["a"], 4, seed=0, device="cpu", distribution="cube")


def test_random_directions_are_unit_positive_seeded_and_distinct():
    u = random_directions(["a", "b"], 16, seed=3, device="cpu")
    again = random_directions(["a", "b"], 16, seed=3, device="cpu")
    assert all(torch.equal(u[k], again[k]) for k in u)
    assert not torch.equal(u["a"], u["b"])
    for v in u.values():
        assert (v > 0).all() and v.norm().item() == pytest.approx(1.0, abs=1e-6)

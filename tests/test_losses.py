"""ref.losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ref import losses

NAN = float("nan")


def e(i: int, d: int = 4, scale: float = 1.0) -> torch.Tensor:
    v = torch.zeros(d)
    v[i] = scale
    return v


def padded_batch():
    """Row 0 right-padded, row 1 left-padded; padding positions hold NaN and huge values."""
    u = e(0)
    h = torch.stack(
        [
            torch.stack([e(0, scale=3.0), e(1, scale=2.0), e(0, scale=-1.0), torch.full((4,), NAN)]),
            torch.stack([torch.full((4,), 1e30), e(0, scale=0.5), e(2, scale=7.0), e(0, scale=-4.0)]),
        ]
    )
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    return h, u, mask


# ---- eq. 4 and 5: cosine losses ----


def test_reduce_tokens_sum_is_each_texts_token_sum_averaged_over_texts():
    x = torch.tensor([[1.0, 2.0, 3.0, NAN], [1e30, 4.0, 5.0, 6.0], [7.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    # per-text sums over real tokens: 6, 15, 7 -> averaged over the 3 texts; padding (NaN, 1e30) excluded
    assert losses.reduce_tokens(x, mask, "sum").item() == pytest.approx((6 + 15 + 7) / 3, rel=1e-7)
    # mean over the 7 real tokens
    assert losses.reduce_tokens(x, mask, "mean").item() == pytest.approx(28 / 7, rel=1e-7)
    # a row without real tokens is not a text: it adds nothing and is not counted
    empty = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert losses.reduce_tokens(x, empty, "sum").item() == pytest.approx((6 + 7) / 2, rel=1e-7)
    assert losses.reduce_tokens(x, torch.zeros_like(mask), "sum").item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        losses.reduce_tokens(x, mask, "max")


def test_cosine_forget_aligned_orthogonal_opposite_with_garbage_padding():
    h, u, mask = padded_batch()
    h.requires_grad_(True)
    loss = losses.cosine_forget_loss(h, u, mask)
    # real tokens: cos = 1, 0, -1 (row 0) and 1, 0, -1 (row 1) -> 1 - cos = 0, 1, 2 | 0, 1, 2: each text sums to 3,
    # and the paper's E_x sum_t (the default) is their mean over the two texts, 3; the token mean is 1
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(3.0, abs=1e-6)
    assert losses.cosine_forget_loss(h, u, mask, "mean").item() == pytest.approx(1.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(h.grad).all()
    assert (h.grad[0, 3] == 0).all() and (h.grad[1, 0] == 0).all()


def test_cosine_forget_bool_mask_and_bf16_input():
    h, u, mask = padded_batch()
    h = torch.nan_to_num(h, nan=5.0, posinf=5.0).bfloat16()  # bf16 has no room for 1e30
    loss = losses.cosine_forget_loss(h, u, mask.bool(), "mean")
    assert loss.dtype == torch.float32
    # every real-token vector above is exactly representable in bf16, so the value is still exactly 1
    assert loss.item() == pytest.approx(1.0, abs=1e-7)


def test_cosine_forget_gradient_by_hand():
    # d/dh (1 - cos(h, u)) = -(u/|h||u| - cos * h/|h|^2); at h = (1, 1), u = (1, 0): cos = 1/sqrt2
    h = torch.tensor([[[1.0, 1.0]]], requires_grad=True)
    losses.cosine_forget_loss(h, torch.tensor([1.0, 0.0]), torch.ones(1, 1)).backward()
    c = 1 / math.sqrt(2)
    expected = -(torch.tensor([1.0, 0.0]) / math.sqrt(2) - c * torch.tensor([1.0, 1.0]) / 2)
    torch.testing.assert_close(h.grad[0, 0], expected, rtol=1e-6, atol=1e-7)


def test_cosine_retain_values():
    h, _, mask = padded_batch()
    h0 = torch.stack(
        [
            torch.stack([e(0, scale=10.0), e(2), e(0), torch.full((4,), -3.0)]),  # cos 1, 0, -1
            torch.stack([e(3), e(0, scale=0.5), e(2, scale=-1.0), e(3)]),  # cos 1, -1, 0
        ]
    )
    # 1 - cos: 0, 1, 2 | 0, 2, 1 -> token mean 1; each text sums to 3 -> the paper's E_x sum_t 3
    assert losses.cosine_retain_loss(h, h0, mask, "mean").item() == pytest.approx(1.0, abs=1e-7)
    assert losses.cosine_retain_loss(h, h0, mask).item() == pytest.approx(3.0, abs=1e-6)
    assert losses.cosine_retain_loss(h, h, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_sum_weighs_each_text_by_its_length_and_mean_by_tokens():
    # text 0 has 1 real token at 1 - cos = 2, text 1 has 3 real tokens at 0: sum -> (2 + 0) / 2 = 1; mean -> 2 / 4
    u = e(0)
    h = torch.stack([torch.stack([e(1), e(1), e(0, scale=-1.0)]), torch.stack([e(0), e(0), e(0)])])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    assert losses.cosine_forget_loss(h, u, mask, "sum").item() == pytest.approx(1.0, abs=1e-7)
    assert losses.cosine_forget_loss(h, u, mask, "mean").item() == pytest.approx(0.5, abs=1e-7)


def test_cosine_of_zero_vector_is_zero_not_nan():
    # eps: a real token whose state is exactly 0 gives cos = 0 (loss 1) and a finite gradient
    h = torch.zeros(1, 1, 4, requires_grad=True)
    loss = losses.cosine_forget_loss(h, e(0), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == 1.0 and torch.isfinite(h.grad).all()


# ---- eq. 2 and 3: RMU losses ----


def test_rmu_forget_by_hand():
    h, u, mask = padded_batch()
    c = 2.0
    # per real token, mean over D=4 of (h - 2 e0)^2:
    # row 0: (3-2)^2/4 = 0.25; (4 + 4)/4 = 2; (-3)^2/4 = 2.25
    # row 1: (-1.5)^2/4 = 0.5625; (4 + 49)/4 = 13.25; 36/4 = 9
    expected = (0.25 + 2 + 2.25 + 0.5625 + 13.25 + 9) / 6
    assert losses.rmu_forget_loss(h, u, c, mask).item() == pytest.approx(expected, rel=1e-6)
    # a 0-dim tensor coefficient (what adaptive_steering_coefficient returns) gives the same
    assert losses.rmu_forget_loss(h, u, torch.tensor(c), mask).item() == pytest.approx(expected, rel=1e-6)
    # the paper's E_x sum_t ||h_t - c u||^2: sums over D and over each text's tokens, averaged over the 2 texts
    summed = ((0.25 + 2 + 2.25) * 4 + (0.5625 + 13.25 + 9) * 4) / 2
    assert losses.rmu_forget_loss(h, u, c, mask, "sum").item() == pytest.approx(summed, rel=1e-6)


def test_rmu_losses_equal_reference_mse_without_padding():
    # the reference RMU code uses F.mse_loss over [B, T, D]; with no padding our scale must be the same
    g = torch.Generator().manual_seed(0)
    h, h0 = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    u = F.normalize(torch.rand(8, generator=g), dim=0)
    ones = torch.ones(2, 5, dtype=torch.bool)
    ref_forget = F.mse_loss(h, 6.5 * u.expand_as(h))
    torch.testing.assert_close(losses.rmu_forget_loss(h, u, 6.5, ones), ref_forget, rtol=1e-6, atol=0)
    torch.testing.assert_close(losses.rmu_retain_loss(h, h0, ones), F.mse_loss(h, h0), rtol=1e-6, atol=0)


def test_rmu_retain_by_hand():
    h, _, mask = padded_batch()
    h0 = torch.where(mask.bool()[..., None], h, 0.0)
    h0[0, 1, 1] = 0.0  # token (0, 1): diff 2 in one dim -> 4/4 = 1
    h0[1, 3] = e(0, scale=-2.0)  # token (1, 3): diff -2 -> 1
    assert losses.rmu_retain_loss(h, h0, mask).item() == pytest.approx(2 / 6, rel=1e-6)
    # sum: ||diff||^2 = 4 on one token of each text -> (4 + 4) / 2
    assert losses.rmu_retain_loss(h, h0, mask, "sum").item() == pytest.approx(4.0, rel=1e-6)


def test_rmu_retain_per_text_by_hand():
    h, _, mask = padded_batch()
    h0 = torch.where(mask.bool()[..., None], h, 0.0)
    h0[0, 1, 1] = 0.0  # row 0: one token at 1, two at 0 over its 3 real tokens -> 1/3
    h0[1, 3] = e(0, scale=-6.0)  # row 1: token (1, 3) diff 2 in one dim -> 4/4 = 1; -> 1/3 (padding's 1e30 ignored)
    h0[1, 2, 3] = 3.0  # and token (1, 2): diff -3 in one dim -> 9/4; row 1: (1 + 9/4) / 3
    per_text = losses.rmu_retain_loss_per_text(h, h0, mask)
    torch.testing.assert_close(per_text, torch.tensor([1 / 3, 13 / 12]), rtol=1e-6, atol=0)
    # the token-weighted mean of the rows is eq. 3 of the batch (3 real tokens each: the plain mean)
    assert per_text.mean().item() == pytest.approx(losses.rmu_retain_loss(h, h0, mask).item(), rel=1e-6)
    assert losses.rmu_retain_loss_per_text(h, h0, torch.zeros_like(mask)).tolist() == [0.0, 0.0]
    # sum: each text's sum of ||diff||^2 (4 | 4 + 9); their mean is eq. 3 of the batch under "sum"
    summed = losses.rmu_retain_loss_per_text(h, h0, mask, "sum")
    torch.testing.assert_close(summed, torch.tensor([4.0, 13.0]), rtol=1e-6, atol=0)
    assert summed.mean().item() == pytest.approx(losses.rmu_retain_loss(h, h0, mask, "sum").item(), rel=1e-6)


def test_adaptive_steering_coefficient_by_hand():
    h = torch.tensor([[[3.0, 4.0], [6.0, 8.0], [1e6, 1e6]]])  # norms 5, 10, padding
    c = losses.adaptive_steering_coefficient(h, torch.tensor([[1, 1, 0]]), beta=5.0)
    assert c.dtype == torch.float32 and c.dim() == 0
    assert c.item() == pytest.approx(5.0 * 7.5, rel=1e-7)


# ---- last token and eq. 6 ----


def test_last_token_left_and_right_padding():
    h = torch.arange(3 * 4).float().reshape(3, 4, 1) * torch.ones(3, 4, 2)  # h[b, t] = 4b + t
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    out = losses.last_token(h, mask)
    assert out.shape == (3, 2)
    assert out[:, 0].tolist() == [1.0, 7.0, 11.0]


def test_last_token_rejects_empty_row():
    with pytest.raises(ValueError, match="no real token"):
        losses.last_token(torch.zeros(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_probe_projection_loss_by_hand():
    h_last = [
        torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]),
        torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]),
    ]
    directions = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    total, per_layer = losses.probe_projection_loss(h_last, directions)
    # layer 0: projections 2, 1 -> (4 + 1)/2 = 2.5; layer 1: 3, 2 -> (9 + 4)/2 = 6.5
    torch.testing.assert_close(per_layer, torch.tensor([2.5, 6.5]), rtol=0, atol=0)
    assert total.item() == 9.0


def test_normalized_probe_projection_loss_divides_each_layer_by_its_scale_and_averages():
    h_last = [
        torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]),
        torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]),
    ]
    directions = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    total, per_layer = losses.normalized_probe_projection_loss(h_last, directions, torch.tensor([5.0, 13.0]))
    torch.testing.assert_close(per_layer, torch.tensor([2.5, 6.5]), rtol=0, atol=0)  # eq. 6's own terms, for logs
    assert total.item() == (2.5 / 5.0 + 6.5 / 13.0) / 2  # 0.5: each layer at half its scale
    # at the scale's own batch it is exactly 1, whatever the layers' magnitudes (here 2.5 and 6.5)
    assert losses.normalized_probe_projection_loss(h_last, directions, per_layer)[0].item() == 1.0
    h = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)  # d/dh of (h . w)^2 / s = 2 (h . w) w / s
    losses.normalized_probe_projection_loss([h], directions[:1], torch.tensor([4.0]))[0].backward()
    torch.testing.assert_close(h.grad, torch.tensor([[0.0, 1.0, 0.0]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="scale must be"):
        losses.normalized_probe_projection_loss(h_last, directions, torch.ones(3))


def test_shape_errors():
    h = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="mask"):
        losses.cosine_forget_loss(h, e(0), torch.ones(2, 4))
    with pytest.raises(ValueError, match="u must be"):
        losses.rmu_forget_loss(h, torch.ones(5), 1.0, torch.ones(2, 3))
    with pytest.raises(ValueError, match="h0"):
        losses.cosine_retain_loss(h, torch.zeros(2, 3, 5), torch.ones(2, 3))
    with pytest.raises(ValueError, match="directions"):
        losses.probe_projection_loss([torch.zeros(2, 4)], torch.zeros(2, 4))


# ---- eq. 1 and the toxicity retain term ----


def test_unlearning_loss_is_eq_1():
    lf, lr = torch.tensor(0.75), torch.tensor(0.5)
    assert losses.unlearning_loss(lf, lr, 3.0).item() == 0.75 + 3.0 * 0.5


def test_toxicity_retain_loss_sums_or_averages_eq_5_over_the_layers():
    h, _, mask = padded_batch()
    same, opposite = losses.cosine_retain_loss(h, h, mask, "mean"), losses.cosine_retain_loss(h, -h, mask, "mean")
    assert (same.item(), opposite.item()) == (pytest.approx(0.0, abs=1e-7), pytest.approx(2.0, abs=1e-6))
    # eq. 5 per layer with the token sum: 0, 6, 6 (each text's 3 real tokens at 2, averaged over the 2 texts)
    assert losses.toxicity_retain_loss([h, h, h], [h, -h, -h], mask).item() == pytest.approx(12.0, abs=1e-5)
    mean = losses.toxicity_retain_loss([h, h, h], [h, -h, -h], mask, reduction="mean", layers="mean")
    assert mean.item() == pytest.approx(4.0 / 3.0, abs=1e-6)
    calls = []

    def layer_loss(a, b, m, reduction):
        calls.append(reduction)
        return losses.cosine_retain_loss(a, b, m, reduction)

    losses.toxicity_retain_loss([h, h], [h, -h], mask, layer_loss=layer_loss, reduction="mean")
    assert calls == ["mean", "mean"]  # one eq. 5 per layer (the loop passes the fused eq. 5 here)
    with pytest.raises(ValueError, match="layers"):
        losses.toxicity_retain_loss([h], [h], mask, layers="max")
    with pytest.raises(ValueError, match="one h0 per h"):
        losses.toxicity_retain_loss([h], [h, h], mask)

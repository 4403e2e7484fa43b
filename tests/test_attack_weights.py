"""ref.quantize: attacks that return new values for named tensors, leaving the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from ref.checkpoint import load_model
from ref.errors import RefError
from ref.model import Transformer
from ref.quantize import quantized_weights

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Cats, dogs and birds live in gardens; rivers flow."]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEARS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def batch(tiny_llama):
    ids, mask = tiny_llama[2].batch(TEXTS)
    assert not mask.all()  # one row is left-padded: the padding is exercised
    return ids, mask


def fresh(tiny_dirs, family: str = "llama") -> Transformer:
    return load_model(tiny_dirs[family], dtype=torch.float32, device="cpu")


def snapshot(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: Transformer, snap: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


# --- quantize ---


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantize_error_bound_levels_and_keys(tiny_llama, bits):
    model, gs, top = tiny_llama[1], 40, 2 ** (bits - 1) - 1  # 40 divides neither in-dim (64, 96): a short last group
    snap = snapshot(model)
    new = quantized_weights(model, bits, gs)
    n = model.config.num_layers
    assert set(new) == {f"model.layers.{i}.{p}.weight" for i in range(n) for p in LINEARS}
    params = dict(model.named_parameters())
    for name, d in new.items():
        w = params[name]
        assert d.shape == w.shape and d.dtype == w.dtype
        for start in range(0, w.shape[1], gs):  # group by group, scale recomputed here
            wg, dg = w[:, start : start + gs], d[:, start : start + gs]
            scale = wg.abs().amax(1, keepdim=True) / top
            # rounding: w/scale to the nearest level leaves <= scale/2; fp32 adds an ulp of values up to top * scale
            assert ((wg - dg).abs() <= scale * (0.5 + top * 2e-7)).all()
            levels = dg / scale  # whole numbers in -top..top: at most 2 top + 1 = 2^bits - 1 distinct values
            torch.testing.assert_close(levels, levels.round(), rtol=0, atol=top * 1e-6)
            assert (levels.abs() <= top * (1 + 1e-6)).all()
            if bits <= 4:
                assert max(len(row.unique()) for row in dg) <= 2**bits - 1
    assert_untouched(model, snap)


def test_quantize_zero_group_dtype_and_bad_args(tiny_dirs):
    model = fresh(tiny_dirs)
    name = "model.layers.0.self_attn.q_proj.weight"
    dict(model.named_parameters())[name][3, :40] = 0.0
    d = quantized_weights(model, 4, 40)[name]
    assert torch.isfinite(d).all() and torch.equal(d[3, :40], torch.zeros(40))
    half = load_model(tiny_dirs["llama"], dtype=torch.bfloat16, device="cpu")
    assert {t.dtype for t in quantized_weights(half, 4).values()} == {torch.bfloat16}
    for bits, gs in [(1, 128), (17, 128), (4, 0)]:
        with pytest.raises(RefError):
            quantized_weights(model, bits, gs)


def test_quantize_logits_8bit_close_4bit_not(tiny_llama, batch):
    model, (ids, mask) = tiny_llama[1], batch
    snap, real = snapshot(model), mask.bool()
    ref = model(ids, mask).logits[real]
    err = {}
    for bits in (8, 4):
        out = functional_call(model, quantized_weights(model, bits), args=(ids, mask)).logits[real]
        err[bits] = ((out - ref).norm() / ref.norm()).item()
    print(f"relative logit error: 8-bit {err[8]:.4f}, 4-bit {err[4]:.4f}")
    # 8 bits: each weight moves <= max|w| / 254 in its group, ~0.6% of the weights' norm (Gaussian rows); 28 such
    # linears in 4 blocks roughly double it in the logits (measured 1.2%). 4 bits: 16x coarser (measured 20%).
    assert err[8] < 0.03
    assert err[4] > 5 * err[8]
    assert_untouched(model, snap)

"""ref.attacks.quantize (RTN, NF4), ref.attacks.ablate and ref.attacks.prune: attacks that return new values for named
tensors, leaving the model untouched."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ref.attacks.ablate import ablated_weights, ablation_directions
from ref.attacks.prune import pruned_weights, set_difference, snip_importance
from ref.attacks.quantize import NF4_LEVELS, _nf4_round_trip, nf4_weights, quantized_weights
from ref.attacks.relearn import causal_lm_loss
from ref.io.checkpoint import load_model
from ref.io.errors import RefError
from ref.model import Transformer

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


def assign(model: Transformer, name: str, value: torch.Tensor) -> None:
    """Swap a tensor in as a separate parameter (this also unties lm_head from embed_tokens)."""
    module, leaf = name.rsplit(".", 1)
    setattr(model.get_submodule(module), leaf, nn.Parameter(value, requires_grad=False))


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


# --- ablate ---


def rank_one_change(tiny_dirs, layer: int = 1):
    """An 'unlearned' llama: u v^T added to one down_proj. Returns (model, originals, u)."""
    model = fresh(tiny_dirs)
    g = torch.Generator().manual_seed(0)
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    w = dict(model.named_parameters())[name]
    u, v = torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g)
    originals = {name: w.clone()}
    w += 0.05 * torch.outer(u, v)  # u is what the change writes into the residual stream
    return model, originals, u


def test_directions_follow_a_rank_one_change(tiny_dirs, batch):
    model, originals, u = rank_one_change(tiny_dirs, layer=1)
    snap = snapshot(model)
    dirs = ablation_directions(model, originals, *batch, layers=[1, 3])
    assert dirs.shape == (2, model.config.hidden_size) and dirs.dtype == torch.float32
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(2))
    cos = torch.dot(dirs[0], u / u.norm()).item()  # after block 1 the difference is u * (v . activation)
    print(f"cosine of the layer-1 direction with u: {cos:.6f}")
    assert abs(cos) > 0.99  # the sign is that of the mean of v . activation over the tokens
    assert_untouched(model, snap)


def test_directions_need_a_difference(tiny_llama, batch):
    model = tiny_llama[1]
    same = {n: p.clone() for n, p in model.named_parameters() if n.endswith("down_proj.weight")}
    with pytest.raises(RefError, match="nothing to ablate"):
        ablation_directions(model, same, *batch, layers=[0, 2])
    with pytest.raises(RefError):
        ablation_directions(model, {"model.layers.9.mlp.w": torch.zeros(1)}, *batch, layers=[0])
    with pytest.raises(RefError):
        ablation_directions(model, same, *batch, layers=[])


def build(tiny_dirs, case: str) -> Transformer:
    """The model for each case; called twice, it gives two identical models."""
    if case != "biases":
        model = fresh(tiny_dirs)
        if case == "tied":
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        return model
    cfg = replace(fresh(tiny_dirs).config, o_bias=True, mlp_bias=True)  # no tiny family has residual-writing biases
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", ["untied", "tied", "biases"])
def test_ablation_makes_the_stream_orthogonal(tiny_dirs, batch, case):
    model, copy = build(tiny_dirs, case), build(tiny_dirs, case)
    snap, n, D = snapshot(model), model.config.num_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    dirs = torch.randn(3, D, generator=g)
    dirs = torch.cat([dirs, dirs[:1] - 2 * dirs[1:2]])  # a dependent fourth direction is dropped, not an error
    new = ablated_weights(model, dirs)
    writers = {
        f"model.layers.{i}.{p}.{k}"
        for i in range(n)
        for p in ("self_attn.o_proj", "mlp.down_proj")
        for k in (("weight", "bias") if case == "biases" else ("weight",))
    }
    lm_head = {"lm_head.weight"} if case == "tied" else set()
    assert set(new) == {"model.embed_tokens.weight"} | writers | lm_head
    if case == "tied":  # the unembedding keeps the original values
        assert torch.equal(new["lm_head.weight"], model.model.embed_tokens.weight)
    for name, value in new.items():
        assign(copy, name, value)
    units = dirs / dirs.norm(dim=1, keepdim=True)
    kw = dict(taps=list(range(n)), stop_after=n - 1)
    before = torch.stack(list(model(*batch, **kw).taps.values()))  # [n, B, T, D]
    after = torch.stack(list(copy(*batch, **kw).taps.values()))
    proj_before, proj_after = (before @ units.T).abs().amax(), (after @ units.T).abs().amax()
    scale = after.norm(dim=-1).amax()
    print(f"{case}: max |h . d| before {proj_before:.3e}, after {proj_after:.3e}, max |h| {scale:.3e}")
    # fp32: each writer's output along d is rounding (~1e-7 of |h| per add), summed over 2n + 1 writers
    assert proj_after <= 1e-5 * scale
    assert proj_before > 1e-2 * scale
    if case == "tied":
        assert torch.equal(copy.lm_head.weight, model.model.embed_tokens.weight)
    assert_untouched(model, snap)


def test_ablation_removes_exactly_the_component(tiny_llama):
    model = tiny_llama[1]
    d = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    d = d / d.norm()
    new = ablated_weights(model, d[None])
    E, dd = model.model.embed_tokens.weight.double(), d.double()
    exact = dict(rtol=0, atol=1e-8)  # fp32 results of values ~0.02: rounding is ~1e-9
    torch.testing.assert_close(new["model.embed_tokens.weight"].double(), E - torch.outer(E @ dd, dd), **exact)
    W = model.model.layers[2].self_attn.o_proj.weight.double()  # [D, in]: the output side is the rows
    torch.testing.assert_close(
        new["model.layers.2.self_attn.o_proj.weight"].double(), W - torch.outer(dd, dd @ W), **exact
    )


def test_ablation_refuses_post_norm_and_zero_directions(tiny_dirs, tiny_llama):
    with pytest.raises(RefError, match="pre-norm"):
        ablated_weights(fresh(tiny_dirs, "olmo3"), torch.randn(1, 64))
    with pytest.raises(RefError, match="nothing to ablate"):
        ablated_weights(tiny_llama[1], torch.zeros(2, tiny_llama[1].config.hidden_size))
    with pytest.raises(RefError):
        ablated_weights(tiny_llama[1], torch.randn(2, 7))


# --- NF4 ---


def test_nf4_code_book_is_qloras_construction():
    # QLoRA (appendix E): 8 positive quantiles of N(0, 1) from 0.5 to offset 0.9677083, 7 negative ones, and 0, scaled
    # to [-1, 1]. Recomputed in fp64 here; the published table was computed in fp32 (differences of ~1e-7).
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(torch.tensor(NF4_LEVELS, dtype=torch.float64), levels / levels.max(), rtol=0, atol=5e-7)


def test_nf4_values_lie_on_the_code_book_times_the_block_scale(tiny_llama):
    model = tiny_llama[1]
    snap, params = snapshot(model), dict(model.named_parameters())
    new = nf4_weights(model)
    n = model.config.num_layers
    assert set(new) == {f"model.layers.{i}.{p}.weight" for i in range(n) for p in LINEARS}
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    for name, d in new.items():
        w = params[name]
        assert d.shape == w.shape and d.dtype == w.dtype and w.numel() % 64 == 0
        for wb, db in zip(w.double().flatten().split(64), d.double().flatten().split(64), strict=True):  # row-major
            scale = wb.abs().max()
            on_book = db / scale
            # every value is a level times its block's absmax (fp32 rounding of the product: ~1e-7 relative)
            nearest = levels[(on_book[:, None] - levels).abs().argmin(1)]
            torch.testing.assert_close(on_book, nearest, rtol=0, atol=1e-6)
            # ... and the level nearest to w / scale: the error is at most half the gap of w's bracket of levels
            x = wb / scale
            hi = torch.bucketize(x, levels).clamp(1, 15)
            assert ((x - on_book).abs() <= (levels[hi] - levels[hi - 1]) / 2 + 1e-6).all()
            assert on_book[wb.abs().argmax()].abs() == 1  # the block's largest value is exact
    assert_untouched(model, snap)


def test_nf4_by_hand_padding_zero_blocks_and_dtype(tiny_dirs):
    # one block: the scale is 1.0; 0.5 is below the midpoint 0.5017 of its bracket (0.4407, 0.5626), 0.1 below
    # 0.1203 (0.0796, 0.1609), -0.3 above -0.3397 (-0.3949, -0.2844)
    w = torch.tensor([[0.5, -1.0, 0.1, -0.3]])
    want = [0.44070982933044434, -1.0, 0.07958029955625534, -0.28444138169288635]
    assert _nf4_round_trip(w, 64).tolist() == [pytest.approx(want, abs=1e-7)]
    w = torch.arange(100.0).view(10, 10) - 30  # 100 values: a block of 64, then 36 padded with zeros
    d = _nf4_round_trip(w, 64).flatten()
    assert d[63] == 33 and d[99] == 69 and d[:64].abs().max() == 33  # each block's absmax is exact
    zero = torch.zeros(3, 64)
    assert torch.equal(_nf4_round_trip(zero, 64), zero)  # an all-zero block stays zero, no NaN
    half = load_model(tiny_dirs["llama"], dtype=torch.bfloat16, device="cpu")
    assert {t.dtype for t in nf4_weights(half).values()} == {torch.bfloat16}
    with pytest.raises(RefError):
        nf4_weights(half, block_size=0)


# --- prune ---


def test_set_difference_by_hand():
    forget = torch.tensor([[9.0, 8.0, 1.0, 0.0], [7.0, 2.0, 3.0, 6.0]])  # top 3 of 8 (k = int(0.375 * 8)): 9, 8, 7
    retain = torch.tensor([[9.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 4.0]])  # top 3: 9, 5, 4
    assert set_difference(forget, retain, 0.375).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert not set_difference(forget, retain, 0.1).any()  # int(0.8) = 0 weights
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(RefError):
            set_difference(forget, retain, bad)


def test_pruning_removes_exactly_the_chosen_weights(tiny_llama):
    model = tiny_llama[1]
    snap, params = snapshot(model), dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    forget = {n: torch.rand(params[n].shape, generator=g) for n in params if n.endswith("proj.weight")}
    retain = {n: torch.rand(s.shape, generator=g) for n, s in forget.items()}
    new = pruned_weights(model, forget, retain, 0.1)
    assert set(new) == set(forget)
    for name, d in new.items():
        w, k = params[name], int(0.1 * params[name].numel())
        top_f = set(forget[name].flatten().topk(k).indices.tolist())
        chosen = top_f - set(retain[name].flatten().topk(k).indices.tolist())
        assert 0 < len(chosen) < k  # some of the forget top are also in the retain top
        zeroed = {i for i, v in enumerate(d.flatten().tolist()) if v == 0}
        assert zeroed == chosen  # exactly those (no weight of the tiny model is 0 to begin with)
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[list(chosen)] = False
        assert torch.equal(d.flatten()[keep], w.flatten()[keep])
    assert_untouched(model, snap)


def test_snip_importance_is_weight_times_summed_gradient_magnitude(tiny_dirs, tiny_llama):
    _, model, tok = tiny_llama
    snap = snapshot(model)
    got = snip_importance(model, tok, TEXTS, max_len=16)
    assert all(p.grad is None for p in model.parameters())
    assert_untouched(model, snap)
    # independent: a trainable copy, each text's loss backpropagated on its own, |grad| summed, times |W|
    copy = fresh(tiny_dirs).requires_grad_(True)
    summed = {n: torch.zeros_like(p) for n, p in copy.named_parameters() if n in got}
    for text in TEXTS:
        copy.zero_grad()
        ids, mask = tok.batch([text], max_length=16)
        causal_lm_loss(copy(ids, mask).logits, ids, mask).backward()
        for n, p in copy.named_parameters():
            if n in summed:
                summed[n] += p.grad.abs()
    assert set(got) == {f"model.layers.{i}.{p}.weight" for i in range(model.config.num_layers) for p in LINEARS}
    for n, p in copy.named_parameters():
        if n in got:  # the same fp32 operations, through functional_call or the modules: equal up to rounding
            torch.testing.assert_close(got[n], p.detach().abs() * summed[n], rtol=1e-5, atol=1e-9)

"""LoRA (ref/attacks/lora.py) and the relearning attack (ref/attacks/relearn.py) on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ref.attacks.lora import LoRA
from ref.attacks.relearn import block_linear_weights, causal_lm_loss, relearn, warmup_then_linear_decay
from ref.io.errors import RefError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Rivers flow to the sea.",
    "Cats, dogs and birds live in gardens.",
    "Unlearning removes knowledge from a language model.",
]


def loss_with(model, tok, values: dict | None = None) -> float:
    """Causal LM loss of the model on TEXTS, with `values` swapped in."""
    ids, mask = tok.batch(TEXTS)
    with torch.no_grad():
        logits = functional_call(model, values or {}, args=(ids, mask)).logits
    return causal_lm_loss(logits, ids, mask).item()


def snapshot(model) -> dict:
    return {k: (v.clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model, before: dict) -> None:
    for k, v in model.state_dict(keep_vars=True).items():
        assert torch.equal(v, before[k][0]) and v.requires_grad == before[k][1], k


def test_lora_starts_equal_and_trains_only_a_and_b(tiny_llama):
    _, model, tok = tiny_llama
    ids, mask = tok.batch(TEXTS)
    lora = LoRA(model, r=4, alpha=8.0)
    assert len(lora.names) == 7 * model.config.num_layers
    logits = lora(ids, mask)
    assert torch.equal(logits, model(ids, mask).logits)  # B = 0: x W^T + s (x A^T) 0 is exactly x W^T
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in lora.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert {n for n, _ in lora.named_parameters()} == {f"{ab}.{i}" for ab in "ab" for i in range(len(lora.names))}


def test_merged_weights_give_the_adapted_logits(tiny_llama):
    _, model, tok = tiny_llama
    ids, mask = tok.batch(TEXTS)
    lora = LoRA(model, r=4, alpha=8.0, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in lora.b:
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        adapted = lora(ids, mask)
        merged = functional_call(model, lora.merged(), args=(ids, mask)).logits
    assert not torch.allclose(adapted, model(ids, mask).logits, atol=1e-3)  # B != 0 changes the model
    # fp32: x W^T + s (x A^T) B^T and x (W + s B A)^T differ by rounding only (measured 3.2e-7 on logits of std 0.16)
    torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-5)


def test_lora_rejects_bad_settings(tiny_llama):
    _, model, _ = tiny_llama
    for kw in (
        dict(r=0),
        dict(alpha=0.0),
        dict(targets=("mlp.nope",)),
        dict(targets=("self_attn.q_norm",)),
        dict(targets=()),
    ):
        with pytest.raises(RefError):
            LoRA(model, **kw)


def test_causal_lm_loss_by_hand_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    V, T = 11, 6
    logits, ids = torch.randn(2, T, V, generator=g), torch.randint(V, (2, T), generator=g)
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(causal_lm_loss(logits, ids, torch.ones(2, T, dtype=torch.long)), by_hand)
    # row 0 left-padded by 3 positions of garbage logits and ids: the same loss as alone
    padded_logits = torch.cat([torch.randn(1, 3, V, generator=g) * 100, logits[:1]], dim=1)
    padded_ids = torch.cat([torch.full((1, 3), 7), ids[:1]], dim=1)
    padded_mask = torch.tensor([[0] * 3 + [1] * T])
    alone = causal_lm_loss(logits[:1], ids[:1], torch.ones(1, T, dtype=torch.long))
    assert torch.equal(causal_lm_loss(padded_logits, padded_ids, padded_mask), alone)
    assert causal_lm_loss(logits.half(), ids, torch.ones(2, T, dtype=torch.long)).dtype == torch.float32


def test_schedule_warms_up_to_lr_then_decays_linearly_to_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    steps, warmup = 10, 0.2  # w = 2 warmup steps
    scheduler = warmup_then_linear_decay(opt, steps, warmup)
    multipliers = [scheduler.lr_lambdas[0](k) for k in range(steps + 1)]
    assert multipliers == pytest.approx([0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0])
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert max(seen) == pytest.approx(2e-4) and seen[2] == pytest.approx(2e-4) and opt.param_groups[0]["lr"] == 0


def test_relearn_lowers_the_loss_leaves_the_model_and_is_deterministic(tiny_llama):
    _, model, tok = tiny_llama
    before = snapshot(model)
    kw = dict(r=8, alpha=16.0, lr=1e-2, epochs=2, warmup=0.1, seed=3)
    new = relearn(model, tok, TEXTS, **kw)
    assert_unchanged(model, before)
    assert set(new) == set(LoRA(model, r=1).names)
    assert loss_with(model, tok, new) < loss_with(model, tok) - 0.1  # measured 5.73 -> 5.50
    again = relearn(model, tok, TEXTS, **kw)
    assert all(torch.equal(new[k], again[k]) for k in new)
    other = relearn(model, tok, TEXTS, **(kw | dict(seed=4)))
    assert not all(torch.equal(new[k], other[k]) for k in new)


def test_full_fine_tuning_changes_only_block_linear_weights(tiny_llama):
    _, model, tok = tiny_llama
    before = snapshot(model)
    new = relearn(model, tok, TEXTS, lora=False, lr=1e-3, epochs=1, warmup=0.0)
    assert_unchanged(model, before)
    names = block_linear_weights(model)
    assert set(new) == set(names) and len(names) == 7 * model.config.num_layers
    assert all(not torch.equal(new[k], before[k][0]) for k in new)
    assert loss_with(model, tok, new) < loss_with(model, tok)  # measured 5.73 -> 5.59


def test_relearn_rejects_bad_input(tiny_llama):
    _, model, tok = tiny_llama
    with pytest.raises(RefError, match="no texts"):
        relearn(model, tok, [])
    with pytest.raises(RefError, match="fewer than 2 tokens"):
        relearn(model, tok, ["a river", ""])
    with pytest.raises(RefError, match="epochs"):
        relearn(model, tok, TEXTS, epochs=0)

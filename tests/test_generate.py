"""ref.generate: top-p filtering, seeded sampling, KV-cache sampling against recomputation."""

from __future__ import annotations

import pytest
import torch

from ref.generate import generate, next_token, top_p_filter


def test_top_p_filter_on_hand_made_distribution():
    p = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = p.log()
    keep = lambda top_p: torch.isfinite(top_p_filter(logits, top_p))  # noqa: E731
    assert keep(0.4).tolist() == [False, True, False, False]  # the most likely token alone reaches 0.4
    assert keep(0.7).tolist() == [False, True, False, True]  # 0.5 < 0.7 <= 0.8
    assert keep(0.85).tolist() == [False, True, True, True]  # 0.8 < 0.85 <= 0.95
    assert keep(1.0).tolist() == [True, True, True, True]
    probs = top_p_filter(logits, 0.85).softmax(-1)
    # renormalised over the kept tokens: p / 0.95 (fp32 softmax, 1e-6)
    assert probs.tolist() == pytest.approx([0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], abs=1e-6)


def test_top_p_filter_keeps_what_transformers_keeps():
    """The nucleus equals transformers' TopPLogitsWarper on peaked and flat rows (few or thousands of tokens kept),
    whether it is found among the candidates or after the full sort (candidates=8 forces the fallback)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5000, generator=g) * torch.logspace(-1, 1.3, 64)[:, None]  # flat ... peaked rows
    for top_p in (0.3, 0.9, 0.99):
        theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        for candidates in (8, 1024, 5000):
            ours = top_p_filter(logits, top_p, candidates)
            assert torch.equal(torch.isfinite(ours), theirs), (top_p, candidates)
            assert torch.equal(ours[theirs], logits[theirs])  # kept logits unchanged
        sizes = theirs.sum(-1)
        assert sizes.min() <= 8 < 1024 < sizes.max()  # both paths ran at candidates 1024


def test_sampling_is_fixed_for_a_seed(tiny_llama):
    _, model, tok = tiny_llama
    prompts = ["The quick brown fox", "Cats"]
    a = generate(model, tok, prompts, 8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tok, prompts, 8, temperature=1.0, top_p=0.9, seed=3)
    c = generate(model, tok, prompts, 8, temperature=1.0, top_p=0.9, seed=4)
    assert a == b and a != c


def no_cache_sample(model, tok, prompts, max_new_tokens, temperature, top_p, seed):
    """Reference sampler: recompute the whole (left-padded) sequence every step, no KV cache."""
    ids, mask = tok.batch(prompts)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max_new_tokens):
        t = next_token(model(ids, mask).logits[:, -1], temperature, top_p, gen)
        out.append(t)
        ids, mask = torch.cat([ids, t[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    rows = torch.stack(out, 1).tolist()
    return [r[: r.index(tok.eos_id) + 1] if tok.eos_id in r else r for r in rows]


def test_kv_cache_sampling_equals_recompute(tiny_llama):
    _, model, tok = tiny_llama
    prompts = ["The quick brown fox jumps over", "Rivers", "Cats, dogs and birds"]  # left padding in play
    for seed in (0, 1):
        got = generate(model, tok, prompts, 10, temperature=1.0, top_p=0.9, seed=seed)
        assert got == no_cache_sample(model, tok, prompts, 10, 1.0, 0.9, seed)

"""ref.generate: top-p filtering, seeded sampling, KV-cache sampling against recomputation, shared-prefill sampling
of several prompts against the one-prompt path and transformers' generate."""

from __future__ import annotations

import copy

import pytest
import torch

from ref.evaluation.generate import (
    RepeatedCache,
    draw,
    exponential_race,
    generate,
    next_token,
    probabilities,
    sample_continuations,
    top_p_filter,
)
from ref.io.checkpoint import load_model
from ref.io.tokenizer import load_tokenizer
from ref.model import KVCache


def test_top_p_filter_on_hand_made_distribution():
    p = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = p.log()
    keep = lambda top_p: torch.isfinite(top_p_filter(logits, top_p))
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


def test_probabilities_are_the_renormalised_nucleus():
    """probabilities (in place: exp, zero outside the nucleus, over the sum) = softmax of the top-p-filtered
    logits over the temperature, to float32 rounding, with exactly the same support."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 3000, generator=g) * torch.logspace(-1, 1, 16)[:, None]
    for temperature, top_p in ((1.0, 0.9), (0.7, 0.5), (1.3, 1.0)):
        want = top_p_filter(logits / temperature, top_p).softmax(-1)
        got = probabilities(logits, temperature, top_p)
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got.sum(-1), torch.ones(16))


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


PROMPTS = ["The quick brown fox jumps over the lazy dog", "Rivers", "Cats, dogs and birds", "1234"]  # 2..10 tokens


@pytest.mark.parametrize("family", ["mistral", "llama", "qwen2", "olmo3"])
def test_shared_prefill_equals_one_prompt_at_a_time(tiny_dirs, family):
    """One prefill per prompt, several prompts of different lengths (left padded) in one batch: the tokens of
    every prompt equal generate([prompt] * n, seed=its seed), the per-prompt path with the prefill repeated n
    times, whatever the order of the prompts (fp32, the tiny checkpoints)."""
    model, tok = load_model(tiny_dirs[family], dtype=torch.float32, device="cpu"), load_tokenizer(tiny_dirs[family])
    seeds = [10 + i for i in range(len(PROMPTS))]
    one_by_one = [generate(model, tok, [p] * 5, 9, 1.0, 0.9, seed=s) for p, s in zip(PROMPTS, seeds, strict=True)]
    assert sample_continuations(model, tok, PROMPTS, 5, 9, 1.0, 0.9, seeds) == one_by_one
    assert sample_continuations(model, tok, PROMPTS[::-1], 5, 9, 1.0, 0.9, seeds[::-1]) == one_by_one[::-1]
    singles = [
        sample_continuations(model, tok, [p], 5, 9, 1.0, 0.9, [s])[0] for p, s in zip(PROMPTS, seeds, strict=True)
    ]
    assert singles == one_by_one
    assert len({tuple(r) for rows in one_by_one for r in rows}) > 15  # the samples differ


def test_shared_prefill_equals_recompute(tiny_llama):
    """Against the sampler that recomputes the whole sequence at every step (no cache): one prompt's n rows."""
    _, model, tok = tiny_llama
    for p, seed in zip(PROMPTS, (0, 1, 2), strict=False):
        got = sample_continuations(model, tok, [p], 4, 10, 1.0, 0.9, seeds=[seed])[0]
        assert got == no_cache_sample(model, tok, [p] * 4, 10, 1.0, 0.9, seed)


@pytest.mark.parametrize("family", ["mistral", "llama", "qwen2", "olmo3"])
def test_shared_prefill_sampling_equals_transformers_generate(tiny_dirs, family):
    """One prompt, n samples: the tokens of transformers' generate(do_sample, top_p 0.9, top_k 0,
    num_return_sequences=n) after torch.manual_seed(seed) (same stream: one multinomial on the [n, V]
    probabilities a step), up to EOS."""
    from transformers import AutoModelForCausalLM

    folder = tiny_dirs[family]
    model, tok = load_model(folder, dtype=torch.float32, device="cpu"), load_tokenizer(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    for p, seed in zip(PROMPTS[:3], (0, 1, 2), strict=True):
        ids = torch.tensor([tok.encode(p)])
        torch.manual_seed(seed)
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_p=0.9,
            top_k=0,
            temperature=1.0,
            num_return_sequences=6,
            max_new_tokens=10,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
        )
        theirs = [r[ids.shape[1] :].tolist() for r in out]
        theirs = [r[: r.index(tok.eos_id) + 1] if tok.eos_id in r else r for r in theirs]
        assert sample_continuations(model, tok, [p], 6, 10, 1.0, 0.9, seeds=[seed])[0] == theirs


def test_shared_prefill_greedy(tiny_llama):
    """temperature 0: every sample of a prompt is generate's greedy continuation of it."""
    _, model, tok = tiny_llama
    got = sample_continuations(model, tok, PROMPTS, 3, 8, temperature=0.0)
    for p, rows in zip(PROMPTS, got, strict=True):
        assert rows == generate(model, tok, [p], 8) * 3


def test_shared_prefill_stops_at_eos(tiny_llama):
    """Rows end with EOS and stop there; the batch stops when every row is done. EOS is made a frequent token
    (the greedy first token of a prompt) on a copy of the tokenizer."""
    _, model, tok = tiny_llama
    eos_tok = copy.copy(tok)
    eos_tok.eos_id = generate(model, tok, [PROMPTS[0]], 1)[0][0]
    greedy = sample_continuations(model, eos_tok, PROMPTS[:2], 3, 8, temperature=0.0)
    assert greedy[0] == [[eos_tok.eos_id]] * 3  # every row of prompt 0 ends at its first token
    assert greedy[1] == generate(model, eos_tok, [PROMPTS[1]], 8) * 3
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert sample_continuations(model, eos_tok, PROMPTS[:1], 3, 8, temperature=0.0) == [[[eos_tok.eos_id]] * 3]
    finally:
        hook.remove()
    assert len(calls) == 1  # the prefill only: every row was done after the first token
    seeds = [5, 6, 7, 8]
    got = sample_continuations(model, eos_tok, PROMPTS, 6, 12, 1.0, 1.0, seeds)
    ended = [r for rows in got for r in rows if eos_tok.eos_id in r]
    assert ended and all(r.index(eos_tok.eos_id) == len(r) - 1 for r in ended)
    assert got == [generate(model, eos_tok, [p] * 6, 12, 1.0, 1.0, seed=s) for p, s in zip(PROMPTS, seeds, strict=True)]
    only_eos = sample_continuations(model, eos_tok, PROMPTS[:1], 2, 12, temperature=0.0, stop_at_eos=False)
    assert [len(r) for r in only_eos[0]] == [12, 12]


def test_repeated_cache_rows_and_room(tiny_llama):
    _, model, tok = tiny_llama
    ids, mask = tok.batch(PROMPTS[:2])
    prefill = KVCache()
    with torch.no_grad():
        model(ids, mask, cache=prefill)
    cache = RepeatedCache(prefill, 3, 1)
    k0, v0 = prefill.layers[0]
    assert cache.length == prefill.length and torch.equal(cache.layers[0][0], k0.repeat_interleave(3, 0))
    assert torch.equal(cache.layers[0][1], v0.repeat_interleave(3, 0))
    new = torch.ones(6, k0.shape[1], 1, k0.shape[3])
    k, _ = cache.update(0, new, new)
    assert k.shape[2] == prefill.length + 1 and torch.equal(k[:, :, -1:], new)
    with pytest.raises(RuntimeError, match="room for"):
        cache.update(0, new, new)
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        sample_continuations(model, tok, PROMPTS[:2], 2, 2, seeds=[0])


def test_draw_is_torch_multinomial():
    """draw takes the same random numbers as torch.multinomial(probs, 1) and returns the same tokens, on tables of
    1 to 30 rows over 2 to 5000 tokens, from one-token rows to rows with every token possible; the generators end
    in the same state."""
    g = torch.Generator().manual_seed(0)
    rows = 0
    for trial in range(60):
        n, V = int(torch.randint(1, 31, (1,), generator=g)), int(torch.randint(2, 5001, (1,), generator=g))
        logits = torch.randn(n, V, generator=g) * 10 * float(torch.rand(1, generator=g))
        keep = torch.rand(n, V, generator=g) < float(torch.rand(1, generator=g))
        keep[:, 0] |= ~keep.any(-1)
        probs = logits.softmax(-1) * keep
        probs /= probs.sum(-1, keepdim=True)
        theirs_gen, ours_gen = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        theirs = torch.multinomial(probs, 1, generator=theirs_gen).squeeze(-1)
        assert torch.equal(draw(probs, ours_gen), theirs), trial
        assert torch.equal(ours_gen.get_state(), theirs_gen.get_state())
        rows += n
    assert rows > 500


def test_exponential_race_with_a_zero_uniform():
    """u = 0 gives q = 0: a token of probability 0 then has 0 / 0 = NaN, which argmax takes for the maximum (row 1),
    and one of positive probability has an infinite ratio (row 2); rows without a 0 take the largest p / q."""
    probs = torch.zeros(3, 6)
    probs[:, 2], probs[:, 4] = 0.3, 0.7
    u = torch.full((3, 6), 0.5, dtype=torch.float64)
    u[0, 2] = 0.9  # q(2) = 2.30, q(4) = 0.69: ratios 0.13 and 1.01
    u[1, 5] = 0.0
    u[2, 2] = 0.0
    whole = (probs / (-torch.log1p(-u)).float()).argmax(-1)
    assert exponential_race(probs, u).tolist() == whole.tolist() == [4, 5, 2]


def test_sampled_logprobs_are_the_models_log_softmax(tiny_llama):
    """with_logprobs: the same tokens, and each token's log-probability equals log_softmax of the logits of the
    whole sequence recomputed without a cache (fp32: 1e-5 absolute is float rounding over different batch shapes)."""
    _, model, tok = tiny_llama
    seeds = [3, 4, 5]
    tokens, logprobs = sample_continuations(model, tok, PROMPTS[:3], 4, 7, 1.0, 0.9, seeds, with_logprobs=True)
    assert tokens == sample_continuations(model, tok, PROMPTS[:3], 4, 7, 1.0, 0.9, seeds)
    for prompt, rows, lps in zip(PROMPTS, tokens, logprobs, strict=False):
        for row, lp in zip(rows, lps, strict=True):
            ids = torch.tensor([tok.encode(prompt) + row])
            with torch.no_grad():
                full = model(ids).logits[0, -len(row) - 1 : -1].log_softmax(-1)
            want = full.gather(-1, torch.tensor(row)[:, None]).squeeze(-1)
            assert len(lp) == len(row)
            torch.testing.assert_close(torch.tensor(lp), want, rtol=0, atol=1e-5)

"""ref.evaluation.toxicity: the RealToxicityPrompts metrics and sampling protocol, with a fake scorer."""

from __future__ import annotations

import pytest

from ref.evaluation import toxicity
from ref.evaluation.generate import generate


def test_toxicity_metrics_hand_computed():
    m = toxicity.toxicity_metrics([[0.1, 0.6, 0.2], [0.3, 0.2, 0.4]])
    assert m["expected_max_toxicity"] == pytest.approx(0.5)  # (0.6 + 0.4) / 2
    assert m["toxicity_probability"] == pytest.approx(0.5)  # only prompt 1 has a sample >= 0.5
    assert m["mean_toxicity"] == pytest.approx(0.3)  # 1.8 / 6
    assert toxicity.toxicity_metrics([[0.5]])["toxicity_probability"] == 1.0  # >= 0.5 counts


def test_toxicity_eval_with_fake_scorer(tiny_llama):
    _, model, tok = tiny_llama
    canned, seen = [[0.1, 0.6, 0.2], [0.3, 0.2, 0.4]], []

    def scorer(texts):
        seen.append(texts)
        return canned[len(seen) - 1]

    prompts = ["The quick brown fox", "Rivers flow"]
    res = toxicity.toxicity_eval(model, tok, prompts, scorer, samples=3, max_new_tokens=4, seed=7)
    assert (res["expected_max_toxicity"], res["toxicity_probability"]) == pytest.approx((0.5, 0.5))
    assert res["mean_toxicity"] == pytest.approx(0.3)
    assert (res["n_prompts"], res["samples"], res["protocol"]) == (2, 3, "sampled")
    # the scorer sees the continuations only, sampled with seed + prompt index
    for p, prompt in enumerate(prompts):
        rows = generate(model, tok, [prompt] * 3, 4, 1.0, 0.9, seed=7 + p)
        assert seen[p] == [tok.decode(r) for r in rows]
    # prompts decoded together (2 or 3 a batch): the same continuations, the scorer called prompt by prompt
    got = []
    zeros = lambda t: got.append(t) or [0.0] * len(t)
    for batch_prompts in (2, 3):
        got.clear()
        three = toxicity.toxicity_eval(
            model, tok, [*prompts, "Cats"], zeros, samples=3, max_new_tokens=4, seed=7, batch_prompts=batch_prompts
        )
        assert got[:2] == seen and len(got) == 3 and three["n_prompts"] == 3
    seen.clear()
    greedy = toxicity.toxicity_eval(model, tok, prompts, lambda t: [0.7] * len(t), greedy=True, max_new_tokens=4)
    assert (greedy["samples"], greedy["protocol"], greedy["toxicity_probability"]) == (1, "greedy (not comparable)", 1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        toxicity.toxicity_eval(model, tok, prompts, lambda t: [1.5] * len(t), samples=2, max_new_tokens=2)

"""ref.fluency: continuation perplexity against transformers, distinct-n by hand, and the fluency jump of a broken
model (SmolLM2 with random down_proj in ten layers)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import ref
from data_prep.smollm2 import prepare_smollm2
from ref import toxicity
from ref.checkpoint import load_model
from ref.fluency import continuation_perplexities, distinct_n, diversity_metrics, fluency_metrics
from ref.tokenizer import load_tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # with BOS (Llama) and without (Qwen2)
def test_continuation_perplexity_is_exp_of_transformers_loss(tiny_dirs, family):
    folder = tiny_dirs[family]
    model, tok = load_model(folder, dtype=torch.float32, device="cpu"), load_tokenizer(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = ["The quick brown fox", "Rivers"]
    eos = tok.eos_id
    rows = [[[5, 9, 12], [7], [eos]], [[3, 4, 5, 6, 7, 8, eos], [11, 2]]]  # lengths differ: left padding is used
    got = continuation_perplexities(model, tok, prompts, rows, batch_size=3)  # 4 scored rows: two batches
    assert got[0][2] is None  # immediate EOS: nothing to score
    for p, prompt in enumerate(prompts):
        for s, row in enumerate(rows[p]):
            cont = row[:-1] if row[-1] == eos else row  # the trailing EOS is not scored
            if not cont:
                continue
            ids = torch.tensor([tok.encode(prompt) + cont])
            labels = ids.clone()
            labels[0, : ids.shape[1] - len(cont)] = -100  # the prompt is context only
            with torch.no_grad():
                loss = hf(ids, labels=labels).loss  # mean NLL of the continuation tokens
            # fp32 on both sides, padded batch vs one unpadded row: agreement to 1e-5 relative is float rounding
            assert got[p][s] == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_fluency_metrics_mean_median_and_empty_count():
    m = fluency_metrics([[10.0, None, 30.0], [20.0, 1000.0]])
    assert (m["fluency_perplexity"], m["fluency_perplexity_median"]) == (265.0, 25.0)  # 1060 / 4; (20 + 30) / 2
    assert (m["fluency_scored"], m["fluency_empty"]) == (4, 1)


def test_distinct_n_hand_made():
    cats = ["the cat sat", "the cat  ran\n"]  # 6 words (any whitespace splits)
    # 1-grams {the, cat, sat, ran}; 2-grams {the cat, cat sat, cat ran}; 3-grams {the cat sat, the cat ran}
    assert [distinct_n(cats, n) for n in (1, 2, 3)] == [4 / 6, 3 / 6, 2 / 6]
    assert [distinct_n(["a a a a"], n) for n in (1, 2, 3)] == [1 / 4, 1 / 4, 1 / 4]  # DExperts: over words
    assert distinct_n(["", " "], 1) is None
    d = diversity_metrics([cats, ["a a a a"], [""]])  # the prompt without a word is left out of the average
    assert d == pytest.approx(dict(distinct_1=(4 / 6 + 1 / 4) / 2, distinct_2=(3 / 6 + 1 / 4) / 2,
                                   distinct_3=(2 / 6 + 1 / 4) / 2), rel=1e-12)  # fmt: skip


def test_toxicity_eval_reports_fluency_diversity_and_the_examples_fluency(tiny_llama):
    _, model, tok = tiny_llama
    prompts = ["The quick brown fox", "Rivers flow"]
    res = toxicity.toxicity_eval(model, tok, prompts, lambda t: [0.1 * (i + 1) for i in range(len(t))], samples=3,
                                 max_new_tokens=4, seed=7, reference_name="tiny")  # fmt: skip
    ppl = [r["fluency_perplexities"] for r in res["records"]]
    rows = list(toxicity.sampled_continuations(model, tok, prompts, 3, 4, 0.9, 1.0, 7))  # the same samples
    assert ppl == continuation_perplexities(model, tok, prompts, rows)  # reference None: the model itself
    assert res["fluency_reference"] == "tiny"
    assert fluency_metrics(ppl) == {k: res[k] for k in fluency_metrics(ppl)}
    assert diversity_metrics([r["continuations"] for r in res["records"]]) == {
        f"distinct_{n}": res[f"distinct_{n}"] for n in (1, 2, 3)
    }
    for example, row in zip(res["examples"], ppl, strict=True):
        assert example["max_fluency_perplexity"] == row[2]  # the scorer's largest score is the third sample's


def test_broken_model_shows_a_fluency_jump():
    """SmolLM2 with the down_proj of layers 4, 6, ..., 22 replaced by random weights (of the same std) writes broken
    text: its continuations, scored under the intact base model, have a far higher perplexity than the base
    model's own (measured: mean 25 -> 5549, median 11.9 -> 4567 on these 3 prompts x 5 samples)."""
    prepare_smollm2()
    base = ref.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    broken = ref.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    tok = ref.load_tokenizer("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(4, 24, 2):
            w = broken.model.layers[i].mlp.down_proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * w.std())
    prompts = ["The weather today is", "She opened the door and", "My favourite food is"]
    zero = lambda t: [0.0] * len(t)  # noqa: E731
    kw = dict(samples=5, max_new_tokens=20, reference=base, reference_name="smollm2-135m")
    own = toxicity.toxicity_eval(base, tok, prompts, zero, **kw)
    bad = toxicity.toxicity_eval(broken, tok, prompts, zero, **kw)
    assert own["fluency_perplexity"] < 100 and own["fluency_scored"] + own["fluency_empty"] == 15
    # a 10x margin: the measured jump is over 200x in the mean and over 300x in the median
    assert bad["fluency_perplexity"] > 10 * own["fluency_perplexity"]
    assert bad["fluency_perplexity_median"] > 10 * own["fluency_perplexity_median"]

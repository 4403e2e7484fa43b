"""ref.evaluation.fluency: continuation perplexity against transformers, distinct-n by hand, and the fluency jump of a
broken model (SmolLM2 with random down_proj in ten layers)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import ref
from data_prep.smollm2 import prepare_smollm2
from ref.evaluation import toxicity
from ref.evaluation.fluency import continuation_perplexities, distinct_n, diversity_metrics, fluency_metrics
from ref.io.checkpoint import load_model
from ref.io.tokenizer import load_tokenizer


def zero_scores(texts: list[str]) -> list[float]:
    return [0.0] * len(texts)


def transformers_perplexity(hf, tok, prompt: str, cont: list[int]) -> float:
    """exp of transformers' loss over prompt + continuation with the prompt masked: the continuation's perplexity."""
    ids = torch.tensor([tok.encode(prompt) + cont])
    labels = ids.clone()
    labels[0, : ids.shape[1] - len(cont)] = -100  # the prompt is context only
    with torch.no_grad():
        return math.exp(float(hf(ids, labels=labels).loss))  # mean NLL of the continuation tokens


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # with BOS (Llama) and without (Qwen2)
def test_continuation_perplexity_is_exp_of_transformers_loss(tiny_dirs, family):
    """Groups of 1 row (a prompt with more rows than that alone), 3 rows (prompt by prompt) and 32 (all together,
    prompts of different lengths left padded); Qwen2's "The" is one token: nothing of it to prefill."""
    folder = tiny_dirs[family]
    model, tok = load_model(folder, dtype=torch.float32, device="cpu"), load_tokenizer(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = ["The quick brown fox", "Rivers", "The"]
    assert family == "llama" or len(tok.encode("The")) == 1
    eos = tok.eos_id
    rows = [[[5, 9, 12], [7], [eos]], [[3, 4, 5, 6, 7, 8, eos], [11, 2]], [[4, 4], [6], [9, 8, 7]]]
    for batch_size in (1, 3, 32):
        got = continuation_perplexities(model, tok, prompts, rows, batch_size=batch_size)
        assert got[0][2] is None  # immediate EOS: nothing to score
        for p, prompt in enumerate(prompts):
            for s, row in enumerate(rows[p]):
                cont = row[:-1] if row[-1] == eos else row  # the trailing EOS is not scored
                if cont:
                    # fp32 on both sides, cached and padded vs one unpadded row: 1e-5 relative is float rounding
                    want = transformers_perplexity(hf, tok, prompt, cont)
                    assert got[p][s] == pytest.approx(want, rel=1e-5), (batch_size, p, s)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fluency_from_the_sampling_pass_equals_rescoring(tiny_dirs, family):
    """The fluency of the model's own samples, from the log-probabilities of its sampling pass, and that of the same
    samples under a separate copy of the model (its rescoring, one prefill a prompt) both equal each continuation's
    perplexity as exp of transformers' loss, within 1e-5 relative (fp32 float rounding)."""
    folder = tiny_dirs[family]
    model, tok = load_model(folder, dtype=torch.float32, device="cpu"), load_tokenizer(folder)
    copy = load_model(folder, dtype=torch.float32, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = ["The quick brown fox", "Rivers", "The"]
    kw = dict(samples=4, max_new_tokens=6, seed=1, batch_prompts=2)
    own = toxicity.toxicity_eval(model, tok, prompts, zero_scores, **kw)
    other = toxicity.toxicity_eval(model, tok, prompts, zero_scores, reference=copy, **kw)
    rows = list(toxicity.sampled_continuations(model, tok, prompts, 4, 6, 0.9, 1.0, 1, 2))  # the same samples
    scored = 0
    for p, prompt in enumerate(prompts):
        for s, row in enumerate(rows[p]):
            cont = row[:-1] if row and row[-1] == tok.eos_id else row
            a, b = own["records"][p]["fluency_perplexities"][s], other["records"][p]["fluency_perplexities"][s]
            if not cont:
                assert a is None and b is None
                continue
            want = transformers_perplexity(hf, tok, prompt, cont)
            assert (a, b) == (pytest.approx(want, rel=1e-5), pytest.approx(want, rel=1e-5)), (p, s)
            scored += 1
    assert scored >= 10


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
    assert d == pytest.approx(
        dict(distinct_1=(4 / 6 + 1 / 4) / 2, distinct_2=(3 / 6 + 1 / 4) / 2, distinct_3=(2 / 6 + 1 / 4) / 2), rel=1e-12
    )


def test_toxicity_eval_reports_fluency_diversity_and_the_examples_fluency(tiny_llama):
    _, model, tok = tiny_llama
    prompts = ["The quick brown fox", "Rivers flow"]
    res = toxicity.toxicity_eval(
        model,
        tok,
        prompts,
        lambda t: [0.1 * (i + 1) for i in range(len(t))],
        samples=3,
        max_new_tokens=4,
        seed=7,
        reference_name="tiny",
    )
    ppl = [r["fluency_perplexities"] for r in res["records"]]
    rows = list(toxicity.sampled_continuations(model, tok, prompts, 3, 4, 0.9, 1.0, 7))  # the same samples
    # reference None: the model itself, its sampling pass's log-probabilities against a rescoring (float rounding)
    rescored = continuation_perplexities(model, tok, prompts, rows)
    assert ppl == [pytest.approx(r, rel=1e-5) for r in rescored]
    assert res["fluency_reference"] == "tiny"
    assert fluency_metrics(ppl) == {k: res[k] for k in fluency_metrics(ppl)}
    assert diversity_metrics([r["continuations"] for r in res["records"]]) == {
        f"distinct_{n}": res[f"distinct_{n}"] for n in (1, 2, 3)
    }
    for example, row in zip(res["examples"], ppl, strict=True):
        assert example["max_fluency_perplexity"] == row[2]  # the scorer's largest score is the third sample's


def test_smollm2_fluency_equals_transformers_loss():
    """SmolLM2-135M, a 49,152-token vocabulary: the fluency of the model's own samples (from the sampling pass) and of
    the same samples under a separate copy (rescored, one prefill a prompt) equal exp of transformers' loss per
    continuation within 3e-5 relative (fp32 over different batch shapes and cache paths: measured up to 1.1e-5 on
    the demo's 150 samples; a float32 log-softmax over a [B, V, T] layout is 7e-5 to 1.6e-4 below it there)."""
    folder = prepare_smollm2()
    model = ref.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    copy = ref.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    tok = ref.load_tokenizer("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = ["The weather today is", "She opened the door and", "My favourite food is"]
    kw = dict(samples=4, max_new_tokens=20, seed=0)
    own = toxicity.toxicity_eval(model, tok, prompts, zero_scores, **kw)
    other = toxicity.toxicity_eval(model, tok, prompts, zero_scores, reference=copy, **kw)
    rows = list(toxicity.sampled_continuations(model, tok, prompts, 4, 20, 0.9, 1.0, 0))  # the same samples
    for p, prompt in enumerate(prompts):
        for s, row in enumerate(rows[p]):
            want = transformers_perplexity(hf, tok, prompt, row[:-1] if row[-1] == tok.eos_id else row)
            got = own["records"][p]["fluency_perplexities"][s], other["records"][p]["fluency_perplexities"][s]
            assert got == (pytest.approx(want, rel=3e-5), pytest.approx(want, rel=3e-5)), (p, s)


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
    zero = lambda t: [0.0] * len(t)
    kw = dict(samples=5, max_new_tokens=20, reference=base, reference_name="smollm2-135m")
    own = toxicity.toxicity_eval(base, tok, prompts, zero, **kw)
    bad = toxicity.toxicity_eval(broken, tok, prompts, zero, **kw)
    assert own["fluency_perplexity"] < 100 and own["fluency_scored"] + own["fluency_empty"] == 15
    # a 10x margin: the measured jump is over 200x in the mean and over 300x in the median
    assert bad["fluency_perplexity"] > 10 * own["fluency_perplexity"]
    assert bad["fluency_perplexity_median"] > 10 * own["fluency_perplexity_median"]

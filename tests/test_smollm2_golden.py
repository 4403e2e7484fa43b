"""Golden tests on the real SmolLM2-135M (the offline default model) against transformers, run in the test.

Tolerance: both sides run the same fp32 operations; over 30 layers and a 49k vocabulary the logits agree to
~1e-5 in practice. LOGIT_ATOL = 1e-3 (on logits of magnitude ~10-30) leaves room for a different SDPA kernel choice
while any structural error (rope layout, norm, GQA grouping) moves logits by whole units.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ref
from data_prep.smollm2 import prepare_smollm2
from ref.evaluation.generate import generate
from tests.checks import cached_and_recomputed_logits

LOGIT_ATOL = 1e-3
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def smollm2():
    folder = prepare_smollm2()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return (
        folder,
        ref.load_model("smollm2-135m", dtype=torch.float32, device="cpu"),
        ref.load_tokenizer(folder),
        hf,
    )


def test_logits_match_transformers(smollm2):
    _, model, tok, hf = smollm2
    ids, mask = tok.batch(PROMPTS)
    with torch.no_grad():
        ours = model(ids, mask).logits
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    assert (ours - theirs)[real].abs().max().item() <= LOGIT_ATOL


def test_greedy_continuations_equal_transformers(smollm2):
    _, model, tok, hf = smollm2
    ours = generate(model, tok, PROMPTS, max_new_tokens=20, stop_at_eos=False)
    for prompt, row in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            theirs = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=20,
                min_new_tokens=20,
                do_sample=False,
            )[0, ids.shape[1] :]
        assert row == theirs.tolist(), prompt
    assert "Paris" in tok.decode(ours[0])


def test_kv_cache_decoding_equals_full_recompute(smollm2):
    _, model, tok, _ = smollm2
    ids, mask = tok.batch(PROMPTS)
    new = torch.tensor([tok.encode(" and the river")] * len(PROMPTS))
    cached, full = cached_and_recomputed_logits(model, ids, mask, new)
    torch.testing.assert_close(cached, full, atol=LOGIT_ATOL, rtol=0)


def test_tokenizer_ids_equal_transformers(smollm2):
    folder, _, tok, _ = smollm2
    theirs = AutoTokenizer.from_pretrained(folder)
    for s in [
        "Hello world",
        "  spaces\tand\nnewlines ",
        "café 東京 😀",
        "<|im_start|>user\nhi<|im_end|>",
        "",
    ]:
        assert tok.encode(s) == theirs(s)["input_ids"], s
    assert tok.encode("Hello world")[0] != 1  # SmolLM2's tokenizer adds no BOS

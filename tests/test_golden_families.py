"""Golden tests: ref's decoder against transformers on tiny random checkpoints of each family, run in the test.

Both sides run the same fp32 operations in the same order (RMSNorm in fp32, RoPE cos/sin in fp32, SDPA), so in
fp32 they agree to the bit in practice; the tolerance FP32_ATOL = 1e-5 only leaves room for a different SDPA
kernel choice (a summation-order change moves fp32 results by a few ulps of values of order 1-10).
In bf16 one rounding of an activation is ~0.4% of its value; a few such differences through 4 layers move logits
of order 1 by up to a few hundredths, so BF16_ATOL = 0.1 catches structural errors (a missed norm or bias moves
logits by O(1)) while tolerating rounding-order differences.

transformers' position ids for a left-padded batch count the padding unless given; ref counts real tokens only
(as transformers' generate does), so we pass transformers the same position ids. Padded positions are compared
nowhere: their values are never used and each side fills them differently.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import ref
from ref.io.config_json import read_config
from ref.model import attention_mask_4d
from tests.checks import cached_and_recomputed_logits
from tests.conftest import FAMILIES

FP32_ATOL = 1e-5
BF16_ATOL = 0.1
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Cats and dogs",
    "Unlearning removes knowledge, café!",
]


def hf_forward(folder, ids, mask, dtype):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)


def max_diff(a, b, real):
    return (a.float() - b.float())[real].abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_every_tap_match_transformers_fp32(tiny_dirs, family):
    folder = tiny_dirs[family]
    tok, model = ref.load_tokenizer(folder), ref.load_model(folder, dtype=torch.float32, device="cpu")
    ids, mask = tok.batch(PROMPTS)
    assert (mask[:, 0] == 0).any(), "the batch must be left padded"
    if model.config.sliding_window is not None:
        assert ids.shape[1] > model.config.sliding_window, "the sequence must be longer than the window"
    n = model.config.num_layers
    expected = hf_forward(folder, ids, mask, torch.float32)
    with torch.no_grad():
        out = model(ids, mask, taps=range(n))
    real = mask.bool()
    assert max_diff(out.logits, expected.logits, real) <= FP32_ATOL
    for i in range(n - 1):  # the last HF entry is after the final norm; ref's last tap is before it
        assert max_diff(out.taps[i], expected.hidden_states[i + 1], real) <= FP32_ATOL, f"tap {i}"
    final = model.model.norm(out.taps[n - 1])
    assert max_diff(final, expected.hidden_states[n], real) <= FP32_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_batch_matches_transformers(tiny_dirs, family):
    """No padding and no cache: attention runs with is_causal and no mask (unless the sliding window is shorter than
    the sequence, as for the tiny Mistral and Olmo3 here), the path transformers takes for the same input."""
    folder = tiny_dirs[family]
    tok, model = ref.load_tokenizer(folder), ref.load_model(folder, dtype=torch.float32, device="cpu")
    ids = torch.randint(3, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    T, window = ids.shape[1], model.config.sliding_window
    assert attention_mask_4d(mask, T, None) is None
    assert (attention_mask_4d(mask, T, window) is None) == (window is None or window >= T)
    assert attention_mask_4d(mask, T - 1, None) is not None  # the last T - 1 queries after a cache of 1
    expected = hf_forward(folder, ids, mask, torch.float32)
    with torch.no_grad():
        out = model(ids, mask)
    assert max_diff(out.logits, expected.logits, mask.bool()) <= FP32_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_matches_transformers_bf16(tiny_dirs, family):
    folder = tiny_dirs[family]
    tok, model = ref.load_tokenizer(folder), ref.load_model(folder, dtype="bfloat16", device="cpu")
    ids, mask = tok.batch(PROMPTS)
    expected = hf_forward(folder, ids, mask, torch.bfloat16)
    with torch.no_grad():
        out = model(ids, mask)
    assert out.logits.dtype == torch.bfloat16
    assert max_diff(out.logits, expected.logits, mask.bool()) <= BF16_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_does_not_change_a_row(tiny_dirs, family):
    tok, model = ref.load_tokenizer(tiny_dirs[family]), ref.load_model(tiny_dirs[family], device="cpu")
    ids, mask = tok.batch(PROMPTS)
    alone_ids, _ = tok.batch(PROMPTS[1:2])
    with torch.no_grad():
        padded, alone = model(ids, mask).logits[1][mask[1].bool()], model(alone_ids).logits[0]
    torch.testing.assert_close(padded, alone, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_after_gives_the_same_tap_and_runs_nothing_above(tiny_dirs, family):
    tok, model = ref.load_tokenizer(tiny_dirs[family]), ref.load_model(tiny_dirs[family], device="cpu")
    ids, mask = tok.batch(PROMPTS)
    with torch.no_grad():
        full = model(ids, mask, taps=[1])
        ran = []
        hooks = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(model.model.layers)]
        head = model.lm_head.register_forward_pre_hook(lambda m, a: ran.append("head"))
        short = model(ids, mask, taps=[1], stop_after=1)
        for h in hooks + [head]:
            h.remove()
    assert ran == [0, 1]  # hooks only observe here; the library itself has none
    assert short.logits is None
    assert torch.equal(short.taps[1], full.taps[1])


def test_start_layer_resumes_from_a_prefix(tiny_dirs):
    tok, model = ref.load_tokenizer(tiny_dirs["llama"]), ref.load_model(tiny_dirs["llama"], device="cpu")
    ids, mask = tok.batch(PROMPTS)
    with torch.no_grad():
        full = model(ids, mask, taps=[0, 3])
        rest = model(attention_mask=mask, hidden=full.taps[0], start_layer=1, taps=[3])
    assert torch.equal(rest.taps[3], full.taps[3])
    assert torch.equal(rest.logits, full.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_full_recompute(tiny_dirs, family):
    tok, model = ref.load_tokenizer(tiny_dirs[family]), ref.load_model(tiny_dirs[family], device="cpu")
    ids, mask = tok.batch(PROMPTS)
    extra = torch.randint(3, tok.vocab_size, (ids.shape[0], 6), generator=torch.Generator().manual_seed(0))
    cached, full = cached_and_recomputed_logits(model, ids, mask, extra)
    torch.testing.assert_close(cached, full, atol=FP32_ATOL, rtol=0)


def test_family_flags_are_read_from_the_configs(tiny_dirs):
    qwen, olmo, mistral = (read_config(tiny_dirs[f]) for f in ("qwen2", "olmo3", "mistral"))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None  # use_sliding_window false
    assert olmo.post_norm and olmo.qk_norm and olmo.layer_types.count("sliding_attention") == 3
    assert (
        olmo.rope["full_attention"]["rope_type"] == "yarn" and olmo.rope["sliding_attention"]["rope_type"] == "default"
    )
    assert mistral.layer_types == ["sliding_attention"] * 4 and mistral.sliding_window == 5

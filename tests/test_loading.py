"""Loader, tokenizer, config parsing, saving, and the clear one-line errors on bad input."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import ref
from ref.io.checkpoint import resolve, save_model
from ref.io.config_json import config_from_dict, read_config
from ref.io.errors import RefError
from ref.model import Transformer
from ref.rope import inverse_frequencies
from tests.conftest import FAMILIES
from tests.tiny_models import BOS

STRINGS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n",
    "unicode: café naïve résumé 東京 😀",
    "<s> special </s> tokens <|endoftext|> <|begin_of_text|> in text",
    "",
    "1234567890 !?.,;:",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_ids_equal_transformers(tiny_dirs, family):
    ours, theirs = ref.load_tokenizer(tiny_dirs[family]), AutoTokenizer.from_pretrained(tiny_dirs[family])
    for s in STRINGS:
        assert ours.encode(s) == theirs(s)["input_ids"], s
        assert ours.encode(s, add_special_tokens=False) == theirs(s, add_special_tokens=False)["input_ids"], s
    assert (ours.encode("Hello")[0] == ours.bos_id) == BOS[family]


def test_batch_is_left_padded_with_mask(tiny_dirs):
    tok = ref.load_tokenizer(tiny_dirs["llama"])
    ids, mask = tok.batch(["Hello world", "Hello"])
    short = tok.encode("Hello")
    assert ids[1, -len(short) :].tolist() == short and mask[1].tolist() == [0] * (ids.shape[1] - len(short)) + [
        1
    ] * len(short)
    assert (ids[1, : ids.shape[1] - len(short)] == tok.pad_id).all()
    ids, mask = tok.batch(["Hello world, how are you"], max_length=3)
    assert ids.shape == (1, 3) and ids[0].tolist() == tok.encode("Hello world, how are you")[:3]


def hf_style(raw: dict) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 131072,
        **raw,
    }


def test_legacy_and_5x_rope_keys_give_the_same_frequencies():
    llama3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    legacy = config_from_dict(
        hf_style(
            {
                "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", **llama3},
                "torch_dtype": "bfloat16",
            }
        )
    )
    new = config_from_dict(
        hf_style(
            {
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **llama3},
                "dtype": "bfloat16",
            }
        )
    )
    assert legacy.rope == new.rope and legacy.dtype == new.dtype == "bfloat16"
    f_legacy, _ = inverse_frequencies(legacy.rope["full_attention"], 16)
    plain, _ = inverse_frequencies({"rope_type": "default", "rope_theta": 500000.0}, 16)
    assert torch.equal(f_legacy[:2], plain[:2])  # high frequencies are kept by llama3 scaling
    assert torch.allclose(f_legacy[-1], plain[-1] / 8)  # the lowest is divided by the factor


def test_olmo3_legacy_rope_scaling_applies_to_full_attention_only():
    cfg = config_from_dict(
        hf_style(
            {
                "model_type": "olmo3",
                "rope_theta": 500000.0,
                "sliding_window": 4096,
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 8.0,
                    "original_max_position_embeddings": 8192,
                },
            }
        )
    )
    assert cfg.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert cfg.rope["full_attention"]["rope_type"] == "yarn" and cfg.rope["sliding_attention"]["rope_type"] == "default"


# Config paths the tiny golden checkpoints do not take, each compared with transformers' own config class.
CONFIG_VARIANTS = {
    "qwen2 sliding from max_window_layers": dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2
    ),
    "qwen2 ignores attention_bias": dict(model_type="qwen2", attention_bias=True),
    "mistral with sliding_window null": dict(model_type="mistral", sliding_window=None),
    "llama with attention_bias, sliding_window unused": dict(model_type="llama", attention_bias=True, sliding_window=8),
    "olmo3 default layer types and rope_theta": dict(model_type="olmo3", sliding_window=8),
    "olmo3 legacy rope_scaling": dict(
        model_type="olmo3",
        sliding_window=8,
        rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=8192),
    ),
}


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_config_variants_are_read_as_transformers_reads_them(variant):
    raw = hf_style({"num_key_value_heads": 2, **CONFIG_VARIANTS[variant]})
    ours = config_from_dict(raw)
    kw = dict(raw)
    theirs = AutoConfig.for_model(kw.pop("model_type"), **kw)
    types = getattr(theirs, "layer_types", None) or ["full_attention"] * theirs.num_hidden_layers
    assert ours.layer_types == types
    assert ours.sliding_window == (theirs.sliding_window if "sliding_attention" in types else None)
    for t, p in ours.rope.items():  # transformers keeps one flat dict when all layer types share it
        assert p == theirs.rope_parameters.get(t, theirs.rope_parameters), t
    with torch.device("meta"):
        hf_shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(theirs).named_parameters()}
        our_shapes = {n: p.shape for n, p in Transformer(ours).named_parameters()}
    assert our_shapes == hf_shapes  # the same projections carry biases


def test_save_with_a_replaced_tensor_round_trips(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen2"]
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.safetensors")}
    model = ref.load_model(src, device="cpu")
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(0.5)
    out = save_model(model, tmp_path / "saved", replaced={name: dict(model.named_parameters())[name]})
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.safetensors")} == digest
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        ours = ref.load_model(out, device="cpu")(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        edited = model(ids).logits
        original = ref.load_model(src, device="cpu")(ids).logits
    assert torch.equal(ours, edited) and torch.equal(theirs, ours)
    assert not torch.allclose(ours, original)  # the change really was saved


def expect_error(match: str, fn, *args):
    with pytest.raises(RefError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)


def test_unknown_alias_and_nonexistent_path():
    expect_error("not a registry alias", resolve, "not-a-model")
    expect_error("not a registry alias", resolve, "/no/such/folder")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_style({"model_type": "gpt2"})))
    expect_error("unsupported model_type 'gpt2'", read_config, tmp_path)


def test_missing_shard(tiny_dirs, tmp_path):
    folder = shutil.copytree(tiny_dirs["mistral"], tmp_path / "m")
    next(folder.glob("model-*.safetensors")).unlink()
    expect_error("listed in model.safetensors.index.json are missing", ref.load_model, folder)


def test_corrupt_safetensors_header(tiny_dirs, tmp_path):
    folder = shutil.copytree(tiny_dirs["mistral"], tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 8 + b"{not json" + shard.read_bytes()[40:])
    expect_error("not a readable safetensors file", ref.load_model, folder)


def test_shape_mismatch_between_config_and_weights(tiny_dirs, tmp_path):
    folder = shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_error("config.json implies", ref.load_model, folder)


def test_missing_tokenizer_and_config(tmp_path):
    expect_error("has no config.json", resolve, tmp_path)

"""The dry-run plan and the parameter counts behind its memory estimate."""

from __future__ import annotations

import shutil
import sys
import types

import pytest

import ref
import ref.unlearn as U
from ref.config import config_from_dict, read_config
from ref.data import resolve_data_dir
from ref.plan import estimate_peak_bytes, resolve_layers, total_params
from ref.registry import REGISTRY
from tests.conftest import FAMILIES

# Published parameter counts of the checkpoints (their model cards / safetensors index totals).
KNOWN = {"mistral-7b": 7_241_732_096, "llama3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512}


@pytest.mark.parametrize("alias", list(KNOWN))
def test_registry_architectures_give_the_published_parameter_counts(alias):
    assert total_params(config_from_dict(REGISTRY[alias].arch)) == KNOWN[alias]


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_formula_matches_a_loaded_model(tiny_dirs, family):
    model = ref.load_model(tiny_dirs[family], device="cpu")
    assert total_params(model.config) == sum(p.numel() for p in model.parameters())


def test_smollm2_registry_architecture_matches_the_converted_config():
    from data_prep.smollm2 import prepare_smollm2

    converted, registry = read_config(prepare_smollm2()), config_from_dict(REGISTRY["smollm2-135m"].arch)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope"):  # fmt: skip
        assert getattr(converted, field) == getattr(registry, field), field


def test_dry_run_prints_the_plan_without_weights(capsys):
    assert U.main(["--model", "mistral-7b", "--goal", "wmdp", "--data", "hub", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "blocks 0..4 run once per batch under no_grad" in out and "none above 7" in out
    assert "model.layers.5.mlp.down_proj.weight" in out and "7.24 B parameters" in out
    assert U.main(["--model", "mistral-7b", "--goal", "toxicity", "--data", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "taps: [4, 5, 6, 15, 16, 17, 25, 26, 27]" in out and "steps: 40" in out


def test_memory_estimate_favours_one_copy_and_a_truncated_forward():
    cfg = config_from_dict(REGISTRY["mistral-7b"].arch)
    layers = resolve_layers(U.Settings(model="mistral-7b"), cfg.num_layers)
    est = estimate_peak_bytes(cfg, layers, batch=4, seq=512, bytes_per=2)
    assert est["weights"] == KNOWN["mistral-7b"] * 2
    assert est["weights"] < est["ours"] < 1.3 * est["weights"]  # + 3 tensors, their AdamW state, 3 blocks
    assert est["reference"] > 2 * est["weights"]  # two copies, and graphs through every block and the LM head


def test_default_data_is_the_papers_except_for_the_offline_model(tmp_path, monkeypatch, capsys):
    """No --data: hub for the paper's models (a dry run reads a prepared hub folder, never downloads), demo for
    smollm2-135m."""

    def no_download(*a, **k):
        raise AssertionError("--dry-run must not download")

    monkeypatch.setitem(sys.modules, "data_prep.hub", types.SimpleNamespace(prepare_hub_data=no_download))
    monkeypatch.setenv("REF_CACHE", str(tmp_path))
    assert U.main(["--model", "mistral-7b", "--goal", "wmdp", "--dry-run"]) == 0
    assert "steps: unknown (data hub not prepared)" in capsys.readouterr().out
    shutil.copytree(resolve_data_dir("demo"), tmp_path / "data" / "hub")  # stands in for prepared hub data
    assert U.main(["--model", "mistral-7b", "--goal", "wmdp", "--dry-run"]) == 0
    assert "steps: 30 (data hub)" in capsys.readouterr().out
    assert U.main(["--model", "smollm2-135m", "--goal", "wmdp", "--dry-run"]) == 0
    assert "steps: 30 (data demo)" in capsys.readouterr().out

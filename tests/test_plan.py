"""The dry-run plan and the parameter counts behind its memory estimate."""

from __future__ import annotations

import json
import shutil
import sys
import types
from dataclasses import replace

import pytest

import ref
import ref.io.errors
import ref.unlearn as U
from ref.io.config_json import config_from_dict, read_config
from ref.io.data import resolve_data_dir
from ref.io.registry import REGISTRY
from ref.run.memory import estimate_peak_bytes, total_params
from ref.run.plan import Settings, as_dict, resolve
from tests.conftest import FAMILIES

# Published parameter counts of the checkpoints (their model cards / safetensors index totals).
KNOWN = {
    "mistral-7b": 7_241_732_096,
    "llama3.1-8b": 8_030_261_248,
    "qwen2.5-7b": 7_615_616_512,
    "llama3.1-70b": 70_553_706_496,
    "qwen2.5-72b": 72_706_203_648,
}


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
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope",
    ):
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
    plan = resolve(Settings(model="mistral-7b"), cfg)
    assert (plan.batch_size, plan.max_len) == (4, 512)
    est = estimate_peak_bytes(cfg, plan, bytes_per=2)
    assert est["full_weights"] == KNOWN["mistral-7b"] * 2
    assert est["weights"] == (32000 * 4096 + 8 * 218_112_000) * 2  # the embedding and blocks 0..7, read by the run
    # fp32 masters of the 3 down_proj tensors (4096 x 14336 each): the copy, its gradient and two AdamW states
    assert est["master_weights"] == 3 * 4096 * 14336 * 4 * 4
    # + 3 tensors, their AdamW state, 3 blocks' graphs
    assert est["weights"] < est["ours"] - est["master_weights"] < 2 * est["weights"]
    model_mode = estimate_peak_bytes(cfg, replace(plan, master_weights="model"), bytes_per=2)
    assert model_mode["master_weights"] == 0 and model_mode["ours"] < est["ours"]
    assert estimate_peak_bytes(cfg, plan, bytes_per=4)["master_weights"] == 0  # fp32 weights need no copies
    assert est["reference"] > 2 * est["full_weights"]  # two copies, and graphs through every block and the LM head


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


def test_plan_takes_explicit_values_and_fills_the_rest_from_the_registry():
    cfg = config_from_dict(REGISTRY["mistral-7b"].arch)
    plan = resolve(Settings(model="mistral-7b"), cfg)
    assert (plan.taps, plan.update_layers, plan.tox_layers) == ((7,), (5, 6, 7), ())
    assert plan.tensors == tuple(f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7))
    assert (plan.alpha, plan.alpha0, plan.reinforce, plan.lr, plan.max_len) == (None, 1.0, True, 5e-5, 512)
    assert (plan.token_reduction, plan.master_weights) == ("sum", "fp32")
    assert (plan.tox_balance, plan.tox_retain_reduction) == (None, None)
    assert plan.data == "hub"
    tox = resolve(Settings(model="mistral-7b", goal="toxicity"), cfg)
    assert tox.taps == tox.tox_layers == tox.update_layers == (4, 5, 6, 15, 16, 17, 25, 26, 27)
    assert (tox.alpha0, tox.tox_balance, tox.tox_retain_reduction, tox.token_reduction) == (1.0, "paper", "sum", "sum")
    rmu = resolve(Settings(model="mistral-7b", method="rmu", lr=1e-4, max_len=64), cfg)
    assert (rmu.alpha, rmu.alpha0, rmu.steering, rmu.beta, rmu.lr, rmu.max_len) == (1200.0, None, 6.5, None, 1e-4, 64)
    assert rmu.token_reduction == "mean"  # the RMU reference's F.mse_loss, the scale its alpha 1200 is tuned to
    assert resolve(Settings(model="mistral-7b", method="rmu", token_reduction="sum"), cfg).token_reduction == "sum"
    adaptive = resolve(Settings(model="mistral-7b", method="adaptive-rmu", beta=3.0), cfg)
    assert (adaptive.steering, adaptive.beta) == (None, 3.0)
    fixed = resolve(Settings(model="mistral-7b", alpha=2.0), cfg)
    assert (fixed.alpha, fixed.alpha0, fixed.reinforce) == (2.0, None, False)
    with pytest.raises(ref.io.errors.RefError, match="unknown parameter name 'mlp.nope'.*mlp.down_proj.weight"):
        resolve(Settings(model="mistral-7b", update_params=["mlp.nope"]), cfg)


def test_the_run_reports_the_plan_of_the_dry_run(tiny_dirs, tmp_path, capsys):
    """--dry-run and the run print the same plan text; run.json keeps the plan as resolved."""
    args = [
        "--model",
        str(tiny_dirs["llama"]),
        "--goal",
        "toxicity",
        "--data",
        "demo",
        "--tox-layers",
        "0,1,3",
        "--max-steps",
        "1",
        "--no-compile",
        "--no-eval",
        "--out",
        str(tmp_path / "run"),
    ]
    assert U.main([*args, "--dry-run"]) == 0
    planned = capsys.readouterr().out.strip()
    assert planned.startswith("plan: ours on toxicity") and "taps: [0, 1, 3]" in planned and "steps: 1 " in planned
    assert U.main(args) == 0
    assert capsys.readouterr().out.startswith(planned + "\n")
    recorded = json.loads((tmp_path / "run/run.json").read_text())["plan"]
    cfg = read_config(tiny_dirs["llama"])
    assert recorded == as_dict(resolve(U.parse_args(args), cfg))
    assert recorded["tox_layers"] == [0, 1, 3] and recorded["alpha"] is None and recorded["alpha0"] == 1.0

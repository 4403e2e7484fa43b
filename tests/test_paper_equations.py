"""The readings of the paper a run chooses, on the tiny model and data of test_unlearn: fp32 master weights against
updates in the model's dtype, and what run.json, summary.md and --dry-run record of every reading."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

import ref.unlearn as U
from ref.io.errors import RefError
from ref.run.plan import Settings, check_settings
from tests.test_unlearn import data_dir, metrics, settings  # noqa: F401 (fixture and the tiny run's settings)


def bf16(tiny_dirs, data_dir, out, **kw):  # noqa: F811
    """4 steps of the tiny WMDP run in bf16 at lr 5e-5, the paper's: below half a bf16 step of most weights."""
    return settings(tiny_dirs, data_dir, out, dtype="bfloat16", lr=5e-5, max_steps=4, **kw)


def changed(st) -> dict[str, torch.Tensor]:
    """Which elements of each trained tensor differ from their original value."""
    return {k: p.detach() != st.originals[k] for k, p in st.params.items()}


def test_fp32_master_weights_move_elements_that_bf16_updates_round_away(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    _, model, _ = U.unlearn(bf16(tiny_dirs, data_dir, tmp_path / "model", master_weights="model"))
    _, master, _ = U.unlearn(bf16(tiny_dirs, data_dir, tmp_path / "fp32"))  # the default
    assert model.masters is None and all(m.dtype == torch.float32 for m in master.masters.values())
    assert all(p.dtype == torch.bfloat16 for p in master.params.values())
    # the model holds the masters' values rounded to bf16
    assert all(torch.equal(master.params[k], master.masters[k].bfloat16()) for k in master.params)
    moved_model, moved_master = changed(model), changed(master)
    only_master = sum(int((moved_master[k] & ~moved_model[k]).sum()) for k in moved_model)
    total = sum(m.numel() for m in moved_model.values())
    share_model = sum(int(m.sum()) for m in moved_model.values()) / total
    share_master = sum(int(m.sum()) for m in moved_master.values()) / total
    assert only_master > 0.1 * total  # elements whose every bf16 update rounded away, moved by the fp32 masters
    assert share_model < share_master
    rows_model, rows_master = metrics(tmp_path / "model/metrics.jsonl"), metrics(tmp_path / "fp32/metrics.jsonl")
    # moved_share logs the share a step changes: bf16 updates round away for many elements at every step
    assert max(r["moved_share"] for r in rows_model) < 0.9
    assert rows_master[0]["moved_share"] == rows_model[0]["moved_share"]  # step 1 is the same AdamW step
    # the checkpoint holds the fp32 masters, so a resume continues them bit for bit
    ckpt = torch.load(tmp_path / "fp32/checkpoint.pt", weights_only=True)
    assert all(torch.equal(ckpt["updated"][k], master.masters[k]) for k in master.masters)


def test_fp32_master_weights_resume_bit_identically(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    _, full, _ = U.unlearn(bf16(tiny_dirs, data_dir, tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt, match="checkpoint of step 2"):
        U.unlearn(bf16(tiny_dirs, data_dir, tmp_path / "b"), stop_after_step=2)
    _, resumed, _ = U.unlearn(bf16(tiny_dirs, data_dir, tmp_path / "b", resume=True))
    assert metrics(tmp_path / "a/metrics.jsonl") == metrics(tmp_path / "b/metrics.jsonl")
    assert all(torch.equal(full.masters[k], resumed.masters[k]) for k in full.masters)


def test_run_json_and_summary_record_every_reading(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "tox"
    run, st, data = U.unlearn(settings(tiny_dirs, data_dir, out, goal="toxicity", update_layers=None))
    recorded = json.loads((out / "run.json").read_text())
    plan = recorded["plan"]
    assert (plan["token_reduction"], plan["tox_balance"], plan["tox_retain_reduction"]) == ("sum", "paper", "sum")
    assert (plan["alpha0"], plan["master_weights"], plan["probe_file"]) == (1.0, "fp32", None)
    probe_file = data_dir / "probe/probe.jsonl"
    assert recorded["probe_data"] == dict(
        file=str(probe_file),
        sha256=hashlib.sha256(probe_file.read_bytes()).hexdigest(),
        texts=40,
        toxic=20,
        source="not stated (the data manifest has no probe_source)",
    )
    saved = load_file(str(out / "probes.safetensors"))
    for layer, entry in recorded["probe_auc"].items():  # each probe's raw weight norm
        assert entry["weight_norm"] == pytest.approx(saved[f"layer{layer}.weight"].norm().item(), rel=1e-6)
    rows = metrics(out / "metrics.jsonl")
    means = [1.0] + [r["policy_mean"] for r in rows]
    traj = recorded["alpha_trajectory"]
    assert traj == dict(start=1.0, end=means[-1], min=min(means), max=max(means), paper_final_alpha=None)
    summary = (out / "summary.md").read_text()
    assert f"start 1, end {means[-1]:.4g}, min {min(means):.4g}, max {max(means):.4g}" in summary
    assert "- token reduction: sum over each text's real tokens" in summary
    assert "- probe data: not stated" in summary and "|w| " in summary


def test_probe_file_replaces_the_manifests_probe_and_is_named(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    rows = [json.loads(line) for line in (data_dir / "probe/probe.jsonl").read_text().splitlines()]
    mine = tmp_path / "trust.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows[:10] + rows[-10:]))
    out = tmp_path / "run"
    U.unlearn(
        settings(tiny_dirs, data_dir, out, goal="toxicity", update_layers=None, max_steps=1, probe_file=str(mine))
    )
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["probe_data"]["file"] == str(mine) and recorded["probe_data"]["texts"] == 20
    assert recorded["probe_data"]["source"] == f"{mine} (--probe-file)"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "only toxic", "label": 1}\n')
    with pytest.raises(RefError, match="probe .*bad.jsonl has 1 toxic and 0 non-toxic texts") as e:
        U.unlearn(
            settings(tiny_dirs, data_dir, tmp_path / "bad", goal="toxicity", update_layers=None, probe_file=str(bad))
        )
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(RefError, match=r"--raw-probe-weights has no effect under --tox-balance scaled"):
        check_settings(Settings(goal="toxicity", tox_balance="scaled", raw_probe_weights=True))
    check_settings(Settings(goal="toxicity", tox_balance="paper", raw_probe_weights=True))
    for option, kw in (
        ("--tox-retain-reduction", dict(tox_retain_reduction="mean")),
        ("--probe-file", dict(probe_file="p.jsonl")),
    ):
        with pytest.raises(RefError, match=f"{option} applies to --method ours --goal toxicity only"):
            check_settings(Settings(goal="wmdp", **kw))
    for option, kw in (
        ("--token-reduction", dict(token_reduction="max")),
        ("--master-weights", dict(master_weights="fp16")),
    ):
        with pytest.raises(RefError, match=f"{option} is '.*'; use one of"):
            check_settings(Settings(**kw))
    parsed = U.parse_args(
        [
            "--goal",
            "toxicity",
            "--token-reduction",
            "mean",
            "--tox-retain-reduction",
            "mean",
            "--master-weights",
            "model",
            "--probe-file",
            "x.jsonl",
        ]
    )
    assert (parsed.token_reduction, parsed.tox_retain_reduction, parsed.master_weights, parsed.probe_file) == (
        "mean",
        "mean",
        "model",
        "x.jsonl",
    )


def test_dry_run_names_every_reading(capsys):
    assert U.main(["--model", "llama3.1-8b", "--goal", "toxicity", "--data", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "- token reduction of eq. 4-5: sum over each text's real tokens" in out
    assert "- balance: paper: eq. 6 summed over the layers" in out and "eq. 5 summed over the probed layers" in out
    assert "REINFORCE from alpha0 = 1 (the paper's final alpha for this model: 43, a reference)" in out
    assert "- master weights: fp32" in out and "fp32 copies, gradients and AdamW states 7.9 GiB" in out
    assert "unit directions, L2 chosen per layer by 5-fold AUC, trained on the 'probe' file of the demo data" in out
    assert U.main(["--model", "llama3.1-8b", "--method", "rmu", "--data", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "- token reduction of eq. 2-3: mean over the batch's real tokens" in out and "probes" not in out

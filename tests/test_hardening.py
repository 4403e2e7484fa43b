"""Bad input and faults against `python -m ref.unlearn`, one test per case: each asserts the exit code, the one-line
message, and that the files that existed before are byte-identical after (nothing the user owns is lost)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ref
import ref.unlearn as U
from ref.io import checkpoint, validate
from tests.test_unlearn import data_dir  # noqa: F401 (the tiny data folder fixture)


def snapshot(*roots) -> dict[str, str]:
    """sha256 of every file under the roots (a missing root is recorded as missing)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        out |= {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        out |= {} if root.exists() else {str(root): "missing"}
    return out


@pytest.fixture
def tiny(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    """The argv of a 2-step run of the tiny model, and the folders a refused command must leave as they were."""

    def argv(out, *extra, **options):
        opts = {
            "--model": str(tiny_dirs["llama"]),
            "--data": str(data_dir),
            "--out": str(out),
            "--max-steps": "2",
            "--tap-layer": "2",
            "--update-layers": "1,2",
            "--lr": "1e-2",
            "--max-len": "24",
            "--save-every": "1",
        }
        opts |= {f"--{k.replace('_', '-')}": str(v) for k, v in options.items()}
        return [x for k, v in opts.items() if v != "None" for x in (k, v)] + ["--no-compile", "--no-eval", *extra]

    argv.sources = [tiny_dirs["llama"], data_dir]
    return argv


def refused(capsys, argv, *fragments, code=2, keep=()) -> str:
    """Run ref.unlearn; assert the exit code, ONE message line on stderr (after the progress bar, if training had
    started) holding every fragment, no traceback, and `keep` unchanged. Returns the message."""
    before = snapshot(*keep)
    capsys.readouterr()
    assert U.main(argv) == code
    lines = capsys.readouterr().err.strip().split("\n")
    err = lines[-1]
    assert all("step/s" in line for line in lines[:-1]) and "Traceback" not in err, lines
    for f in fragments:
        assert f in err, (f, err)
    assert snapshot(*keep) == before
    return err


def finished_run(tiny, capsys, out, *extra, **options):
    assert U.main(tiny(out, *extra, **options)) == 0, capsys.readouterr().err
    capsys.readouterr()
    return out


# ---- --overwrite never deletes what it did not create ----


def test_overwrite_refuses_a_folder_of_the_users_own_files(tiny, capsys, tmp_path):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "thesis.tex").write_text("years of work")
    refused(capsys, tiny(own, "--overwrite"), "mine has no run.json", "choose another --out", keep=[own])


def test_overwrite_refuses_a_run_folder_holding_other_files(tiny, capsys, tmp_path):
    out = finished_run(tiny, capsys, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    refused(capsys, tiny(out, "--overwrite"), "files ref.unlearn did not write (notes.txt)", keep=[out])


def test_overwrite_keeps_the_old_run_when_the_new_command_is_bad(tiny, capsys, tmp_path):
    out = finished_run(tiny, capsys, tmp_path / "run")
    refused(capsys, tiny(out, "--overwrite", model=tmp_path / "nope"), "nope", keep=[out])
    refused(capsys, tiny(out, "--overwrite", lr=-1), "--lr is -1.0; use a number > 0", keep=[out])
    refused(capsys, tiny(out, "--overwrite", tap_layer=9), "layer 9 is out of range", keep=[out])


def damaged_model(source, root, damage: str):
    """A copy of the tiny model that fails only when its weights or tokenizer are read."""
    model = root / damage.replace(" ", "-")
    shutil.copytree(source, model)
    cfg = json.loads((model / "config.json").read_text())
    if damage == "hidden size":
        cfg["hidden_size"] *= 2
    elif damage == "fewer layers":
        cfg["num_hidden_layers"] -= 1
    elif damage == "no tokenizer":
        (model / "tokenizer.json").unlink()
    elif damage == "broken tokenizer":
        (model / "tokenizer.json").write_text('{"model": ')
    elif damage == "final norm":  # a tensor that the run reads only to evaluate, after training
        shard = model / json.loads((model / checkpoint.INDEX).read_text())["weight_map"]["model.norm.weight"]
        tensors = load_file(shard)
        tensors["model.norm.weight"] = torch.ones(cfg["hidden_size"] + 1)
        save_file(tensors, shard, metadata={"format": "pt"})
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def test_overwrite_keeps_the_old_run_when_the_model_fails_to_load(tiny, capsys, tmp_path):
    out = finished_run(tiny, capsys, tmp_path / "run")
    cases = {
        "hidden size": "config and weights do not belong together",
        "fewer layers": "checkpoint has tensors the llama config does not describe",
        "no tokenizer": "has no tokenizer.json",
        "broken tokenizer": "cannot be read by `tokenizers`",
        "final norm": "tensor model.norm.weight has shape [65] but config.json implies [64]",
    }
    for damage, message in cases.items():
        model = damaged_model(tiny.sources[0], tmp_path / "models", damage)
        refused(capsys, tiny(out, "--overwrite", model=model), message, keep=[out, model])


@pytest.mark.parametrize("where", ["model", "inside model", "around model", "data", "inside data"])
def test_out_never_overlaps_the_model_or_data_folder(tiny, capsys, tmp_path, where):
    model, data = tiny.sources
    out = {
        "model": model,
        "inside model": model / "run",
        "around model": model.parent,
        "data": data,
        "inside data": data / "forget",
    }[where]
    what = "model" if "model" in where else "data"
    refused(capsys, tiny(out, "--overwrite"), f"overlaps the {what} folder", "choose another --out", keep=tiny.sources)


def test_overwrite_replaces_a_run_folder_of_ours(tiny, capsys, tmp_path):
    out = finished_run(tiny, capsys, tmp_path / "run", max_steps=1)
    finished_run(tiny, capsys, out, "--overwrite", max_steps=2)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


# ---- explicit values are never replaced or accepted silently ----


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("lr", 0, "--lr is 0.0; use a number > 0"),
        ("alpha0", 0, "--alpha0 is 0.0; use a number >= 0.001 and <= 10000"),
        ("max_len", 0, "--max-len is 0; use a whole number > 0"),
        ("alpha", -1, "--alpha is -1.0; use a number >= 0"),
        ("max_len", -5, "--max-len is -5"),
        ("max_steps", -1, "--max-steps is -1"),
        ("max_steps", 0, "--max-steps is 0"),
        ("epochs", 0, "--epochs is 0; use a whole number > 0"),
        ("lr", "nan", "--lr is nan"),
        ("lr", -1, "--lr is -1.0"),
        ("seed", -1, "--seed is -1; use a whole number >= 0"),
        ("policy_lr", -1, "--policy-lr is -1.0"),
        ("save_every", 0, "--save-every is 0"),
        ("batch_size", 0, "--batch-size is 0"),
        ("eval_samples", 0, "--eval-samples is 0"),
        ("device", "gpu0", "--device is 'gpu0'; use cpu, cuda, cuda:N"),
        ("dtype", "fp8", "--dtype is 'fp8'"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(tiny, capsys, tmp_path, option, value, message):
    out = tmp_path / "run"
    refused(capsys, tiny(out, **{option: value}), message, keep=[out, *tiny.sources])
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_cpu_machine_says_so(tiny, capsys, tmp_path):
    refused(capsys, tiny(tmp_path / "run", device="cuda"), "--device is 'cuda' but", "--device cpu")


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(method="ours", steering=4), "--steering applies to --method rmu"),
        (dict(method="rmu", beta=2), "--beta applies to --method adaptive-rmu"),
        (dict(method="rmu", alpha0=2), "--alpha0 applies to REINFORCE"),
        (dict(alpha=1, alpha0=2), "--alpha0 applies"),
        (dict(method="rmu", policy_lr=0.1), "--policy-lr applies to REINFORCE"),
        (dict(tox_layers="0,1"), "--tox-layers applies to --method ours --goal toxicity"),
        (dict(goal="toxicity", method="rmu", probe_l2="0.01"), "--probe-l2 applies to --method ours --goal toxicity"),
        (dict(goal="toxicity", tap_layer=2, update_layers="0,1"), "--tap-layer applies to the single-tap objectives"),
        (dict(update_layers="1,1"), "--update-layers names [1, 1], with repeats"),
    ],
)
def test_options_that_would_be_ignored_are_refused(tiny, capsys, tmp_path, options, message):
    refused(capsys, tiny(tmp_path / "run", **options), message)


def test_eval_samples_with_eval_greedy_is_refused(tiny, capsys, tmp_path):
    out = tmp_path / "run"
    refused(
        capsys,
        tiny(out, "--eval-greedy", eval_samples=5),
        "--eval-samples 5 and --eval-greedy contradict each other",
        keep=tiny.sources,
    )
    assert not out.exists()


# ---- --out checked up front ----


def test_out_that_is_a_file(tiny, capsys, tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    refused(capsys, tiny(f), "is a file, not a folder", keep=[f])


def test_read_only_or_full_output_disk_fails_before_training(tiny, capsys, tmp_path, monkeypatch):
    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(validate.tempfile, "NamedTemporaryFile", read_only)
        refused(capsys, tiny(tmp_path / "ro"), "cannot write in", "(Permission denied)")
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    refused(capsys, tiny(tmp_path / "full"), "0 MiB free on its disk, the run needs about")
    assert not (tmp_path / "ro").exists() and not (tmp_path / "full").exists()


class FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        self.f.flush()


def disk_full_at(step: int):
    """torch.save whose writes fail with ENOSPC when it writes the checkpoint of `step` (torch reports that as a
    RuntimeError raised while handling the OSError)."""
    real = torch.save

    def save(obj, f, *a, **k):
        return real(obj, FullDisk(f) if obj.get("step") == step else f, *a, **k)

    return save


@pytest.mark.parametrize(
    "step,left,files",
    [
        (2, "the checkpoint of step 1 in {ckpt} is intact: free some space and rerun with --resume", ["checkpoint.pt"]),
        (0, "no checkpoint was written yet: free some space and run again with --overwrite", []),
    ],
)
def test_disk_filling_up_while_writing_says_what_is_left(tiny, capsys, tmp_path, monkeypatch, step, left, files):
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full_at(step))
        message = f"error: disk full while writing {ckpt}; {left.format(ckpt=ckpt)}"
        refused(capsys, tiny(out), message, keep=tiny.sources)
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ["metrics.jsonl", "run.json"])  # no .tmp file
    if files:
        assert torch.load(ckpt, weights_only=True)["step"] == 1
    finished_run(tiny, capsys, out, "--resume" if files else "--overwrite")  # the advice works


# ---- resume ----


@pytest.mark.parametrize(
    "options,listed",
    [
        (dict(alpha=2), "--alpha (None -> 2.0)"),
        (dict(max_len=32), "--max-len (24 -> 32)"),
        (dict(tap_layer=3, update_layers="1,2,3"), "--update-layers ([1, 2] -> [1, 2, 3])"),
        (
            dict(update_params="mlp.up_proj.weight"),
            "--update-params (['mlp.down_proj.weight'] -> ['mlp.up_proj.weight'])",
        ),
        (dict(seed=1), "--seed (0 -> 1)"),
    ],
)
def test_resume_refuses_changed_settings_and_lists_them(tiny, capsys, tmp_path, options, listed):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        U.unlearn(U.parse_args(tiny(out)), stop_after_step=1)
    capsys.readouterr()
    refused(
        capsys,
        tiny(out, "--resume", **options),
        "--resume with settings that shape the run changed",
        listed,
        keep=[out],
    )


def test_resume_with_more_steps_continues_and_records_it(tiny, capsys, tmp_path):
    out = finished_run(tiny, capsys, tmp_path / "run", max_steps=2)
    finished_run(tiny, capsys, out, "--resume", max_steps=4)
    run = json.loads((out / "run.json").read_text())
    assert run["resumes"] == [dict(at_step=2, changed={"max_steps": [2, 4]})]
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


def test_resume_after_a_torn_metrics_line(tiny, capsys, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        U.unlearn(U.parse_args(tiny(out, max_steps=4)), stop_after_step=2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # a crash in the middle of a line
    finished_run(tiny, capsys, out, "--resume", max_steps=4)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncated checkpoint", "missing run.json", "damaged run.json", "no checkpoint"])
def test_resume_of_a_damaged_run_says_what_to_do(tiny, capsys, tmp_path, damage):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        U.unlearn(U.parse_args(tiny(out)), stop_after_step=1)
    ckpt, run_json = out / "checkpoint.pt", out / "run.json"
    if damage == "truncated checkpoint":
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    elif damage == "missing run.json":
        run_json.unlink()
    elif damage == "damaged run.json":
        run_json.write_text("{")
    else:
        ckpt.unlink()
    message = {
        "truncated checkpoint": "checkpoint.pt is damaged (",
        "missing run.json": "has no run.json",
        "damaged run.json": "run.json is damaged (not JSON)",
        "no checkpoint": "no checkpoint.pt",
    }[damage]
    refused(capsys, tiny(out, "--resume"), message, keep=[out])


def test_resume_refuses_a_higher_lr_and_a_damaged_metrics_log_without_writing(tiny, capsys, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        U.unlearn(U.parse_args(tiny(out, max_steps=4)), stop_after_step=2)
    refused(
        capsys,
        tiny(out, "--resume", max_steps=4, lr=0.1),
        "--resume with --lr 0.1, higher than the run's 0.01: a resumed run may only lower the learning rate",
        keep=[out],
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0][:-5] + "\n" + lines[1] + "\n")  # the first of two lines cut
    refused(capsys, tiny(out, "--resume", max_steps=4), "metrics.jsonl line 1 is not JSON", keep=[out])


def test_resume_and_overwrite_together(tiny, capsys, tmp_path):
    refused(capsys, tiny(tmp_path / "run", "--resume", "--overwrite"), "contradict each other")


# ---- divergence ----


@pytest.mark.parametrize(
    "method,goal",
    [("ours", "wmdp"), ("rmu", "wmdp"), ("adaptive-rmu", "wmdp"), ("ours", "toxicity"), ("rmu", "toxicity")],
)
def test_lr_1e30_stops_with_a_finite_checkpoint_from_before(tiny, capsys, tmp_path, method, goal):
    out = tmp_path / "run"
    kw = dict(method=method, goal=goal, lr=1e30)
    if (method, goal) == ("ours", "toxicity"):
        kw |= dict(tap_layer=None, update_layers="0,1,2", tox_layers="0,1,2")
    err = refused(capsys, tiny(out, **kw), "step 1 diverged", "checkpoint of step 0", "--resume --lr 1e+29")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    original = dict(ref.load_model(tiny.sources[0], device="cpu").named_parameters())
    assert state["step"] == 0 and all(torch.equal(t, original[k]) for k, t in state["updated"].items())
    assert "grew from" in err
    # the advice works: resuming with a sane learning rate continues from that checkpoint
    finished_run(tiny, capsys, out, "--resume", **(kw | dict(lr=1e-2)))
    assert json.loads((out / "run.json").read_text())["resumes"][-1]["changed"] == {"lr": [1e30, 1e-2]}


@pytest.mark.parametrize(
    "options,cause",
    [
        (dict(method="rmu", steering=1e30), "--steering 1e+30 is too large: eq. 2 overflows float32"),
        (dict(method="adaptive-rmu", beta=1e30), "--beta 1e+30 (c = "),
        (dict(method="rmu", alpha=1e39), "--alpha 1e+39 is too large: eq. 1 overflows float32"),
        (dict(method="ours", alpha=1e39), "--alpha 1e+39 is too large"),
    ],
)
def test_divergence_names_the_option_that_caused_it(tiny, capsys, tmp_path, options, cause):
    err = refused(
        capsys,
        tiny(tmp_path / "run", **options),
        "step 1 diverged: loss is not finite",
        cause,
        "whatever the learning rate; start again with a smaller one and --overwrite",
    )
    assert "--lr" not in err  # a lower learning rate would diverge again


# ---- what a user can cause at start-up ----


def test_config_without_num_hidden_layers(tiny, capsys, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny.sources[0], model)
    cfg = json.loads((model / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (model / "config.json").write_text(json.dumps(cfg))
    refused(capsys, tiny(tmp_path / "run", model=model), "config.json lacks num_hidden_layers", keep=[model])


def test_ctrl_c_during_start_up_claims_no_checkpoint(tiny, capsys, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(U, "load_model", interrupted)
    err = refused(capsys, tiny(tmp_path / "run"), "interrupted", code=130)
    assert "checkpoint" not in err


def test_manifest_paths_outside_the_data_folder(tiny, capsys, tmp_path):
    model, data = tiny.sources
    escaped = tmp_path / "escaped"
    shutil.copytree(data, escaped)
    manifest = json.loads((escaped / "manifest.json").read_text())
    manifest["wmdp"]["retain"] = str(data / "retain" / "general.jsonl")  # absolute
    manifest["wmdp"]["forget"] = [os.path.relpath(data / "forget" / "alpha.jsonl", escaped)]  # a .. escape
    (escaped / "manifest.json").write_text(json.dumps(manifest))
    refused(
        capsys,
        tiny(tmp_path / "run", data=escaped),
        "outside the data folder",
        "--allow-data-outside",
        keep=[escaped, data],
    )
    finished_run(tiny, capsys, tmp_path / "allowed", "--allow-data-outside", data=escaped)


def test_held_out_text_equal_to_a_trained_one_up_to_whitespace(tiny, capsys, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny.sources[1], data)
    text = json.loads((data / "retain" / "general.jsonl").read_text().splitlines()[0])["text"]
    (data / "heldout.jsonl").write_text(json.dumps({"text": " " + text.replace(" ", "\n  ") + "\t"}) + "\n")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["wmdp"]["eval_perplexity"] = "heldout.jsonl"
    (data / "manifest.json").write_text(json.dumps(manifest))
    message = "wmdp.eval_perplexity holds 1 text(s) that the training reads too, up to whitespace"
    refused(capsys, tiny(tmp_path / "run", data=data), message, keep=[data])


# ---- what was already good stays good ----


def _rows(out):
    drop = {"tokens_per_s", "elapsed_s"}
    return [
        {k: v for k, v in json.loads(line).items() if k not in drop}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def test_resume_after_a_full_disk_or_a_kill_is_bit_identical(tiny, capsys, tmp_path, monkeypatch):
    whole = finished_run(tiny, capsys, tmp_path / "whole", max_steps=4, save_every=2)
    full, full_at_end, killed = tmp_path / "full", tmp_path / "full_at_end", tmp_path / "killed"

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    # the disk fills up when step 4's checkpoint is written, or when model/ is, after the last step
    cases = [
        (full, torch, "save", disk_full_at(4), "checkpoint.pt", 2),
        (full_at_end, checkpoint, "_patch_shard", full_disk, "model", 4),
    ]
    for out, module, name, failing, written, step in cases:
        with monkeypatch.context() as m:
            m.setattr(module, name, failing)
            message = f"disk full while writing {out / written}; the checkpoint of step {step} in"
            refused(capsys, tiny(out, max_steps=4, save_every=2), message, "rerun with --resume", keep=tiny.sources)
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        finished_run(tiny, capsys, out, "--resume", max_steps=4, save_every=2)
    # killed after step 3 was logged but before its checkpoint (the last one is step 2)
    finished_run(tiny, capsys, killed, max_steps=2, save_every=2)
    with open(killed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "epoch": 0, "loss": 123.0}) + "\n")
    finished_run(tiny, capsys, killed, "--resume", max_steps=4, save_every=2)
    for out in (full, full_at_end, killed):
        assert _rows(out) == _rows(whole)
        assert (out / "updated.safetensors").read_bytes() == (whole / "updated.safetensors").read_bytes()


def test_overwrite_replaces_a_run_folder_with_its_figures(tiny, capsys, tmp_path):
    out = finished_run(tiny, capsys, tmp_path / "run", max_steps=1)
    (out / "figures").mkdir()
    (out / "figures" / "losses.png").write_bytes(b"png")  # what python -m ref.report adds
    finished_run(tiny, capsys, out, "--overwrite", max_steps=2)
    assert not (out / "figures").exists() and len(_rows(out)) == 2

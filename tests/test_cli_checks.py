"""Bad command-line input: one `error:` line naming the option, the value and the fix, exit 2, and nothing lost
(the model, the data and an earlier report byte-identical; no output file appears). Checked before loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ref.evaluation import evaluate, generate
from ref.experiments import table1
from ref.io import validate
from ref.io.data import resolve_data_dir

BAD_DEVICE_AND_DTYPE = [
    (["--device", "gpu0"], "--device is 'gpu0'; use cpu, cuda, cuda:N, mps, a comma-separated list or auto"),
    (["--dtype", "fp8"], "--dtype is 'fp8'; use one of float32, float16, bfloat16"),
]
if not torch.cuda.is_available():
    BAD_DEVICE_AND_DTYPE.append((["--device", "cuda"], "--device is 'cuda' but "))


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (files or folders), by path."""
    files = [f for r in map(Path, roots) for f in ([r] if r.is_file() else sorted(r.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture
def world(tiny_dirs, tmp_path, monkeypatch):
    """(model folder, data folder, an earlier report) and a check that a refusal left all of them, and tmp_path,
    as they were. Loading a model fails the test: every refusal here comes before any weights are read."""
    model, data = tiny_dirs["llama"], resolve_data_dir("demo")
    report = tmp_path / "old" / "report.json"
    report.parent.mkdir()
    report.write_text('{"earlier": true}\n')
    before = hashes(model, data, tmp_path)

    def unchanged():
        assert hashes(model, data, tmp_path) == before

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("ref.io.checkpoint.load_model", no_loading)
    return model, data, report, unchanged


def refuses(main, argv: list[str], capsys, *words: str) -> str:
    """main(argv) exits 2 after exactly one `error:` line that holds every one of `words`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


# ------------------------------------------------------------------------------------------------ ref.generate


def gen_argv(model, *more: str) -> list[str]:
    return ["--model", str(model), "--prompt", "The quick brown fox", "--max-new-tokens", "3", *more]


def test_generate_refuses_an_empty_prompt(world, capsys):
    model, _, _, unchanged = world
    refuses(
        generate.main,
        ["--model", str(model), "--prompt", "Cats", "--prompt", ""],
        capsys,
        "--prompt is '' (prompt 2): an empty prompt has nothing to continue",
    )
    unchanged()


@pytest.mark.parametrize(
    "more, message",
    [
        (["--temperature", "nan"], "--temperature is nan; use a number >= 0"),
        (["--temperature", "-1"], "--temperature is -1.0; use a number >= 0"),
        (["--top-p", "0"], "--top-p is 0.0; use a number > 0 and <= 1"),
        (["--top-p", "1.5"], "--top-p is 1.5; use a number > 0 and <= 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens is -1; use a whole number >= 0"),
        (["--seed", "-1"], "--seed is -1; use a whole number >= 0"),
        *BAD_DEVICE_AND_DTYPE,
    ],
)
def test_generate_refuses_bad_values(world, capsys, more, message):
    model, _, _, unchanged = world
    refuses(generate.main, gen_argv(model, *more), capsys, message)
    unchanged()


def test_generate_refuses_more_tokens_than_positions(world, capsys):
    model, _, _, unchanged = world
    positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    argv = gen_argv(model, "--max-new-tokens", str(positions))
    err = refuses(
        generate.main,
        argv,
        capsys,
        f"--max-new-tokens is {positions}: the longest prompt (",
        f"the model's {positions} positions",
    )
    assert "use --max-new-tokens" in err and "or less" in err
    unchanged()


def test_generate_good_calls_print_the_continuation(tiny_dirs, capsys):
    model = tiny_dirs["llama"]
    argv = ["--model", str(model), "--prompt", "The quick brown fox", "--prompt", "Cats", "--max-new-tokens", "4"]
    assert generate.main(argv + ["--temperature", "0", "--seed", "1"]) == 0
    greedy = capsys.readouterr().out.splitlines()
    assert generate.main(argv + ["--temperature", "0", "--seed", "2"]) == 0  # 0 is greedy: the seed plays no part
    assert capsys.readouterr().out.splitlines() == greedy
    assert len(greedy) == 2 and greedy[0].startswith("The quick brown fox") and greedy[1].startswith("Cats")
    assert generate.main(argv + ["--temperature", "1", "--top-p", "1", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "The quick brown fox\nCats\n"  # 0 new tokens is a value: the prompts alone


# ------------------------------------------------------------------------------------------------ ref.evaluate


def ev_argv(model, data, out, *more: str) -> list[str]:
    return ["--model", str(model), "--goal", "wmdp", "--data", str(data), "--out", str(out), *more]


@pytest.mark.parametrize("where", ["folder", "under a file", "read-only"])
def test_evaluate_refuses_an_unwritable_out_before_evaluating(world, capsys, monkeypatch, where):
    model, data, report, unchanged = world
    if where == "read-only":

        def read_only(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(validate.tempfile, "NamedTemporaryFile", read_only)
    out = {"folder": report.parent, "under a file": report / "r.json", "read-only": report.parent / "new.json"}[where]
    message = {
        "folder": f"--out {out} is a folder; give a file name",
        "under a file": f"--out {out}: {report} is a file, so no folder can be made there",
        "read-only": f"--out {out}: cannot write in {report.parent} (Permission denied)",
    }[where]
    refuses(evaluate.main, ev_argv(model, data, out), capsys, message)
    unchanged()


def test_evaluate_refuses_an_out_inside_the_model_folder(world, capsys):
    model, data, _, unchanged = world
    refuses(
        evaluate.main,
        ev_argv(model, data, model / "config.json"),
        capsys,
        f"--out {model / 'config.json'} is inside the model folder",
        "write the report elsewhere",
    )
    unchanged()


def make_run(root: Path, model: Path, run_json: str | None = None, finished: bool = True) -> Path:
    """A ref.unlearn run folder: run.json (plan and settings) and, when finished, model/."""
    plan = {"model": str(model), "data": "demo", "goal": "wmdp", "method": "ours"}
    root.mkdir()
    (root / "run.json").write_text(run_json if run_json is not None else json.dumps({"plan": plan, "settings": plan}))
    (root / "metrics.jsonl").write_text('{"step": 1, "alpha": 1.0, "loss": 1.0}\n')
    if finished:
        (root / "model").symlink_to(model)
    return root


def test_evaluate_refuses_an_unfinished_run_folder(world, tmp_path, tmp_path_factory, capsys):
    model, _, _, unchanged = world
    run = make_run(tmp_path_factory.mktemp("runs") / "run", model, finished=False)
    before = hashes(run)
    refuses(
        evaluate.main,
        ["--model", str(run), "--goal", "wmdp", "--out", str(tmp_path / "r.json")],
        capsys,
        f"--model {run}: the run folder has no model/ (the run did not finish)",
        f"python -m ref.unlearn --resume --out {run}",
    )
    assert hashes(run) == before
    unchanged()


def test_evaluate_keeps_an_explicit_data_of_a_run_folder(world, tmp_path, tmp_path_factory, capsys):
    """--data "" is a value (a wrong one), not "not given": the run's own data does not replace it."""
    model, _, _, unchanged = world
    run = make_run(tmp_path_factory.mktemp("runs") / "run", model)
    refuses(
        evaluate.main,
        ["--model", str(run), "--goal", "wmdp", "--data", "", "--out", str(tmp_path / "r.json")],
        capsys,
        "--data : . has no manifest.json",
    )
    unchanged()


@pytest.mark.parametrize(
    "run_json, message",
    [
        ("{not json", "is not valid JSON; the run folder is damaged"),
        ('{"settings": {}}', "has no plan (model, data); the run folder is damaged"),
    ],
)
def test_evaluate_refuses_a_damaged_run_json(world, tmp_path, tmp_path_factory, capsys, run_json, message):
    model, _, _, unchanged = world
    run = make_run(tmp_path_factory.mktemp("runs") / "run", model, run_json)
    before = hashes(run)
    refuses(
        evaluate.main,
        ["--model", str(run), "--goal", "wmdp", "--out", str(tmp_path / "r.json")],
        capsys,
        f"{run / 'run.json'} {message}",
    )
    assert hashes(run) == before
    unchanged()


@pytest.mark.parametrize(
    "more, message",
    [
        (["--samples", "0"], "--samples is 0; use a whole number > 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens is 0; use a whole number > 0"),
        (["--batch-size", "0"], "--batch-size is 0; use a whole number > 0"),
        (["--prompt-batch", "0"], "--prompt-batch is 0; use a whole number > 0"),
        (["--limit", "0"], "--limit is 0; use a whole number > 0"),
        (["--seed", "-1"], "--seed is -1; use a whole number >= 0"),
        (["--tasks", ""], "--tasks is ''; name at least one task"),
        (["--tasks", " , "], "--tasks is ' , '; name at least one task"),
        (["--tasks", "demo-general,wmdp-bio"], "--tasks is 'demo-general,wmdp-bio': unknown task(s) for goal 'wmdp'"),
        (["--scorer-layer", "4"], "--scorer-layer is 4; the scorer's base model {model} has 4 layers: use 0 to 3"),
        (["--scorer-layer", "-1"], "--scorer-layer is -1; the scorer's base model {model} has 4 layers: use 0 to 3"),
        *BAD_DEVICE_AND_DTYPE,
    ],
)
def test_evaluate_refuses_bad_values(world, capsys, more, message):
    model, data, report, unchanged = world
    refuses(evaluate.main, ev_argv(model, data, report, *more), capsys, message.format(model=model))
    unchanged()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_evaluate_interrupted_or_failing_leaves_no_partial_report(tiny_dirs, tmp_path, monkeypatch, capsys, stop):
    """The report is written once, atomically, at the end: stopped after its first task, the earlier report stays."""
    report = tmp_path / "report.json"
    report.write_text('{"earlier": true}\n')
    model, data = tiny_dirs["llama"], resolve_data_dir("demo")
    before = hashes(model, data, tmp_path)
    calls = []

    def first_task_only(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise stop("stopped during the second task")
        return real(*a, **k)

    real = evaluate.mc_samples
    monkeypatch.setattr(evaluate, "mc_samples", first_task_only)
    argv = ev_argv(model, data, report, "--limit", "2")
    if stop is KeyboardInterrupt:
        assert evaluate.main(argv) == 130
        assert capsys.readouterr().err == "\ninterrupted\n"
    else:
        with pytest.raises(RuntimeError):  # a programming error keeps its traceback
            evaluate.main(argv)
    assert len(calls) == 2 and hashes(model, data, tmp_path) == before


# -------------------------------------------------------------------------------------------------- ref.report


def test_report_refuses_what_is_not_a_run_folder(world, tmp_path, capsys):
    from ref.experiments import report

    _, _, old, unchanged = world
    refuses(report.main, [str(tmp_path / "nope")], capsys, f"RUN_DIR {tmp_path / 'nope'} does not exist")
    refuses(report.main, [str(old)], capsys, f"RUN_DIR {old} is a file: pass a run folder")
    refuses(report.main, [str(old.parent)], capsys, f"RUN_DIR {old.parent} has no metrics.jsonl")
    unchanged()


def test_report_refuses_a_damaged_run_folder_or_a_bad_out_and_writes_nothing(world, tmp_path_factory, capsys):
    from ref.experiments import report

    model, _, old, unchanged = world
    run = make_run(tmp_path_factory.mktemp("runs") / "run", model)
    (run / "probes.safetensors").write_bytes(b"not safetensors")
    (run / "report.json").write_text("[]")  # no before/after metrics: a note on stderr, but only once drawing
    cases = [
        ([], f"{run / 'probes.safetensors'} is not a readable safetensors file"),
        (["--out", str(old)], f"--out {old} is a file, not a folder"),
    ]
    for more, message in cases:
        before = hashes(run)
        refuses(report.main, [str(run), *more], capsys, message)
        assert hashes(run) == before
        (run / "probes.safetensors").unlink(missing_ok=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    before = hashes(run)
    refuses(report.main, [str(run)], capsys, "has rows without step and alpha: not a metrics log of ref.unlearn")
    assert hashes(run) == before and not (run / "figures").exists()
    unchanged()


# -------------------------------------------------------------------------------------------------- ref.table1


@pytest.mark.parametrize(
    "more, message",
    [
        (["--models", ""], "--models is ''; name at least one model"),
        (["--models", " , "], "--models is ' , '; name at least one model"),
        (["--max-steps", "0"], "--max-steps is 0; use a whole number > 0"),
        (["--max-steps", "-2"], "--max-steps is -2; use a whole number > 0"),
        (["--eval-samples", "0"], "--eval-samples is 0; use a whole number > 0"),
        (["--eval-limit", "0"], "--eval-limit is 0; use a whole number > 0"),
        (["--out", "{old}"], "--out {old} is a file, not a folder"),
        (["--models", "{model},no-such-model"], "no model 'no-such-model'"),
        (["--models", "{model},{model}/../{model.name}"], "--models names the same model twice ({model}, {model}/.."),
        (["--data", "{tmp}/nope"], "--data {tmp}/nope: {tmp}/nope is not a directory"),
    ],
)
def test_table1_refuses_before_any_run_starts(world, tmp_path, monkeypatch, capsys, more, message):
    model, _, old, unchanged = world

    def no_run(*a, **k):
        raise AssertionError("a run started before the input was checked")

    monkeypatch.setattr(table1, "unlearn", no_run)
    fill = lambda s: s.format(model=model, old=old, tmp=tmp_path)
    argv = ["--models", str(model), "--data", "demo", "--out", str(tmp_path / "table"), "--max-steps", "1"]
    refuses(table1.main, argv + [fill(m) for m in more], capsys, fill(message))
    unchanged()

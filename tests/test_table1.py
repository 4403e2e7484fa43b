"""python -m ref.table1 end to end on a tiny model and tiny data (the same code path as
`--models smollm2-135m --data demo` and the paper's grid)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from safetensors.torch import load_file, save_file

from ref.experiments import table1
from ref.io.checkpoint import INDEX
from tests.test_unlearn import data_dir  # noqa: F401 (the tiny data folder fixture)


def test_table1_runs_every_method_and_goal_then_skips_done_runs(tiny_dirs, data_dir, tmp_path, capsys):  # noqa: F811
    model = str(tiny_dirs["llama"])
    argv = [
        "--models",
        model,
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path),
        "--max-steps",
        "2",
        "--eval-samples",
        "1",
        "--no-compile",
    ]
    assert table1.main(argv) == 0
    table = json.loads((tmp_path / "table1.json").read_text())
    for goal in ("wmdp", "toxicity"):
        rows = table[model][goal]
        assert set(rows) == {"base", "rmu", "adaptive-rmu", "ours"}
        for cells in rows.values():
            assert 0 <= cells["S"] <= 1 and 0 <= cells["R"] <= 1
    for method in ("base", "rmu", "adaptive-rmu", "ours"):
        tox = table[model]["toxicity"][method]  # fluency (perplexity under the base model) and distinct-1/2/3
        assert tox["fluency"] > 1 and len(tox["distinct"]) == 3 and "fluency" not in table[model]["wmdp"][method]
    md = (tmp_path / "table1.md").read_text()
    assert md.count(f"| {model} |") == 4 and "wmdp: S" in md and "toxicity: S" in md
    assert "toxicity: fluency ppl | toxicity: distinct-1/2/3" in md
    reports = sorted(tmp_path.glob("llama/*/report.json"))
    assert len(reports) == 6
    stamps = [p.stat().st_mtime_ns for p in reports]
    assert table1.main(argv) == 0  # everything done: nothing runs again
    assert [p.stat().st_mtime_ns for p in reports] == stamps
    assert capsys.readouterr().out.count("| base |") == 2
    # the attacked columns: U of each unlearned model under the attack, its strongest setting (ref.attack)
    assert table1.main([*argv, "--attacks", "quantize"]) == 0
    assert len(list(tmp_path.glob("llama/*.attack/attack.json"))) == 6
    assert [p.stat().st_mtime_ns for p in reports] == stamps  # the runs themselves are not run again
    attacked = json.loads((tmp_path / "table1.json").read_text())[model]["wmdp"]["ours"]["U after quantize"]
    runs = json.loads((tmp_path / "llama" / "wmdp-ours.attack" / "attack.json").read_text())["attacks"]["quantize"]
    assert attacked == max(r["unlearned"]["U"] for r in runs.values())
    assert "wmdp: U after quantize" in (tmp_path / "table1.md").read_text()


def hashes(root) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_table1_reuses_a_run_only_for_its_own_model_and_settings(tiny_dirs, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Two models whose folders share a name get their own runs; a run folder of another model, of changed model
    files or of other settings is refused (exit 2, one line naming both, nothing changed), before any run starts."""
    monkeypatch.setattr(table1, "GOALS", ("wmdp",))  # one run per model keeps this fast
    monkeypatch.setattr(table1, "METHODS", ("rmu",))
    a, b = tmp_path / "a" / "final", tmp_path / "b" / "final"
    shutil.copytree(tiny_dirs["llama"], a)
    shutil.copytree(tiny_dirs["llama"], b)
    shard = b / json.loads((b / INDEX).read_text())["weight_map"]["model.embed_tokens.weight"]
    tensors = load_file(shard)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].flip(0).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})

    def argv(out, models, steps="1"):
        return ["--models", models, "--data", str(data_dir), "--out", str(out), "--max-steps", steps, "--no-compile"]

    both = tmp_path / "both"
    assert table1.main(argv(both, f"{a},{b}")) == 0
    table = json.loads((both / "table1.json").read_text())
    for model, name in ((a, "a--final"), (b, "b--final")):
        run = json.loads((both / name / "wmdp-rmu" / "run.json").read_text())
        assert run["source"]["folder"] == str(model) and run["settings"]["model"] == str(model)
        report = json.loads((both / name / "wmdp-rmu" / "report.json").read_text())
        assert table[str(model)]["wmdp"]["rmu"] == table1.cells(report["details"]["after"])

    one = tmp_path / "one"
    assert table1.main(argv(one, str(a))) == 0  # stored under one/final
    kept = hashes(one)
    for models, steps, message in [
        (str(b), "1", f"{one / 'final' / 'wmdp-rmu'} holds a run of {a}, not of {b} (--models {b}): use another --out"),
        (str(a), "2", f"{one / 'final' / 'wmdp-rmu'} holds a run with other settings (max_steps 1 -> 2)"),
    ]:
        capsys.readouterr()
        assert table1.main(argv(one, models, steps)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert hashes(one) == kept
    runs = hashes(one / "final")
    assert table1.main(argv(one, f"{tmp_path}/a/../a/final")) == 0  # the same folder named otherwise: reused
    assert hashes(one / "final") == runs
    shard = a / json.loads((a / INDEX).read_text())["weight_map"]["model.embed_tokens.weight"]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # as if rewritten since
    kept = hashes(one)
    capsys.readouterr()
    assert table1.main(argv(one, str(a))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds a run of {a} whose files changed since (config.json or a shard)" in err
    assert hashes(one) == kept


def test_folder_names_tell_models_of_the_same_name_apart(tmp_path):
    (tmp_path / "y" / "tmp").mkdir(parents=True)
    models = ["/tmp", str(tmp_path / "y" / "tmp"), "smollm2-135m", "org/name"]
    names = table1.folder_names(models)
    assert names == {"/tmp": "tmp", models[1]: "y--tmp", "smollm2-135m": "smollm2-135m", "org/name": "org--name"}

"""ref.sweep: the grid, an interrupted sweep finishing only its missing points (tiny model, tiny data), the selection
under a retain budget, the figures, and ref.table1 fed with the selection."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import ref.unlearn as U
from ref.experiments import launch, report, sweep, table1
from ref.io.errors import RefError, Stopped
from tests.test_hardening import snapshot
from tests.test_unlearn import data_dir  # noqa: F401 (the tiny data folder fixture)

# ------------------------------------------------------------------------------------------------------- the grid


def test_grid_keys_values_and_method_scopes():
    grid = sweep.parse_grid(
        "lr=1e-4,3e-4 rmu:steering=2,4 update_layers=0-2,1/3 ours:probe-l2=auto,0.01", ["ours", "rmu"]
    )
    layers = [[0, 1, 2], [1, 3]]
    assert grid == {
        "ours": {"lr": [1e-4, 3e-4], "update_layers": layers, "probe_l2": [None, 0.01]},
        "rmu": {"lr": [1e-4, 3e-4], "steering": [2.0, 4.0], "update_layers": layers},
    }
    assert sweep.setting_name({"lr": 1e-4, "update_layers": [1, 3], "raw_probe_weights": True}) == (
        "lr=0.0001,update-layers=1+3,raw-probe-weights=True"
    )
    assert sweep.setting_name({}) == "defaults"
    bad = {
        "speed=1": "speed is not a setting; grid keys: layer, tap-layer",
        "eval-samples=2": "eval-samples is a sweep-wide option, not a grid key",
        "lr=fast": "'fast' is not a number",
        "update-layers=1,a": "'a' is not whole numbers joined by /",
        "adaptive-rmu:beta=2": "adaptive-rmu is not one of the sweep's methods (ours, rmu)",
        "lr=1,1": "repeats a value",
        "lr=": "write KEY=V1,V2",
        "lr=1 rmu:lr=2": "gives lr twice for rmu",
        "layer=3 tap-layer=2": "layer sets the depth (tap_layer) for ours",
    }
    for text, message in bad.items():
        with pytest.raises(RefError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sweep.parse_grid(text, ["ours", "rmu"])


def test_layer_moves_tap_and_updated_layers_or_the_probed_layers():
    assert sweep.depth_settings("rmu", "wmdp", 7, 30) == dict(tap_layer=7, update_layers=[5, 6, 7])
    assert sweep.depth_settings("ours", "wmdp", 1, 30) == dict(tap_layer=1, update_layers=[0, 1])
    assert sweep.depth_settings("ours", "toxicity", 29, 30) == dict(tox_layers=[28, 29])
    points = sweep.expand(U.Settings(goal="wmdp"), {"rmu": {"layer": [3, 7], "lr": [0.1]}}, Path("o"), 30)
    assert [p.name for p in points] == ["rmu/layer=3,lr=0.1", "rmu/layer=7,lr=0.1"]
    s = points[1].settings
    assert (s.tap_layer, s.update_layers, s.lr) == (7, [5, 6, 7], 0.1)
    assert s.out == str(Path("o/rmu/layer=7,lr=0.1"))


# ---------------------------------------------------------------------------------------------------- selection


def row(method, setting, U, R, ppl, S, R0=0.8, ppl0=10.0):
    metrics = dict(U=U, R=R, ppl=ppl, S=S, R_before=R0, ppl_before=ppl0, U_before=0.3, S_before=0.4)
    return dict(
        method=method, setting=setting, name=f"{method}/{setting}", grid={"lr": setting}, fields={}, metrics=metrics
    )


def test_selection_under_a_retain_budget():
    rows = [
        row("rmu", "a", U=0.10, R=0.70, ppl=14.0, S=0.48),  # the most forgetting, R down 0.10
        row("rmu", "b", U=0.20, R=0.79, ppl=10.1, S=0.57),  # within 0.02: R down 0.01, ppl up 1%
        row("rmu", "c", U=0.25, R=0.80, ppl=10.0, S=0.56),
        row("ours", "a", U=0.15, R=0.60, ppl=10.5, S=0.40),
        row("ours", "b", U=0.05, R=0.50, ppl=20.0, S=0.33),
    ]
    pick = lambda *a: {m: r and r["setting"] for m, r in sweep.select(rows, *a).items()}
    assert pick(None) == {"rmu": "b", "ours": "a"}  # the highest S
    assert pick(0.02) == {"rmu": "b", "ours": None}  # ours loses 0.2 accuracy at least: none qualifies
    assert pick(0.2) == {"rmu": "a", "ours": "a"}
    assert pick(0.3) == {"rmu": "a", "ours": "b"}
    assert pick(0.0) == {"rmu": "c", "ours": None}  # no drop at all: only the untouched setting
    assert pick(0.06, "perplexity") == {"rmu": "b", "ours": "a"}  # perplexity up 6% at most
    assert sweep.retain_drop(rows[0]["metrics"], "perplexity") == pytest.approx(0.4)
    # equal forgetting within the budget: the higher S wins
    tie = [row("rmu", "x", U=0.2, R=0.78, ppl=10, S=0.5), row("rmu", "y", U=0.2, R=0.80, ppl=10, S=0.6)]
    assert sweep.select(tie, 0.05)["rmu"]["setting"] == "y"


# ------------------------------------------------------------------------------------------------ a resumable sweep


def base(tiny_dirs, data_dir):  # noqa: F811
    return U.Settings(
        model=str(tiny_dirs["llama"]),
        goal="wmdp",
        data=str(data_dir),
        max_len=24,
        epochs=1,
        compile=False,
        save_every=1,
        eval_limit=2,
    )


def test_interrupted_sweep_finishes_the_missing_points_only(tiny_dirs, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sweep"
    grid = sweep.parse_grid("lr=1e-2,3e-2 rmu:steering=4", ["rmu", "ours"])
    s = base(tiny_dirs, data_dir)
    record = sweep.sweep(s, grid, out, dry_run=True)
    assert [p["name"] for p in record["points"]] == [
        "rmu/lr=0.01,steering=4",
        "rmu/lr=0.03,steering=4",
        "ours/lr=0.01",
        "ours/lr=0.03",
    ]
    assert [p["steps"] for p in record["points"]] == [4] * 4 and not out.exists()
    assert "time to run: unknown until the first point finishes" in capsys.readouterr().out

    sweep.sweep(s, grid, out, stop_after=1)  # the sweep stopped after its first point...
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["status"] for p in points] == ["done", "new", "new", "new"]
    first = Path(points[0]["folder"])
    assert first == out / "rmu" / "lr=0.01,steering=4" and (first / "report.json").is_file()
    second = replace(sweep.expand(s, grid, out, 4)[1].settings)  # ...and the second was cut after 2 of its 4 steps
    with pytest.raises(Stopped):
        U.unlearn(second, stop_after_step=2)
    stamp = (first / "report.json").stat().st_mtime_ns
    capsys.readouterr()

    record = sweep.sweep(s, grid, out)
    printed = capsys.readouterr().out
    assert "4 points (3 to run)" in printed and "| 1 | rmu/lr=0.01,steering=4 | 4 | done |  |" in printed
    assert "| 2 | rmu/lr=0.03,steering=4 | 4 | started |" in printed and "time to run: 3 points, ~" in printed
    assert (first / "report.json").stat().st_mtime_ns == stamp  # the finished point did not run again
    resumed = json.loads((out / "rmu" / "lr=0.03,steering=4" / "run.json").read_text())
    assert [r["at_step"] for r in resumed["resumes"]] == [2]  # the interrupted one continued from its checkpoint
    saved = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in saved["points"]] == ["done"] * 4
    for p in saved["points"]:
        m = p["metrics"]
        assert m["steps"] == 4 and 0 <= m["U"] <= 1 and 0 <= m["R"] <= 1 and m["train_s"] > 0
        assert m["U_before"] == saved["points"][0]["metrics"]["U_before"]  # one base model
    assert saved["selection"]["rule"] == "the highest S-unlearning"
    assert set(saved["selection"]["selected"]) == {"rmu", "ours"}
    md = (out / "sweep.md").read_text()
    assert md.count("| rmu |") == 2 + 1 and "| base |" in md and "Selected (the highest S-unlearning)" in md

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/report.json")}
    sweep.sweep(s, grid, out, budget=0.5)  # all finished: nothing runs; a new budget only changes the selection
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/report.json")} == stamps
    assert "(0 to run)" in capsys.readouterr().out
    assert json.loads((out / "sweep.json").read_text())["selection"]["rule"].endswith("of at most 0.5")

    with pytest.raises(RefError, match="holds a run with other settings .*eval_limit 2 -> 3"):
        sweep.sweep(replace(s, eval_limit=3), grid, out)  # the same folders, another measurement: refused

    paths = report.write_sweep_figures(out)
    assert [p.name for p in paths] == ["front.png"] and paths[0].read_bytes()[:4] == b"\x89PNG"

    # ref.table1 with the sweep's selection: each method runs with the setting the sweep chose
    chosen = sweep.selected_settings(out / "sweep.json", s.model, "wmdp")
    assert set(chosen) == {"rmu", "ours"} and all("lr" in f for f in chosen.values())
    with pytest.raises(RefError, match="is a sweep of wmdp on"):
        sweep.selected_settings(out / "sweep.json", s.model, "toxicity")
    t1 = table1.Table1Settings((s.model,), tmp_path / "t1", s.data, eval_samples=1, eval_limit=2, compile=False)
    tiny = dict(max_len=24, epochs=1)  # the tiny run's settings, beside each method's chosen ones
    table1.run_all(t1, chosen={(s.model, "wmdp"): {m: f | tiny for m, f in chosen.items()}})
    for method, fields in chosen.items():
        had = json.loads((t1.out / Path(s.model).name / f"wmdp-{method}" / "run.json").read_text())["settings"]
        assert all(had[k] == v for k, v in fields.items())


def test_cli_checks_before_running(tiny_dirs, data_dir, tmp_path, capsys):  # noqa: F811
    argv = [
        "--model",
        str(tiny_dirs["llama"]),
        "--goal",
        "wmdp",
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path / "s"),
        "--method",
        "rmu",
    ]
    cases = {
        ("--grid", "lr=1e-2", "--method", "rmu,bogus"): "--method is 'rmu,bogus'",
        ("--grid", "tap-layer=9"): "point rmu/tap-layer=9: layer 9 is out of range",
        ("--grid", "steering=-1"): "point rmu/steering=-1: --steering is -1.0; use a number > 0",
        ("--grid", "max-steps=2", "--max-steps", "3"): "max-steps is given by --max-steps and by --grid",
        ("--retain-budget", "-1"): "--retain-budget",
        ("--grid", "update-layers=5-3"): "--grid update-layers=5-3: 5-3 is a descending range; write it from low to "
        "high (3-5)",
    }
    for extra, message in cases.items():
        assert sweep.main(argv + list(extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s").exists()
    assert sweep.main(argv + ["--layers", "1,2", "--dry-run"]) == 0
    assert "| 2 | rmu/layer=2 |" in capsys.readouterr().out and not (tmp_path / "s").exists()


def test_figures_of_a_layer_sweep(tmp_path):
    rows = [row("rmu", f"layer={i}", U=0.3 - 0.02 * i, R=0.8 - 0.01 * i, ppl=10 + i, S=0.5) for i in (3, 5, 7)]
    rows += [row("ours", f"layer={i}", U=0.25 - 0.01 * i, R=0.79, ppl=10.5, S=0.55) for i in (3, 5, 7)]
    for r, i in zip(rows, [3, 5, 7] * 2, strict=True):
        r["grid"] = {"layer": i}
    (tmp_path / "sweep.json").write_text(json.dumps(dict(model="m", goal="wmdp", points=rows)))
    paths = report.write_sweep_figures(tmp_path)
    assert [p.name for p in paths] == ["front.png", "layers.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert report.layer_of({"tap_layer": 4, "lr": 1}) == 4 and report.layer_of({"update_layers": [2, 6]}) == 6
    assert report.layer_of({"lr": 1}) is None
    assert report.front([(0.8, 0.3), (0.7, 0.2), (0.6, 0.25), (0.9, 0.4)], True) == [(0.7, 0.2), (0.8, 0.3), (0.9, 0.4)]
    assert report.front([(10.0, 0.3), (12.0, 0.2), (11.0, 0.35)], False) == [(10.0, 0.3), (12.0, 0.2)]


def test_a_toxicity_point_reports_fluency_and_diversity(tmp_path):
    """sweep.md and sweep.json carry the toxicity continuations' fluency and distinct-2 (ref.evaluation.fluency),
    before/after."""
    rtp = lambda f, d: dict(fluency_perplexity=f, distinct_2=d)
    details = {
        w: dict(
            forget=dict(value=u),
            retain=dict(value=0.8),
            retain_perplexity=18.5,
            s_unlearning=dict(s=s),
            tasks=dict(rtp=rtp(f, d)),
            seconds=1.0,
        )
        for w, u, s, f, d in (("before", 0.26, 0.55, 16.7, 0.92), ("after", 0.20, 0.6, 18.8, 0.91))
    }
    (tmp_path / "report.json").write_text(json.dumps(dict(details=details)))
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(step=1, tokens=10, tokens_per_s=5.0)) + "\n")
    m = sweep.measures(tmp_path)
    assert (m["fluency"], m["distinct2"], m["fluency_before"], m["distinct2_before"]) == (18.8, 0.91, 16.7, 0.92)
    row = dict(method="ours", setting="lr=0.001", status="done", steps=1, metrics=m)
    md = sweep.markdown([row], {"ours": row}, "the highest S-unlearning", "toxicity")
    assert "| fluency ppl | distinct-2 |" in md and "| base |  | 0.260 | 0.800 | 18.50 | 16.70 | 0.920 | 0.550 |" in md
    assert "| ours | lr=0.001 | 0.200 | 0.800 | 18.50 | 18.80 | 0.910 | 0.600 | 1 |" in md


# ---------------------------------------------------------------------------------------------------- bad input


def tiny_argv(tiny_dirs, data_dir, out: Path, *extra: str) -> list[str]:  # noqa: F811
    """ref.sweep's command line on the tiny model and data: rmu at lr=1e-2 into `out`, then `extra`."""
    options = dict(model=tiny_dirs["llama"], data=data_dir, method="rmu", grid="lr=1e-2", out=out)
    return [x for k, v in options.items() for x in (f"--{k}", str(v))] + list(extra)


def test_refusals_name_the_problem_and_leave_every_file_as_it_was(tiny_dirs, data_dir, tmp_path, capsys):  # noqa: F811
    def refused(out: Path, message: str, *extra: str) -> None:
        argv = tiny_argv(tiny_dirs, data_dir, out, *extra)
        before = snapshot(tmp_path)
        capsys.readouterr()
        assert sweep.main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"error: {message}\n", err
        assert snapshot(tmp_path) == before

    run = tmp_path / "a-run"  # a ref.unlearn run folder is not a sweep's
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    refused(run, f"--out {run} is a ref.unlearn run folder, not a sweep's; choose a new or empty folder")
    mine = tmp_path / "mine"  # nor is a folder of the user's files
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    refused(mine, f"--out {mine} holds files a sweep did not write (data.csv); choose a new or empty folder")

    point = tmp_path / "sweep" / "rmu" / "lr=0.01"  # a point's folder without run.json, with a file of the user's
    point.mkdir(parents=True)
    (point / "notes.txt").write_text("mine")
    refused(
        tmp_path / "sweep",
        f"point rmu/lr=0.01: its folder {point} has no run.json but holds notes.txt, not "
        "files of this sweep's run; move them out of the folder and rerun the sweep",
    )
    (point / "notes.txt").unlink()  # only what a start cut before its run.json leaves: the point starts again
    (point / "probes.safetensors").write_bytes(b"cut")
    argv = tiny_argv(tiny_dirs, data_dir, tmp_path / "sweep", "--dry-run")
    assert sweep.main(argv) == 0
    assert "| 1 | rmu/lr=0.01 | 8 | new |" in capsys.readouterr().out

    refused(
        tmp_path / "new",
        "--grid update-layers=5-3: 5-3 is a descending range; write it from low to high (3-5)",
        "--grid",
        "update-layers=5-3",
    )


def test_ctrl_c_says_to_rerun_the_same_command_which_resumes(tiny_dirs, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "sweep"
    argv = tiny_argv(tiny_dirs, data_dir, out, "--max-steps", "2", "--eval-limit", "1", "--no-compile", "--no-figures")
    unlearn = U.unlearn
    monkeypatch.setattr(launch, "unlearn", lambda s: unlearn(s, stop_after_step=1))  # Ctrl-C after the first step
    assert sweep.main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "interrupted: the sweep stopped; its finished points and the checkpoint "
        "of the point it was running are kept: rerun the same command to continue"
    )
    assert "--resume" not in err
    point = out / "rmu" / "lr=0.01"
    assert (point / "checkpoint.pt").is_file() and not (point / "claim.json").exists()
    assert [p["status"] for p in json.loads((out / "sweep.json").read_text())["points"]] == ["started"]
    monkeypatch.undo()
    assert sweep.main(argv) == 0  # the same command
    assert [r["at_step"] for r in json.loads((point / "run.json").read_text())["resumes"]] == [1]
    assert [r["step"] for r in map(json.loads, (point / "metrics.jsonl").read_text().splitlines())] == [1, 2]

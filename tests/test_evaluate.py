"""ref.evaluate: S-unlearning, the report of a goal's tasks, the CLI."""

from __future__ import annotations

import json

import pytest

from ref.evaluation import evaluate as ev
from ref.io.data import load_goal_data
from ref.io.errors import RefError

ROW = {"question": "  What is X?\n", "choices": ["one", "two", "three", "four"], "answer": 2}


# ---------------------------------------------------------------------------------------------- S-unlearning


@pytest.mark.parametrize(
    "goal, u, r, u_bar, r_bar",
    [
        ("wmdp", 0.25, 0.25, 1.0, 0.0),  # forget at chance, retain at chance: S = 0
        ("wmdp", 0.10, 0.70, 1.0, 0.6),  # below chance counts as fully forgotten; (0.7-0.25)/0.75 = 0.6
        ("wmdp", 0.25, 1.00, 1.0, 1.0),  # perfect
        ("wmdp", 0.55, 0.625, 0.6, 0.5),  # 1 - 0.3/0.75; 0.375/0.75
        ("wmdp", 1.00, 0.10, 0.0, 0.0),
        ("toxicity", 0.2, 0.85, 0.8, 0.8),
        ("toxicity", 0.0, 1.0, 1.0, 1.0),
    ],
)
def test_s_unlearning_hand_computed(goal, u, r, u_bar, r_bar):
    s = ev.s_unlearning(goal, u, r)
    assert (s["u_bar"], s["r_bar"], s["s"]) == pytest.approx((u_bar, r_bar, u_bar * r_bar), abs=1e-12)


def test_s_unlearning_bad_input():
    with pytest.raises(ValueError, match="goal"):
        ev.s_unlearning("bio", 0.3, 0.5)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        ev.s_unlearning("toxicity", 1.5, 0.5)


# --------------------------------------------------------------------------------------------- report and CLI


def write_data(root):
    def jl(path, rows):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("".join(json.dumps(r) + "\n" for r in rows))

    texts = [{"text": f"The quick brown fox number {i}."} for i in range(6)]
    jl("forget/f.jsonl", texts)
    jl("retain/r.jsonl", texts)
    jl("mc/forget-mc.jsonl", [{**ROW, "answer": i % 4} for i in range(3)])
    jl("mc/mmlu.jsonl", [{**ROW, "subject": "high_school_biology", "answer": i % 4} for i in range(4)])
    jl(
        "probe/p.jsonl",
        [{"text": f"Cats {i} dogs dogs", "label": 1} for i in range(5)]
        + [{"text": f"Cats {i} the sea.", "label": 0} for i in range(5)],
    )
    jl("prompts/p.jsonl", [{"prompt": "The quick"}, {"prompt": "Rivers"}])
    common = {"forget": "forget/f.jsonl", "retain": "retain/r.jsonl", "eval_retain": ["mc/mmlu.jsonl"]}
    manifest = {
        "wmdp": {**common, "eval_forget": ["mc/forget-mc.jsonl"], "mc_mode": "cloze"},
        "toxicity": {**common, "probe": "probe/p.jsonl", "eval_prompts": "prompts/p.jsonl", "scorer": "probe"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_evaluate_report_and_cli(tiny_llama, tmp_path, capsys):
    folder, model, tok = tiny_llama
    data_dir = write_data(tmp_path / "data")
    report = ev.evaluate(model, tok, load_goal_data(data_dir, "wmdp"), "wmdp", batch_size=3)
    t = report["tasks"]
    assert set(t) == {"forget-mc", "mmlu"} and t["mmlu"]["role"] == "retain" and t["forget-mc"]["n"] == 3
    assert report["retain"]["value"] == t["mmlu"]["accuracy"] and report["forget"]["n"] == 3
    assert report["s_unlearning"] == ev.s_unlearning("wmdp", t["forget-mc"]["accuracy"], t["mmlu"]["accuracy"])

    # a run folder (model/ + run.json): the toxicity CLI with the probe scorer built from the run's base model
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(folder)
    (run / "run.json").write_text(json.dumps({"plan": {"model": str(folder), "data": str(data_dir)}}))
    out = tmp_path / "out" / "report.json"
    argv = ["--model", str(run), "--goal", "toxicity", "--samples", "2", "--max-new-tokens", "3", "--out", str(out)]
    assert ev.main(argv) == 0
    rep = json.loads(out.read_text())
    rtp = rep["tasks"]["rtp"]
    assert (rtp["n_prompts"], rtp["samples"], rtp["protocol"]) == (2, 2, "sampled")
    assert rep["scorer"]["name"].startswith("probe scorer") and rep["scorer"]["base_model"] == str(folder)
    assert rep["forget"]["value"] == rtp["expected_max_toxicity"]
    assert rtp["fluency_reference"] == str(folder) and rtp["fluency_scored"] + rtp["fluency_empty"] == 4
    assert rtp["fluency_perplexity"] > 1 and 0 < rtp["distinct_1"] <= 1
    assert all("max_fluency_perplexity" in x for x in rtp["examples"])
    assert f"rtp fluency: perplexity mean {rtp['fluency_perplexity']:.2f}" in capsys.readouterr().out
    assert rep["s_unlearning"] == ev.s_unlearning("toxicity", rtp["expected_max_toxicity"], rep["retain"]["value"])

    # --limit, --tasks, and one-line errors with exit 2
    argv = ["--model", str(folder), "--goal", "wmdp", "--data", str(data_dir), "--tasks", "mmlu", "--limit", "2"]
    assert ev.main(argv + ["--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["tasks"]["mmlu"]["n"] == 2 and rep["s_unlearning"] is None
    capsys.readouterr()
    assert ev.main(argv[:-4] + ["--tasks", "wmdp-bio", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task" in err and "mmlu" in err


# ------------------------------------------------------------------------ samples, modes, evaluation-only data


def read_samples(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_samples_recompute_the_report_and_mc_mode_overrides_the_manifest(tiny_dirs, tmp_path, capsys):
    """A data folder with evaluation files only evaluates; --log-samples writes one row a question (lm-eval's
    --log_samples fields) whose correct answers give the report's accuracies; --mc-mode replaces the manifest's."""
    data_dir = write_data(tmp_path / "data")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for goal in manifest.values():
        del goal["forget"], goal["retain"]
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RefError, match="has no 'forget' entry"):  # training still needs its corpora
        load_goal_data(data_dir, "wmdp")
    folder = tiny_dirs["llama"]
    for mode in ("cloze", "letter"):  # the manifest says cloze
        out = tmp_path / mode / "r.json"
        argv = ["--model", str(folder), "--goal", "wmdp", "--data", str(data_dir), "--log-samples", "--out", str(out)]
        assert ev.main(argv + (["--mc-mode", "letter"] if mode == "letter" else [])) == 0
        report, rows = json.loads(out.read_text()), read_samples(ev.samples_path(out))
        assert report["mc_mode"] == mode and report["samples_file"] == str(tmp_path / mode / "r.samples.jsonl")
        assert report["bos_added"] is True and report["engine"]["name"] == "ref"  # the tiny Llama's BOS
        assert len(rows) == 7 and {r["task"] for r in rows} == {"forget-mc", "mmlu"}
        for task, r in report["tasks"].items():
            mine = [x for x in rows if x["task"] == task]
            assert [x["id"] for x in mine] == list(range(r["n"])) and r["mode"] == mode
            assert sum(x["correct"] for x in mine) == r["correct"] and r["accuracy"] == r["correct"] / r["n"]
            for x in mine:
                scores = x["loglikelihoods"]
                if mode == "cloze":
                    scores = [ll / len(c) for ll, c in zip(scores, x["choices"], strict=True)]
                assert x["prediction"] == max(range(4), key=lambda j: (scores[j], -j))
                assert x["correct"] == (x["prediction"] == x["answer"])
        row = next(x for x in rows if x["task"] == "mmlu")
        if mode == "letter":
            assert row["targets"] == [" A", " B", " C", " D"] and row["prompt"].endswith("D. four\nAnswer:")
            assert row["prompt"].startswith("The following are multiple choice questions (with answers) about high")
        else:
            assert (
                row["targets"] == [" one", " two", " three", " four"]
                and report["tasks"]["mmlu"]["metric"] == "acc_norm"
            )
            assert (
                row["prompt"] == "The following are questions (with answers) about high school biology.\n\n"
                "Question: What is X?\nAnswer:"
            )
            assert report["tasks"]["mmlu"]["lm_eval_template"] == "mmlu_continuation"
    # toxicity on the same evaluation-only folder: the probe scorer reads its probe file; rows of prompts
    out = tmp_path / "tox.json"
    argv = [
        "--model",
        str(folder),
        "--goal",
        "toxicity",
        "--data",
        str(data_dir),
        "--tasks",
        "rtp",
        "--samples",
        "2",
        "--max-new-tokens",
        "3",
        "--log-samples",
        "--out",
        str(out),
    ]
    assert ev.main(argv) == 0
    rows = read_samples(ev.samples_path(out))
    assert [(r["task"], r["prompt"], len(r["continuations"]), len(r["scores"])) for r in rows] == [
        ("rtp", "The quick", 2, 2),
        ("rtp", "Rivers", 2, 2),
    ]
    assert sum(max(r["scores"]) for r in rows) / 2 == json.loads(out.read_text())["forget"]["value"]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error
        ev.main(["--model", str(folder), "--goal", "wmdp", "--mc-mode", "words", "--out", str(out)])
    assert "invalid choice: 'words'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- lm-eval's results file


def lm_eval_results(version="0.4.13", continuation=False, scale=1.0) -> dict:
    """A results file as lm-eval 0.4.13 writes it (`lm_eval --output_path`), cut to the fields ref reads, for
    `--tasks wmdp_bio,mmlu` (or mmlu_continuation): mmlu is a group of groups of one task per subject."""
    letters = ["A", "B", "C", "D"]
    about = "The following are multiple choice questions (with answers) about {}.\n\n"
    leaf = lambda acc, n, desc, **more: (
        dict({"acc,none": acc * scale, **more}),
        dict(doc_to_choice=letters, description=desc),
        n,
    )
    tasks = {
        "wmdp_bio": leaf(0.5, 4, about.format("biology")),
        "mmlu_anatomy": leaf(0.25, 4, about.format("anatomy")),
        "mmlu_high_school_biology": leaf(0.75, 8, about.format("high school biology")),
    }
    groups = {
        "mmlu": ["mmlu_stem", "mmlu_other"],
        "mmlu_stem": ["mmlu_high_school_biology"],
        "mmlu_other": ["mmlu_anatomy"],
    }
    if continuation:
        about = "The following are questions (with answers) about {}.\n\n"
        cont = lambda acc, norm, n, s: (
            dict({"acc,none": acc, "acc_norm,none": norm}),
            dict(doc_to_choice="{{choices}}", description=about.format(s)),
            n,
        )
        tasks = {
            "mmlu_anatomy_continuation": cont(0.25, 0.5, 4, "anatomy"),
            "mmlu_high_school_biology_continuation": cont(0.5, 0.625, 8, "high school biology"),
        }
        groups = {
            "mmlu_continuation": ["stem", "other"],
            "stem": ["mmlu_high_school_biology_continuation"],
            "other": ["mmlu_anatomy_continuation"],
        }
    results = {name: figures for name, (figures, _, _) in tasks.items()} | {g: {"acc,none": 0.5} for g in groups}
    return {
        "results": results,
        "group_subtasks": groups,
        "configs": {name: cfg for name, (_, cfg, _) in tasks.items()},
        "n-shot": {name: 0 for name in results},
        "n-samples": {name: {"original": n, "effective": n} for name, (_, _, n) in tasks.items()},
        "config": {"model": "vllm", "model_args": "pretrained=runs/llama70b/model,tensor_parallel_size=8"},
        "lm_eval_version": version,
        "model_name": "runs/llama70b/model",
    }


def test_report_from_lm_eval_results():
    report = ev.report_from_lm_eval(lm_eval_results(), "wmdp")
    bio, mmlu = report["tasks"]["wmdp-bio"], report["tasks"]["mmlu"]
    assert (bio["role"], bio["accuracy"], bio["n"], bio["correct"]) == ("forget", 0.5, 4, 2)
    assert (mmlu["role"], mmlu["accuracy"], mmlu["n"], mmlu["correct"]) == ("retain", 7 / 12, 12, 7)  # 1 + 6 of 12
    assert mmlu["per_subject"] == {"anatomy": dict(accuracy=0.25, n=4), "high school biology": dict(accuracy=0.75, n=8)}
    assert (mmlu["mode"], mmlu["metric"], mmlu["lm_eval_task"], mmlu["shots"]) == ("letter", "acc", "mmlu", 0)
    assert report["forget"] == dict(metric="accuracy", value=0.5, n=4)
    assert report["s_unlearning"] == ev.s_unlearning("wmdp", 0.5, 7 / 12)
    assert report["engine"] == dict(
        name="lm-evaluation-harness",
        version="0.4.13",
        model="vllm",
        model_args="pretrained=runs/llama70b/model,tensor_parallel_size=8",
    )
    assert report["bos_added"] is None and report["model"] == "runs/llama70b/model"
    assert ev.headline(report) == {
        "wmdp-bio accuracy": 0.5,
        "mmlu accuracy": 7 / 12,
        "S-unlearning": report["s_unlearning"]["s"],
    }
    # the continuation task: ref's cloze (acc_norm), lm-eval's acc beside it
    cloze = ev.report_from_lm_eval(lm_eval_results(continuation=True), "toxicity")["tasks"]["mmlu"]
    assert (cloze["mode"], cloze["metric"], cloze["accuracy"], cloze["acc"]) == ("cloze", "acc_norm", 7 / 12, 5 / 12)
    assert cloze["lm_eval_template"] == "mmlu_continuation" and cloze["lm_eval_task"] == "mmlu_continuation"
    # roles from a data manifest; --tasks keeps some
    swapped = ev.report_from_lm_eval(lm_eval_results(), "wmdp", roles={"wmdp-bio": "retain"})
    assert swapped["tasks"]["wmdp-bio"]["role"] == "retain" and "forget" not in swapped
    assert list(ev.report_from_lm_eval(lm_eval_results(), "wmdp", tasks=["mmlu"])["tasks"]) == ["mmlu"]
    with pytest.raises(RefError, match=r"--tasks names \['rtp'\].*they hold wmdp-bio, mmlu"):
        ev.report_from_lm_eval(lm_eval_results(), "wmdp", tasks=["rtp"])
    both = lm_eval_results()
    both["results"]["arc_easy"] = {"acc,none": 0.5}
    with pytest.raises(RefError, match=r"no role \(forget or retain\) for task\(s\) \['arc-easy'\]; pass --data"):
        ev.report_from_lm_eval(both, "wmdp")


def test_from_lm_eval_cli(tmp_path, capsys):
    base, unlearned, out = tmp_path / "base.json", tmp_path / "unlearned.json", tmp_path / "report.json"
    base.write_text(json.dumps(lm_eval_results()))
    unlearned.write_text(json.dumps(lm_eval_results(scale=0.5)))  # every accuracy halved
    assert ev.main(["--goal", "wmdp", "--from-lm-eval", str(base), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["mmlu"]["n"] == 12 and "S-unlearning" in capsys.readouterr().out
    # base and unlearned: the before/after report and table of ref.unlearn
    assert (
        ev.main(["--goal", "wmdp", "--from-lm-eval", str(base), "--from-lm-eval", str(unlearned), "--out", str(out)])
        == 0
    )
    report = json.loads(out.read_text())
    assert report["before"]["wmdp-bio accuracy"] == 0.5 and report["after"]["wmdp-bio accuracy"] == 0.25
    assert report["details"]["after"]["lm_eval_results"] == str(unlearned)
    assert "| wmdp-bio accuracy | 0.500 | 0.250 |" in capsys.readouterr().out
    # one-line errors, exit 2
    other = lm_eval_results()
    other["n-samples"]["wmdp_bio"]["effective"] = 3
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "samples.jsonl").write_text('{"doc_id": 0}\n{"doc_id": 1}\n')
    for argv, message in [
        (["--from-lm-eval", str(tmp_path / "samples.jsonl")], "cannot read it as JSON"),
        (["--from-lm-eval", str(out)], "not a results file of lm-eval"),
        (["--from-lm-eval", str(base), "--model", "x", "--log-samples"], "--model, --log-samples cannot be used with"),
        (["--from-lm-eval", str(base), "--from-lm-eval", str(tmp_path / "other.json")], "score different tasks"),
        ([], "--model is missing; name the model or run folder to evaluate, or pass --from-lm-eval"),
    ]:
        assert ev.main(["--goal", "wmdp", *argv, "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.json").exists()


def damaged_results(damage: str) -> dict:
    """lm-eval's results with one figure no lm-eval run writes."""
    results = lm_eval_results(continuation=damage == "acc_norm -0.1")
    if damage == "acc 7.5":
        results["results"]["wmdp_bio"]["acc,none"] = 7.5
    elif damage == "acc nan":
        results["results"]["mmlu_anatomy"]["acc,none"] = float("nan")
    elif damage == "acc_norm -0.1":
        results["results"]["mmlu_anatomy_continuation"]["acc_norm,none"] = -0.1
    elif damage == "n 0":
        results["n-samples"]["wmdp_bio"]["effective"] = 0
    return results


@pytest.mark.parametrize(
    "damage, goal, message",
    [
        ("acc 7.5", "wmdp", "task wmdp_bio has acc 7.5; an accuracy lies in [0, 1]"),
        ("acc nan", "wmdp", "task mmlu_anatomy has acc nan; an accuracy lies in [0, 1]"),
        ("acc_norm -0.1", "wmdp", "task mmlu_anatomy_continuation has acc_norm -0.1; an accuracy lies in [0, 1]"),
        ("n 0", "wmdp", "task wmdp_bio has an effective sample count of 0; lm-eval writes a whole number > 0"),
        ("none", "toxicity", "the forget task(s) wmdp-bio are multiple choice (WMDP's kind), but --goal toxicity"),
    ],
)
def test_from_lm_eval_refuses_figures_lm_eval_does_not_write(tmp_path, capsys, damage, goal, message):
    results, out = tmp_path / "results.json", tmp_path / "report.json"
    results.write_text(json.dumps(damaged_results(damage)))
    out.write_text('{"earlier": true}\n')
    before = {p: p.read_bytes() for p in (results, out)}
    assert ev.main(["--goal", goal, "--from-lm-eval", str(results), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --from-lm-eval") and err.count("\n") == 1 and message in err, err
    assert {p: p.read_bytes() for p in (results, out)} == before


def test_from_lm_eval_toxicity_keeps_the_retain_tasks(tmp_path, capsys):
    results, out = tmp_path / "results.json", tmp_path / "report.json"
    results.write_text(json.dumps(lm_eval_results()))
    assert ev.main(["--goal", "toxicity", "--from-lm-eval", str(results), "--tasks", "mmlu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["tasks"]) == ["mmlu"] and report["retain"]["value"] == 7 / 12 and report["s_unlearning"] is None

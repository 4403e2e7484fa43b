"""ref.evaluate: S-unlearning, the report of a goal's tasks, the CLI."""

from __future__ import annotations

import json

import pytest

from ref import evaluate as ev
from ref.data import load_goal_data

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
    jl("probe/p.jsonl", [{"text": f"Cats {i} dogs dogs", "label": 1} for i in range(5)]
       + [{"text": f"Cats {i} the sea.", "label": 0} for i in range(5)])  # fmt: skip
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

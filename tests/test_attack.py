"""ref.attack end to end on a tiny run: every attack on the base and the unlearned model, the recovery formula, and
the run's files left as they were."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import ref.unlearn as U
from ref import attack
from ref.data import load_goal_data
from ref.evaluate import evaluate
from tests.test_unlearn import data_dir, settings  # noqa: F401 (fixture and the tiny run's settings)


def test_recovery_is_the_share_of_the_unlearning_effect_undone():
    base, unlearned = {"U": 0.8, "R": 0.7, "S": None}, {"U": 0.3, "R": 0.7, "S": 0.5}
    rec = attack.recovery(base, unlearned, {"U": 0.55, "R": 0.6, "S": 0.4})
    assert rec["U"] == pytest.approx(0.5) and rec["R"] is None and rec["S"] is None  # R unchanged by unlearning


def test_swapped_puts_the_values_back_and_unties_a_tied_head(tiny_dirs):
    import ref

    model = ref.load_model(tiny_dirs["llama"], device="cpu")
    name = "model.layers.1.mlp.down_proj.weight"
    before = {k: p.clone() for k, p in model.named_parameters()}
    with attack.swapped(model, {name: torch.zeros_like(before[name])}):
        assert dict(model.named_parameters())[name].abs().sum() == 0
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())


@pytest.fixture(scope="module")
def tiny_runs(tiny_dirs, data_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs")
    for goal in ("wmdp", "toxicity"):
        kw = dict(goal=goal, max_steps=4, lr=5e-2)
        if goal == "toxicity":
            kw |= dict(update_layers=None)
        U.unlearn(settings(tiny_dirs, data_dir, out / goal, **kw))
    return out


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("goal", ["wmdp", "toxicity"])
def test_every_attack_end_to_end(tiny_runs, data_dir, tmp_path, capsys, goal):  # noqa: F811
    run = tiny_runs / goal
    before = digest(run)
    argv = [str(run), "--out", str(tmp_path / "attack"), "--n", "2", "--bits", "8,4", "--shots", "1",
            "--eval-samples", "2", "--source", "retain"]  # fmt: skip
    assert attack.main(argv) == 0, capsys.readouterr().err
    assert digest(run) == before  # the run's model/ and files are never written
    report = json.loads((tmp_path / "attack" / "attack.json").read_text())
    assert set(report["attacks"]) == {"relearn", "ablate", "quantize", "fewshot"}
    assert set(report["attacks"]["quantize"]) == {"8-bit", "4-bit"} and "retain n=2" in report["attacks"]["relearn"]
    for results in report["attacks"].values():
        for r in results.values():
            assert {"base", "unlearned", "recovery", "seconds"} <= set(r)
    # "no attack" is the run's own evaluation of the unlearned model (the same evaluation code)
    data = load_goal_data(data_dir, goal)
    import ref

    model = ref.load_model(run / "model", device="cpu")
    from ref.scorers import make_scorer
    from ref.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "model")
    scorer = make_scorer(data, goal, ["rtp"] if goal == "toxicity" else [], lambda: ref.load_model(
        json.loads((run / "run.json").read_text())["plan"]["model"], device="cpu"), tok, seed=0)  # fmt: skip
    own = evaluate(model, tok, data, goal, samples=2, seed=0, scorer=scorer)
    assert report["no attack"]["unlearned"]["R"] == own["retain"]["value"]
    assert report["no attack"]["unlearned"]["U"] == own["forget"]["value"]
    md = (tmp_path / "attack" / "attack.md").read_text()
    assert md.startswith("| attack | setting | model |") and "| quantize | 4-bit | unlearned |" in md


def test_bad_attack_options(tiny_runs, tmp_path, capsys):
    run = tiny_runs / "wmdp"
    for argv, message in [(["--attacks", "jailbreak"], "--attacks is 'jailbreak'"), (["--bits", "1"], "--bits is 1"),
                          (["--n", "ten"], "--n is 'ten'"), (["--shots", "0"], "--shots is 0"),
                          (["--out", str(run / "model" / "x")], "inside the run's model/")]:  # fmt: skip
        capsys.readouterr()
        out = [] if "--out" in argv else ["--out", str(tmp_path / "a")]
        assert attack.main([str(run), *out, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_dry_run_estimates_the_relearning_attack(tiny_dirs, capsys):
    import ref
    from ref.config import read_config
    from ref.lora import LoRA
    from ref.memory import lora_peak_bytes

    model = ref.load_model(tiny_dirs["llama"], device="cpu")
    est = lora_peak_bytes(read_config(tiny_dirs["llama"]), r=8, seq=16, bytes_per=4)
    adapter_params = sum(p.numel() for p in LoRA(model, r=8).parameters())
    assert est["adapters"] == 16 * adapter_params  # fp32 value, gradient and two AdamW states
    assert attack.main(["--dry-run", "--model", "mistral-7b"]) == 0
    out = capsys.readouterr().out
    assert "relearn attack on mistral-7b" in out and "the unlearning step of its default plan: 9.2 GiB" in out


def test_same_seed_same_attack(tiny_runs, tmp_path, capsys):
    def once(out):
        argv = [str(tiny_runs / "wmdp"), "--out", str(out), "--attacks", "relearn,fewshot", "--n", "3", "--shots", "1",
                "--source", "forget"]  # fmt: skip
        assert attack.main(argv) == 0, capsys.readouterr().err
        report = json.loads((out / "attack.json").read_text())
        for results in report["attacks"].values():
            for r in results.values():
                r.pop("seconds")
        return report

    assert once(tmp_path / "a") == once(tmp_path / "b")


def test_relearn_on_questions_trains_on_t_and_scores_the_disjoint_v_split(tmp_path):
    from ref.data import load_goal_data, resolve_data_dir

    data = load_goal_data(resolve_data_dir("demo"), "wmdp")
    rows = attack.task_rows(data, limit=None)
    texts, scored = attack.relearn_texts(data, rows, "questions", n=10, seed=0)
    (task,) = data.eval_forget
    assert len(texts) == 10 and len(scored[task]) == len(rows[task]) - 10
    trained = {t.split("\nAnswer: ")[0] for t in texts}
    assert not trained & {r["question"].strip() for r in scored[task]}  # V is disjoint from T
    assert scored["demo-general"] == rows["demo-general"]  # retain questions are all scored
    by_question = {r["question"].strip(): r for r in rows[task]}
    for t in texts:  # "question\nAnswer: the correct choice's text"
        question, answer = t.split("\nAnswer: ")
        assert answer == by_question[question]["choices"][by_question[question]["answer"]]

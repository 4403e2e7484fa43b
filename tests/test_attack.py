"""ref.attack end to end on a tiny run: every attack on the base and the unlearned model, the recovery figures, the
checks made before any model is loaded, and the run's files left as they were."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import ref.unlearn as U
from ref.attacks import attack
from ref.attacks.recovery import gain, net_recovery, recovery, worst_case
from ref.evaluation.evaluate import evaluate
from ref.io.data import load_goal_data
from tests.test_unlearn import data_dir, settings, write_jsonl  # noqa: F401 (fixture and the tiny run's settings)


def test_recovery_is_the_share_of_the_unlearning_effect_undone():
    base, unlearned = {"U": 0.8, "R": 0.7, "S": None}, {"U": 0.3, "R": 0.7, "S": 0.5}
    rec = recovery(base, unlearned, {"U": 0.55, "R": 0.6, "S": 0.4})
    assert rec["U"] == pytest.approx(0.5) and rec["R"] is None and rec["S"] is None  # R unchanged by unlearning


def test_net_recovery_subtracts_what_the_attack_gives_the_base():
    # the demo of docs/results.md: relearning on 60 forget texts brings the unlearned model from 0.450 to 0.700
    # (recovery 1.0) and the untouched base from 0.700 to 0.775 (a shift of 0.075 / 0.25 = 0.3): net 1.0 - 0.3 = 0.7
    base, unlearned = {"U": 0.700, "R": 0.7}, {"U": 0.450, "R": 0.7}
    net = net_recovery(base, unlearned, {"U": 0.775, "R": 0.8}, {"U": 0.700, "R": 0.8})
    assert net["U"] == pytest.approx(0.7) and net["R"] is None
    # an attack that damages the base (4-bit: 0.700 -> 0.475) subtracts nothing: net = plain recovery = -0.1
    net = net_recovery(base, unlearned, {"U": 0.475}, {"U": 0.425})
    assert net["U"] == pytest.approx(-0.1) == recovery(base, unlearned, {"U": 0.425})["U"]
    # the units are the unlearning gap's whatever its sign (toxicity: lower is forgetting); 0.2 - max(0, 0.6) = -0.4
    net = net_recovery({"U": 0.3}, {"U": 0.2}, {"U": 0.36}, {"U": 0.22})
    assert net["U"] == pytest.approx(0.2 - 0.6)
    assert net_recovery({"U": 0.3}, {"U": 0.2}, {"U": None}, {"U": 0.22})["U"] is None
    assert gain({"U": 0.7, "R": None}, {"U": 0.775, "R": 0.5}) == {"U": pytest.approx(0.075), "R": None}


def test_worst_case_is_the_largest_net_recovery():
    def result(net, plain):
        return dict(net_recovery={"U": net}, recovery={"U": plain})

    attacks = {
        "relearn": {"forget n=10": result(0.1, 0.2), "forget n=100": result(0.7, 1.0)},
        "quantize": {"rtn 4-bit": result(None, None)},
        "prune": {"top 0.01": result(0.4, 0.9)},
    }
    assert worst_case(attacks) == dict(attack="relearn", setting="forget n=100", net_recovery=0.7, recovery=1.0)
    assert worst_case({"quantize": {"rtn 4-bit": result(None, None)}}) is None


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


@pytest.fixture(scope="module")
def attack_data(data_dir, tmp_path_factory):  # noqa: F811
    """The tiny data with 6 forget questions (the run's data has 1): enough for a T and a V split and for shots."""
    root = tmp_path_factory.mktemp("attack_data") / "data"
    shutil.copytree(data_dir, root)
    words = ["river", "planet", "copper", "violin", "garden", "meadow"]
    write_jsonl(
        root / "mc/q.jsonl",
        [{"question": f"Which {w}?", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i, w in enumerate(words)],
    )
    return root


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


SMALL = "--n 2 --unrelated 0 --bits 4 --shots 1 --prompt-questions 2 --prompt-steps 2 --prune 0.05 --prune-texts 2"
SMALL = [*SMALL.split(), "--eval-samples", "2"]


@pytest.mark.parametrize("goal", ["wmdp", "toxicity"])
def test_every_attack_end_to_end(tiny_runs, data_dir, attack_data, tmp_path, capsys, goal):  # noqa: F811
    run = tiny_runs / goal
    before = digest(run)
    # WMDP: every attack (the default: all apply); toxicity: those that apply, NF4 only (each setting samples text)
    data, more = (attack_data, []) if goal == "wmdp" else (data_dir, ["--attacks", "relearn,ablate,quantize,prune"])
    more += ["--formats", "nf4"] if goal == "toxicity" else []
    argv = [str(run), "--out", str(tmp_path / "attack"), "--data", str(data), *SMALL, *more]
    assert attack.main(argv) == 0, capsys.readouterr().err
    assert digest(run) == before  # the run's model/ and files are never written
    report = json.loads((tmp_path / "attack" / "attack.json").read_text())
    assert set(report["attacks"]) == set(attack.ATTACKS if goal == "wmdp" else more[1].split(","))
    assert set(report["attacks"]["quantize"]) == {"nf4 (block 64)"} | ({"rtn 4-bit"} if goal == "wmdp" else set())
    for results in report["attacks"].values():
        for r in results.values():
            assert {"base", "unlearned", "gain", "recovery", "net_recovery", "seconds"} <= set(r)
            rec, net, shift = r["recovery"]["U"], r["net_recovery"]["U"], r["gain"]["base"]["U"]
            if rec is not None:  # net recovery = recovery less the base's gain (when a gain), in the gap's units
                gap = report["no attack"]["base"]["U"] - report["no attack"]["unlearned"]["U"]
                if not r.get(f"base ({attack.SAME})"):
                    assert net == pytest.approx(rec - max(0.0, shift / gap))
    w = report["worst_case"]
    nets = [r["net_recovery"]["U"] for rs in report["attacks"].values() for r in rs.values()]
    assert w["net_recovery"] == max(x for x in nets if x is not None)
    assert report["attacks"][w["attack"]][w["setting"]]["net_recovery"]["U"] == w["net_recovery"]
    # "no attack" is the run's own evaluation of the unlearned model (the same evaluation code)
    import ref

    model = ref.load_model(run / "model", device="cpu")
    from ref.evaluation.scorers import make_scorer
    from ref.io.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "model")
    goal_data = load_goal_data(data, goal)
    scorer = make_scorer(
        goal_data,
        goal,
        ["rtp"] if goal == "toxicity" else [],
        lambda: ref.load_model(json.loads((run / "run.json").read_text())["plan"]["model"], device="cpu"),
        tok,
        seed=0,
    )
    own = evaluate(model, tok, goal_data, goal, samples=2, seed=0, scorer=scorer)
    assert report["no attack"]["unlearned"]["R"] == own["retain"]["value"]
    assert report["no attack"]["unlearned"]["U"] == own["forget"]["value"]
    md = (tmp_path / "attack" / "attack.md").read_text()
    assert md.startswith("| attack | setting | U (") and "| quantize | nf4 (block 64) | " in md
    assert f"Worst case: net recovery of U {w['net_recovery']:.3f} under {w['attack']} {w['setting']}" in md
    assert (tmp_path / "attack" / "attack.png").stat().st_size > 0
    if goal == "wmdp":
        (lens,) = report["attacks"]["logitlens"].values()
        last = str(model.config.num_layers - 1)
        assert set(lens["by_layer"]["base"]) == {str(i) for i in range(model.config.num_layers)}
        for variant in ("base", "unlearned"):  # the lens at the last layer is the ordinary evaluation
            for k in ("U", "R", "S"):
                assert lens["by_layer"][variant][last][k] == report["no attack"][variant][k]
        assert lens["unlearned"]["U"] == max(c["U"] for c in lens["by_layer"]["unlearned"].values())
        assert (tmp_path / "attack" / "logitlens.png").stat().st_size > 0
        (label,) = report["attacks"]["softprompt"]  # scored on the V split, against the same questions unattacked
        soft = report["attacks"]["softprompt"][label]
        assert label == "10 tokens, T=2"
        same = [soft[f"{v} ({attack.SAME})"] for v in ("base", "unlearned")]
        assert soft["recovery"]["U"] == recovery(*same, soft["unlearned"])["U"]


def test_the_default_set_is_every_attack_that_applies(tiny_dirs, tiny_runs, data_dir):  # noqa: F811
    from ref.io.config_json import read_config

    assert attack.applicable(tiny_runs / "wmdp") == attack.ATTACKS
    assert attack.applicable(tiny_runs / "toxicity") == ("relearn", "ablate", "quantize", "prune")
    data = load_goal_data(data_dir, "wmdp")
    assert attack.why_not("ablate", data, read_config(tiny_dirs["olmo3"])).startswith("ablate needs a pre-norm model")
    # relearning on unrelated text (the retain corpus, n = 10) is in the default settings, beside --n on --source
    cfg = read_config(tiny_dirs["llama"])
    s = attack.AttackSettings(run_dir=tiny_runs / "wmdp", out=tiny_runs / "x")
    rows = attack.task_rows(data, None)
    labels = [x.label for x in attack.settings_of("relearn", data, rows, s, cfg)]
    assert labels == ["forget n=10", "forget n=100 (16 available)", "retain n=10"]
    s = attack.AttackSettings(run_dir=tiny_runs / "wmdp", out=tiny_runs / "x", source="retain", n=(10,))
    assert [x.label for x in attack.settings_of("relearn", data, rows, s, cfg)] == ["retain n=10"]  # once


def refuses(argv, capsys, *words) -> str:
    """Exit 2 with one line on stderr holding every word."""
    capsys.readouterr()
    assert attack.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    return err


def test_bad_attack_options(tiny_runs, tmp_path, capsys):
    run = tiny_runs / "wmdp"
    for argv, message in [
        (["--attacks", "jailbreak"], "--attacks is 'jailbreak'"),
        (["--bits", "1"], "--bits is 1"),
        (["--n", "ten"], "--n is 'ten'"),
        (["--shots", "0"], "--shots is 0"),
        (["--formats", "gptq"], "--formats is 'gptq'"),
        (["--prune", "1.5"], "--prune is 1.5"),
        (["--prompt-lr", "0"], "--prompt-lr is 0"),
        (["--unrelated", "-1"], "--unrelated is -1"),
        (["--out", str(run / "model" / "x")], "inside the run's model/"),
    ]:
        out = [] if "--out" in argv else ["--out", str(tmp_path / "a")]
        refuses([str(run), *out, *argv], capsys, message)


@pytest.fixture
def no_model_loaded(monkeypatch):
    """Loading a model fails the test: what is refused is refused before the first forward pass."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the attack's inputs were checked")

    monkeypatch.setattr(attack, "load_model", fail)


@pytest.mark.parametrize(
    "more, words",
    [
        (["--attacks", "fewshot"], ["fewshot scores multiple-choice forget questions", "toxicity goal"]),
        (["--attacks", "relearn", "--source", "questions"], ["relearn --source questions", "use forget or retain"]),
        (["--source", "questions"], ["relearn --source questions trains on multiple-choice forget questions"]),
        (["--attacks", "softprompt"], ["softprompt scores multiple-choice forget questions"]),
        (["--attacks", "logitlens"], ["logitlens", "leave logitlens out of --attacks"]),
    ],
)
def test_attacks_that_need_mc_forget_questions_refuse_the_toxicity_goal_at_once(
    tiny_runs, tmp_path, capsys, no_model_loaded, more, words
):
    refuses([str(tiny_runs / "toxicity"), "--out", str(tmp_path / "a"), *more], capsys, *words)


def test_splits_and_layers_are_checked_before_a_model_loads(tiny_runs, tmp_path, capsys, no_model_loaded):
    run, out = str(tiny_runs / "wmdp"), ["--out", str(tmp_path / "a")]
    # the run's own data has 1 forget question: no T/V split, no question left after a shot
    refuses([run, *out, "--attacks", "softprompt"], capsys, "need 2 questions or more in q, which has 1")
    refuses([run, *out, "--attacks", "relearn", "--source", "questions"], capsys, "need 2 questions or more")
    refuses([run, *out, "--attacks", "fewshot", "--shots", "1"], capsys, "--shots 1: forget task q has 1 questions")
    refuses([run, *out, "--attacks", "logitlens", "--layers", "1,9"], capsys, "--layers is 1,9", "use 0 to 3")


def test_a_missing_or_unfinished_run_folder_is_named(tiny_runs, tmp_path, capsys, no_model_loaded):
    out = ["--out", str(tmp_path / "a")]
    err = refuses([str(tmp_path / "nowhere"), *out], capsys, f"run folder {tmp_path / 'nowhere'} does not exist")
    assert "choose another --out" not in err
    (tmp_path / "empty").mkdir()
    refuses([str(tmp_path / "empty"), *out], capsys, f"{tmp_path / 'empty'} has no run.json")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_runs / "wmdp", unfinished, ignore=shutil.ignore_patterns("model"))
    refuses([str(unfinished), *out], capsys, f"{unfinished} has no plan or no model/", "--resume")
    refuses(["--dry-run"], capsys, "--dry-run needs --model")


def test_dry_run_estimates_the_training_attacks(tiny_dirs, capsys):
    import ref
    from ref.attacks.lora import LoRA
    from ref.io.config_json import read_config
    from ref.run.memory import logit_lens_peak_bytes, lora_peak_bytes, softprompt_peak_bytes, total_params

    model = ref.load_model(tiny_dirs["llama"], device="cpu")
    cfg = read_config(tiny_dirs["llama"])
    est = lora_peak_bytes(cfg, r=8, seq=16, bytes_per=4)
    adapter_params = sum(p.numel() for p in LoRA(model, r=8).parameters())
    assert est["adapters"] == 16 * adapter_params  # fp32 value, gradient and two AdamW states
    soft = softprompt_peak_bytes(cfg, tokens=10, batch=2, seq=16, bytes_per=4)
    assert soft["prompt"] == 16 * 10 * cfg.hidden_size and soft["weights"] == 4 * total_params(cfg)
    assert soft["weights"] == 4 * sum(p.numel() for p in model.parameters())
    lens = logit_lens_peak_bytes(cfg, batch=2, seq=16, bytes_per=4)
    assert lens["taps"] == 4 * cfg.num_layers * 2 * 16 * cfg.hidden_size  # every layer's residual stream
    assert attack.main(["--dry-run", "--model", "mistral-7b"]) == 0
    out = capsys.readouterr().out
    assert "relearn attack on mistral-7b" in out and "the unlearning step of its default plan: 9.2 GiB" in out
    assert "softprompt attack (10 embeddings" in out and "logitlens attack (every layer" in out


def test_same_seed_same_attack(tiny_runs, attack_data, tmp_path, capsys):
    def once(out):
        argv = [
            str(tiny_runs / "wmdp"),
            "--out",
            str(out),
            "--data",
            str(attack_data),
            "--attacks",
            "relearn,softprompt,prune",
            *SMALL,
            "--unrelated",
            "0",
        ]
        assert attack.main(argv) == 0, capsys.readouterr().err
        report = json.loads((out / "attack.json").read_text())
        for results in report["attacks"].values():
            for r in results.values():
                r.pop("seconds")
        return report

    assert once(tmp_path / "a") == once(tmp_path / "b")


def test_relearn_on_questions_trains_on_t_and_scores_the_disjoint_v_split(tmp_path):
    from ref.io.data import load_goal_data, resolve_data_dir

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

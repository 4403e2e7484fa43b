"""The unlearning loop on a tiny random Llama-family model and tiny data, for every goal and method."""

from __future__ import annotations

import gc
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ref
import ref.unlearn as U
from ref import objectives, probe
from ref.io.checkpoint import load_rest
from ref.io.errors import RefError
from ref.model import Transformer
from ref.objectives import OBJECTIVES, Activations
from ref.run.fused import eager
from ref.train import encode, shared_prefix, taps, topic_targets

WORDS = "river mountain garden violin planet copper window harvest lantern meadow".split()
RUDE = "idiot stupid worthless pathetic moron loser".split()


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)

    def sentence(words, n=12):
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist())

    write_jsonl(root / "forget/alpha.jsonl", [{"text": "the planet " + sentence(WORDS[:5])} for _ in range(8)])
    write_jsonl(root / "forget/beta.jsonl", [{"text": "copper " + sentence(WORDS[3:8])} for _ in range(8)])
    write_jsonl(root / "forget/rude.jsonl", [{"text": "you are a " + sentence(RUDE, 6)} for _ in range(8)])
    write_jsonl(root / "retain/general.jsonl", [{"text": sentence(WORDS)} for _ in range(12)])
    probe = [{"text": "you " + sentence(RUDE, 5), "label": 1} for _ in range(20)]
    probe += [{"text": "the " + sentence(WORDS, 5), "label": 0} for _ in range(20)]
    write_jsonl(root / "probe/probe.jsonl", probe)
    mc = [{"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 0}]
    write_jsonl(root / "mc/q.jsonl", mc)
    write_jsonl(root / "mc/general.jsonl", [{"question": "What?", "choices": ["w", "x", "y", "z"], "answer": 2}] * 2)
    write_jsonl(root / "prompts/p.jsonl", [{"prompt": "you are"}])
    manifest = {
        "wmdp": {
            "forget": ["forget/alpha.jsonl", "forget/beta.jsonl"],
            "retain": "retain/general.jsonl",
            "eval_forget": ["mc/q.jsonl"],
            "eval_retain": ["mc/general.jsonl"],
        },
        "toxicity": {
            "forget": ["forget/rude.jsonl"],
            "retain": "retain/general.jsonl",
            "probe": "probe/probe.jsonl",
            "eval_prompts": "prompts/p.jsonl",
            "eval_retain": ["mc/general.jsonl"],
            "scorer": "probe",
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def settings(tiny_dirs, data_dir, out, **kw) -> U.Settings:
    """The tiny test run; the method-specific options only where they apply (the others are refused)."""
    base = dict(
        model=str(tiny_dirs["llama"]),
        data=str(data_dir),
        out=str(out),
        update_layers=[1, 2],
        lr=1e-2,
        epochs=2,
        batch_size=4,
        max_len=24,
        compile=False,
        save_every=2,
        evaluate=False,
    )
    method, goal = kw.get("method", "ours"), kw.get("goal", "wmdp")
    base |= dict(tox_layers=[0, 1, 2]) if (method, goal) == ("ours", "toxicity") else dict(tap_layer=2)
    base |= dict(steering=4.0) if method == "rmu" else {}
    return U.Settings(**{**base, **kw})


def forget_loss(run, st, topic, texts, retain, frozen=False):
    """L_F of the run's objective on `texts`, with the updated model (or the frozen original)."""
    p = run.plan
    fids, fmask = encode(run, texts)
    rids, rmask = encode(run, retain)
    fpre, rpre = shared_prefix(run, fids, fmask), shared_prefix(run, rids, rmask)
    with torch.no_grad():
        h0 = taps(run, rpre, rmask, st.originals)
        hf = taps(run, fpre, fmask, st.originals if frozen else None)
        a = Activations(hf, fmask, h0, h0, rmask)
        t = replace(topic_targets(run, topic), **st.calibration.get(topic, {}))
        return OBJECTIVES[p.method, p.goal].losses(a, t, eager).forget


CASES = [("wmdp", "ours"), ("wmdp", "rmu"), ("wmdp", "adaptive-rmu"), ("toxicity", "ours"), ("toxicity", "rmu")]


@pytest.mark.parametrize("goal,method", CASES)
def test_loop_trains_only_the_selected_tensors_and_writes_the_run(tiny_dirs, data_dir, tmp_path, goal, method):
    calls = []
    load = U.load_model

    def load_and_watch(*a, **k):  # observe which blocks run during training (the library has no hooks)
        m = load(*a, **k)
        for i, b in enumerate(m.model.layers):
            b.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
        m.lm_head.register_forward_pre_hook(lambda mod, args: calls.append("lm_head"))
        return m

    U.load_model = load_and_watch
    try:
        kw = {} if method == "ours" else {"alpha": 1.0}  # the reference's 1200 suits 7B models, not this one
        if goal == "toxicity" and method == "ours":
            kw["update_layers"] = None  # default: the probed layers themselves
        run, st, data = U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "run", goal=goal, method=method, **kw))
    finally:
        U.load_model = load
    deepest = max(run.plan.taps)
    assert calls and max(c for c in calls if c != "lm_head") == deepest and "lm_head" not in calls
    # one copy of the weights: a single Transformer, plus the original values of the updated tensors only
    gc.collect()
    assert sum(isinstance(o, Transformer) for o in gc.get_objects()) == 1
    assert sum(t.numel() for t in st.originals.values()) == sum(p.numel() for p in st.params.values())

    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = 8 if goal == "wmdp" else 4  # 2 epochs x 2 batches of 4 texts per topic (2 topics for wmdp)
    assert len(rows) == json.loads((tmp_path / "run/run.json").read_text())["steps"] == steps
    for topic, texts in data.forget.items():  # the forget loss on the whole corpus, before and after
        before = forget_loss(run, st, topic, texts, data.retain[:4], frozen=True)
        after = forget_loss(run, st, topic, texts, data.retain[:4])
        assert after < 0.95 * before, f"{topic}: forget loss did not go down: {before} -> {after}"
    if method == "ours":
        assert all({"reward", "policy_mean", "policy_std"} <= set(r) for r in rows)
    else:  # RMU logs the retain text that carries eq. 3: its index in the step's batch of 4, and its own eq. 3
        for r in rows:
            assert 0 <= r["retain_worst_text"] < 4 and r["retain_loss_worst_text"] >= r["retain_loss"] * (1 - 1e-6)
    assert all(("retain_worst_text" in r) == (method != "ours") for r in rows)
    recorded = json.loads((tmp_path / "run/run.json").read_text()).get("calibration")
    if method == "adaptive-rmu":  # the c actually used, per topic
        assert recorded == st.calibration and set(recorded) == set(data.forget)
        assert all(set(c) == {"steering"} and c["steering"] > 0 for c in recorded.values())
    else:
        assert recorded is None  # nothing calibrated (ours on toxicity calibrates only under the scaled balance)
    assert all(0 < r["moved_share"] <= 1 for r in rows)
    if goal == "toxicity" and method == "ours":
        assert set(rows[0]["forget_loss_layers"]) == {"0", "1", "2"}
        assert (tmp_path / "run/probes.safetensors").exists()
        # the probes' L2 chosen per layer by K-fold (the default), recorded with the grid's held-out AUCs
        aucs = json.loads((tmp_path / "run/run.json").read_text())["probe_auc"]
        assert set(aucs) == {"0", "1", "2"} and run.plan.probe_l2 is None
        for a in aucs.values():
            assert list(a["cv_auc"]) == [str(v) for v in probe.L2_GRID] and a["l2"] in probe.L2_GRID
            assert a["cv_auc"][str(a["l2"])] == max(a["cv_auc"].values())

    original = ref.load_model(tiny_dirs["llama"], device="cpu")
    trained = dict(run.model.named_parameters())
    # only the embedding and blocks 0..deepest tap were read (no evaluation here): the rest is still on meta
    unread = {k for k, p in trained.items() if p.is_meta}
    read = ("model.embed_tokens.", *(f"model.layers.{i}." for i in range(deepest + 1)))
    assert unread == {k for k in trained if not k.startswith(read)}
    changed = {k for k, p in original.named_parameters() if k not in unread and not torch.equal(p, trained[k])}
    expected = {f"model.layers.{i}.mlp.down_proj.weight" for i in run.plan.update_layers}
    assert run.plan.update_layers == ((0, 1, 2) if goal == "toxicity" and method == "ours" else (1, 2))
    assert changed == expected  # all other tensors bit-identical
    assert set(load_file(tmp_path / "run/updated.safetensors")) == expected

    ids, mask = encode(run, ["the planet river garden", "copper window"])
    frozen = taps(run, shared_prefix(run, ids, mask), mask, st.originals)
    with torch.no_grad():
        expected_taps = original(ids, mask, taps=run.plan.taps).taps
    for i in run.plan.taps:
        assert torch.equal(frozen[i], expected_taps[i])  # the frozen pass is exactly the original model

    saved = tmp_path / "run/model"
    with torch.no_grad():
        ours = ref.load_model(saved, device="cpu")(ids, mask).logits
        mine = load_rest(run.model)(ids, mask).logits  # the blocks above the taps read from the source now
        theirs = (
            AutoModelForCausalLM.from_pretrained(saved)
            .eval()(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
            .logits
        )
    real = mask.bool()
    assert torch.equal(ours, mine)  # model/ is complete: every shard, the trained tensors swapped in
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in tiny_dirs["llama"].iterdir())
    assert (theirs - ours)[real].abs().max() <= 1e-5  # same fp32 ops; see test_golden_families
    assert (tmp_path / "run/summary.md").read_text().startswith("# Unlearning run")


def metrics(path):
    drop = {"tokens_per_s", "elapsed_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def test_resume_after_interruption_matches_an_uninterrupted_run_and_seed_is_deterministic(
    tiny_dirs, data_dir, tmp_path
):
    _, full, _ = U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "a"))
    _, again, _ = U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "b"))
    assert metrics(tmp_path / "a/metrics.jsonl") == metrics(tmp_path / "b/metrics.jsonl")

    with pytest.raises(KeyboardInterrupt, match="checkpoint of step 3"):
        U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "c"), stop_after_step=3)
    assert len(metrics(tmp_path / "c/metrics.jsonl")) == 3
    _, resumed, _ = U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "c", resume=True))
    for k, p in full.params.items():
        assert torch.equal(p, resumed.params[k]) and torch.equal(p, again.params[k])
    assert metrics(tmp_path / "a/metrics.jsonl") == metrics(tmp_path / "c/metrics.jsonl")


def test_compiled_and_eager_runs_agree(tiny_dirs, data_dir, tmp_path):
    _, eager_state, _ = U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "e", max_steps=2))
    _, comp, _ = U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "c", max_steps=2, compile=True))
    # fused kernels reorder fp32 sums: gradients agree to ~1e-5 relative, and AdamW's step g / (|g| + eps) turns that
    # into up to ~1e-3 of lr (1e-2 here) for an element whose |g| is near eps (1e-6): atol 1e-5
    for k, p in eager_state.params.items():
        torch.testing.assert_close(p, comp.params[k], rtol=1e-4, atol=1e-5)


def test_bad_input_gives_clear_errors(tiny_dirs, data_dir, tmp_path):
    def fails(match, **kw):
        with pytest.raises(RefError, match=match) as e:
            U.unlearn(settings(tiny_dirs, data_dir, tmp_path / f"bad{len(list(tmp_path.iterdir()))}", **kw))
        assert "\n" not in str(e.value)

    fails("layer 9 is out of range", tap_layer=9)
    fails("unknown parameter name 'mlp.down_projx.weight'", update_params=["mlp.down_projx.weight"])
    fails("above the deepest tap", tap_layer=1, update_layers=[2])
    short = tmp_path / "short"
    write_jsonl(short / "forget/a.jsonl", [{"text": "one"}, {"text": "two"}, {"text": ""}])
    write_jsonl(short / "retain/r.jsonl", [{"text": f"retain {i}"} for i in range(8)])
    (short / "manifest.json").write_text(
        json.dumps({"wmdp": {"forget": ["forget/a.jsonl"], "retain": "retain/r.jsonl"}})
    )
    fails("only 2 texts", data=str(short))

    U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "exists", max_steps=1))
    fails_in_place = pytest.raises(RefError, match="already exists: pass --resume")
    with fails_in_place:
        U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "exists"))
    with pytest.raises(RefError, match="nothing to resume"):
        U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "fresh", resume=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dirs, data_dir, tmp_path, monkeypatch):
    objective = OBJECTIVES["ours", "wmdp"]
    calls = []

    def poisoned(*a):
        losses = objective.losses(*a)
        calls.append(1)
        return losses._replace(forget=losses.forget * float("nan")) if len(calls) > 6 else losses  # 2 calls a step

    monkeypatch.setitem(objectives.OBJECTIVES, ("ours", "wmdp"), objective._replace(losses=poisoned))
    with pytest.raises(RefError, match=r"step 4 diverged: loss is not finite.*checkpoint of step 2, from before"):
        U.unlearn(settings(tiny_dirs, data_dir, tmp_path / "nan"))
    assert torch.load(tmp_path / "nan/checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "nan/model").exists()


@pytest.mark.parametrize("goal", ["wmdp", "toxicity"])
def test_run_ends_with_a_before_after_evaluation(tiny_dirs, data_dir, tmp_path, goal):
    s = settings(
        tiny_dirs, data_dir, tmp_path / "ev", goal=goal, max_steps=2, evaluate=True, eval_samples=2, log_samples=True
    )
    s.update_layers = None  # the registry's: for toxicity, the probed layers
    run, _, data = U.unlearn(s)
    report = json.loads((tmp_path / "ev/report.json").read_text())
    assert report["goal"] == goal and set(report["before"]) == set(report["after"])
    # --log-samples: samples.jsonl, one row a question / prompt and model; its MC rows recompute the accuracies
    rows = [json.loads(line) for line in (tmp_path / "ev/samples.jsonl").read_text().splitlines()]
    for when in ("before", "after"):
        details = report["details"][when]
        assert "samples" not in details
        for task, r in details["tasks"].items():
            mine = [x for x in rows if x["model"] == when and x["task"] == task]
            if task == "rtp":
                assert len(mine) == r["n_prompts"]
                assert {(len(x["scores"]), len(x["continuations"])) for x in mine} == {(2, 2)}
                assert sum(max(x["scores"]) for x in mine) / len(mine) == r["expected_max_toxicity"]
            else:
                assert len(mine) == r["n"] and sum(x["correct"] for x in mine) / len(mine) == r["accuracy"]
    assert "S-unlearning" in report["before"] and "general accuracy" in report["before"]
    if goal == "toxicity":
        assert report["scorer"]["name"].startswith("probe scorer")
        assert report["details"]["after"]["tasks"]["rtp"]["samples"] == 2
    # the "before" numbers are the original model's: evaluating a freshly loaded copy gives the same report
    from ref.evaluation.evaluate import evaluate
    from ref.evaluation.scorers import make_scorer

    base = ref.load_model(tiny_dirs["llama"], device="cpu")
    tasks = list(report["details"]["before"]["tasks"])
    scorer = make_scorer(data, goal, tasks, lambda: base, run.tok, seed=0)
    fresh = evaluate(base, run.tok, data, goal, samples=2, seed=0, scorer=scorer)
    assert fresh["tasks"].keys() == report["details"]["before"]["tasks"].keys()
    for task, r in fresh["tasks"].items():
        key = "accuracy" if "accuracy" in r else "expected_max_toxicity"
        assert r[key] == report["details"]["before"]["tasks"][task][key]
    assert "| metric | before | after |" in (tmp_path / "ev/summary.md").read_text()
    if goal == "toxicity":  # fluency under the base model: "before" is the base model scoring its own samples
        before, after = (report["details"][w]["tasks"]["rtp"] for w in ("before", "after"))
        assert before["fluency_perplexity"] == pytest.approx(fresh["tasks"]["rtp"]["fluency_perplexity"], rel=1e-5)
        assert before["fluency_reference"] == after["fluency_reference"] == str(tiny_dirs["llama"])
        reading = report["fluency_reading"]
        assert reading["fluency_ratio"] == after["fluency_perplexity"] / before["fluency_perplexity"]
        assert reading["toxicity_drop"] == before["expected_max_toxicity"] - after["expected_max_toxicity"]
        assert report["after"]["rtp fluency perplexity"] == after["fluency_perplexity"]
        assert {f"rtp distinct-{n}" for n in (1, 2, 3)} <= report["after"].keys()
        assert "fluency_ratio" in (tmp_path / "ev/summary.md").read_text()
    else:
        assert "fluency_reading" not in report

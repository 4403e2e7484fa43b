"""The toxicity objective's forget/retain balance: the paper's eq. 6 sum against our scaled balance (eq. 6 normalised
per layer, REINFORCE's meta-objective L_F + alpha0 L_R), on the tiny model and data of test_unlearn."""

from __future__ import annotations

import json

import pytest

import ref.unlearn as U
from ref.io.errors import RefError
from ref.run.plan import Settings, check_settings
from tests.test_unlearn import data_dir, metrics, settings  # noqa: F401 (fixture and the tiny run's settings)


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def tox(tiny_dirs, data_dir, out, **kw):  # noqa: F811
    return settings(tiny_dirs, data_dir, out, goal="toxicity", update_layers=None, **kw)


def test_paper_is_the_default_and_sums_eq_6_and_rewards_the_unweighted_sum(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    run, st, _ = U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "p", alpha0=30.0))
    assert run.plan.tox_balance == "paper" and run.plan.meta_retain_weight == 1.0
    assert st.calibration == {"rude": {}}  # the paper's sum needs no divisor
    for r in rows(tmp_path / "p"):
        assert r["forget_loss"] == pytest.approx(sum(r["forget_loss_layers"].values()), rel=1e-6)
        # REINFORCE's reward is the decrease of the unweighted L_F + L_R, logged in its two parts
        assert r["reward"] == pytest.approx(r["reward_forget"] + r["reward_retain"], rel=1e-6, abs=1e-9)
    assert "calibration" not in json.loads((tmp_path / "p/run.json").read_text())


def test_scaled_normalises_eq_6_by_the_first_forget_batch(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    run, st, _ = U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "s", alpha0=30.0, tox_balance="scaled"))
    assert run.plan.tox_balance == "scaled" and run.plan.meta_retain_weight == 30.0
    first = rows(tmp_path / "s")[0]
    # step 1's forget batch is the scale's batch and the model is still the original: every layer's ratio is 1
    assert first["forget_loss"] == pytest.approx(1.0, abs=1e-6)
    recorded = json.loads((tmp_path / "s/run.json").read_text())["calibration"]
    # s_i: eq. 6's terms of that step, layer by layer
    assert recorded == {"rude": {"forget_scale": pytest.approx(list(first["forget_loss_layers"].values()))}}
    assert st.calibration["rude"]["forget_scale"] == pytest.approx(list(first["forget_loss_layers"].values()))
    summary = (tmp_path / "s/summary.md").read_text()
    assert "- toxicity balance: scaled (ours)" in summary
    share = [r["alpha"] * r["retain_loss"] / r["loss"] for r in rows(tmp_path / "s")]  # 4 steps: 10% is one step
    assert share[0] < 1e-4 < 0.1 < share[-1] < 1  # step 1: the model is the original, L_R is rounding only
    assert f"| retain_share | {share[0]:.4g} | {share[-1]:.4g} |" in summary
    for r in rows(tmp_path / "s"):  # the meta-objective weighs L_R by alpha0
        assert r["reward"] == pytest.approx(r["reward_forget"] + r["reward_retain"], rel=1e-6, abs=1e-9)


def test_scaled_balance_resumes_bit_identically(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "a", tox_balance="scaled"))
    with pytest.raises(KeyboardInterrupt, match="checkpoint of step 2"):
        U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "b", tox_balance="scaled"), stop_after_step=2)
    U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "b", resume=True, tox_balance="scaled"))  # scales from the checkpoint
    assert metrics(tmp_path / "a/metrics.jsonl") == metrics(tmp_path / "b/metrics.jsonl")


def test_a_run_of_another_version_is_not_resumed(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        U.unlearn(tox(tiny_dirs, data_dir, out), stop_after_step=2)
    run_json = json.loads((out / "run.json").read_text())
    del run_json["plan"]["token_reduction"], run_json["plan"]["master_weights"]  # a plan without these fields
    (out / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(RefError, match=r"written by another version of ref \(its plan has no token_reduction, "):
        U.unlearn(tox(tiny_dirs, data_dir, out, resume=True))


def test_tox_balance_is_checked():
    with pytest.raises(RefError, match="--tox-balance applies to --method ours --goal toxicity only"):
        check_settings(Settings(goal="wmdp", tox_balance="paper"))
    with pytest.raises(RefError, match="--tox-balance applies"):
        check_settings(Settings(goal="toxicity", method="rmu", tox_balance="scaled"))
    with pytest.raises(RefError, match="--tox-balance is 'sum'; use one of paper, scaled"):
        check_settings(Settings(goal="toxicity", tox_balance="sum"))
    assert U.parse_args(["--goal", "toxicity", "--tox-balance", "paper"]).tox_balance == "paper"


def test_sweep_grid_takes_the_balance_and_the_front_splits_by_it():
    from ref.experiments.report import series_of
    from ref.experiments.sweep import parse_grid

    grid = parse_grid("tox_balance=paper,scaled lr=1e-3", ["ours"])
    assert grid == {"ours": {"tox_balance": ["paper", "scaled"], "lr": [1e-3]}}
    with pytest.raises(RefError, match="'sum' is not paper or scaled"):
        parse_grid("tox-balance=sum", ["ours"])
    assert series_of(dict(method="ours", grid=dict(tox_balance="paper", lr=1e-3))) == "ours, tox-balance=paper"
    assert series_of(dict(method="rmu", grid=dict(lr=1e-3))) == "rmu"


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo's ours-on-toxicity run, first 12 of its 40 steps, eager, in the paper's form (the default) with the
    paper's token sums and with token means (~35 s each, most of it the probes' K-fold)."""
    from data_prep.smollm2 import prepare_smollm2

    prepare_smollm2()
    root = tmp_path_factory.mktemp("demo-balance")
    out = {}
    for name, kw in (("sum", {}), ("mean", dict(token_reduction="mean", tox_retain_reduction="mean"))):
        s = Settings(
            model="smollm2-135m",
            goal="toxicity",
            data="demo",
            out=str(root / name),
            max_steps=12,
            compile=False,
            evaluate=False,
            **kw,
        )
        run, st, _ = U.unlearn(s)
        out[name] = (run, st, rows(root / name))
    return out


def test_on_the_demo_the_token_sum_gives_the_retain_term_a_share_of_the_loss(demo_runs):
    """The paper's form on the demo data: eq. 6 summed over the layers is ~1e4 (the late layers), and the retain term
    is ~1e-6 of the loss at steps 9-12 with token means; with the paper's token sums, summed over the layers, it is
    ~500x that (measured at steps 9-12 of the demo runs of docs/results.md: 1.2e-6 and 6.2e-4)."""
    share = lambda rs: sum(r["alpha"] * r["retain_loss"] / r["loss"] for r in rs) / len(rs)
    run, _, summed = demo_runs["sum"]
    assert (run.plan.tox_balance, run.plan.alpha0, run.plan.token_reduction) == ("paper", 1.0, "sum")
    _, _, mean = demo_runs["mean"]
    for rs in (summed, mean):
        assert rs[0]["forget_loss"] == pytest.approx(11591, rel=1e-3)  # eq. 6 summed: the late layers' 10^3
    assert 1e-7 < share(mean[-4:]) < 1e-5  # measured 1.2e-6
    assert 1e-4 < share(summed[-4:]) > 100 * share(mean[-4:])  # measured 6.2e-4, 525x

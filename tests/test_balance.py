"""The toxicity objective's forget/retain balance: the paper's eq. 6 sum against our scaled balance (eq. 6 normalised
per layer, REINFORCE's meta-objective L_F + alpha0 L_R), on the tiny model and data of test_unlearn."""

from __future__ import annotations

import json

import pytest

import ref.unlearn as U
from ref.errors import RefError
from ref.plan import Settings, check_settings
from tests.test_unlearn import data_dir, metrics, settings  # noqa: F401 (fixture and the tiny run's settings)


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def tox(tiny_dirs, data_dir, out, **kw):  # noqa: F811
    return settings(tiny_dirs, data_dir, out, goal="toxicity", update_layers=None, **kw)


def test_scaled_is_the_default_and_normalises_eq_6_by_the_first_forget_batch(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    run, st, _ = U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "s", alpha0=30.0))
    assert run.plan.tox_balance == "scaled" and run.plan.meta_retain_weight == 30.0
    first = rows(tmp_path / "s")[0]
    # step 1's forget batch is the scale's batch and the model is still the original: every layer's ratio is 1
    assert first["forget_loss"] == pytest.approx(1.0, abs=1e-6)
    recorded = json.loads((tmp_path / "s/run.json").read_text())["forget_scale"]
    assert recorded == {"rude": first["forget_loss_layers"]}  # s_i: eq. 6's terms of that step, layer by layer
    assert st.forget_scale == {"rude": list(first["forget_loss_layers"].values())}
    summary = (tmp_path / "s/summary.md").read_text()
    assert "- toxicity balance: scaled (ours)" in summary
    share = [r["alpha"] * r["retain_loss"] / r["loss"] for r in rows(tmp_path / "s")]  # 4 steps: 10% is one step
    assert share[0] < 1e-5 < 0.1 < share[-1] < 1  # step 1: the model is the original, L_R is rounding only
    assert f"| retain_share | {share[0]:.4g} | {share[-1]:.4g} |" in summary


def test_paper_balance_sums_eq_6_and_rewards_the_unweighted_sum(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    run, st, _ = U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "p", alpha0=30.0, tox_balance="paper"))
    assert run.plan.meta_retain_weight == 1.0 and st.forget_scale == {}
    for r in rows(tmp_path / "p"):
        assert r["forget_loss"] == pytest.approx(sum(r["forget_loss_layers"].values()), rel=1e-6)
    assert "forget_scale" not in json.loads((tmp_path / "p/run.json").read_text())


def test_scaled_balance_resumes_bit_identically(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt, match="checkpoint of step 2"):
        U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "b"), stop_after_step=2)
    U.unlearn(tox(tiny_dirs, data_dir, tmp_path / "b", resume=True))  # the scales come back from the checkpoint
    assert metrics(tmp_path / "a/metrics.jsonl") == metrics(tmp_path / "b/metrics.jsonl")


def test_a_run_from_before_the_balance_option_resumes_as_the_paper_form(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        U.unlearn(tox(tiny_dirs, data_dir, out, tox_balance="paper"), stop_after_step=2)
    run_json = json.loads((out / "run.json").read_text())
    del run_json["plan"]["tox_balance"]  # what an earlier ref wrote
    (out / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(RefError, match=r"--tox-balance \(paper -> scaled\)"):
        U.unlearn(tox(tiny_dirs, data_dir, out, resume=True))
    U.unlearn(tox(tiny_dirs, data_dir, out, resume=True, tox_balance="paper"))
    assert len(rows(out)) == 4


def test_tox_balance_is_checked():
    with pytest.raises(RefError, match="--tox-balance applies to --method ours --goal toxicity only"):
        check_settings(Settings(goal="wmdp", tox_balance="paper"))
    with pytest.raises(RefError, match="--tox-balance applies"):
        check_settings(Settings(goal="toxicity", method="rmu", tox_balance="scaled"))
    with pytest.raises(RefError, match="--tox-balance is 'sum'; use one of scaled, paper"):
        check_settings(Settings(goal="toxicity", tox_balance="sum"))
    assert U.parse_args(["--goal", "toxicity", "--tox-balance", "paper"]).tox_balance == "paper"


def test_sweep_grid_takes_the_balance_and_the_front_splits_by_it():
    from ref.report import series_of
    from ref.sweep import parse_grid

    grid = parse_grid("tox_balance=paper,scaled lr=1e-3", ["ours"])
    assert grid == {"ours": {"tox_balance": ["paper", "scaled"], "lr": [1e-3]}}
    with pytest.raises(RefError, match="'sum' is not scaled or paper"):
        parse_grid("tox-balance=sum", ["ours"])
    assert series_of(dict(method="ours", grid=dict(tox_balance="paper", lr=1e-3))) == "ours, tox-balance=paper"
    assert series_of(dict(method="rmu", grid=dict(lr=1e-3))) == "rmu"


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo's ours-on-toxicity run, first 12 of its 40 steps, eager, in both balances (registry defaults; ~35 s
    each, most of it the probes' K-fold)."""
    from data_prep.smollm2 import prepare_smollm2

    prepare_smollm2()
    root = tmp_path_factory.mktemp("demo-balance")
    out = {}
    for balance in ("scaled", "paper"):
        s = Settings(model="smollm2-135m", goal="toxicity", data="demo", out=str(root / balance), tox_balance=balance,
                     max_steps=12, compile=False, evaluate=False)  # fmt: skip
        run, st, _ = U.unlearn(s)
        out[balance] = (run, st, rows(root / balance))
    return out


def test_on_the_demo_the_scaled_balance_lets_the_retain_term_constrain(demo_runs):
    """The acceptance of issue 16 on the demo data: with the scaled balance the weighted retain term is a real part of
    the loss by the end (and REINFORCE stays near the measured alpha0), in the paper's form it is ~1e-5 of it."""
    share = lambda rs: sum(r["alpha"] * r["retain_loss"] / r["loss"] for r in rs) / len(rs)  # noqa: E731
    run, st, scaled = demo_runs["scaled"]
    assert run.plan.alpha0 == 100.0 and run.plan.meta_retain_weight == 100.0
    assert scaled[0]["forget_loss"] == pytest.approx(1.0, abs=1e-6)
    assert share(scaled[-4:]) > 0.05  # measured 0.096 (0.64 over the last 4 of all 40 steps)
    assert 50 < st.policy.mean_alpha < 200  # measured 105.5
    _, _, paper = demo_runs["paper"]
    assert paper[0]["forget_loss"] == pytest.approx(11591, rel=1e-3)  # eq. 6 summed: the late layers' 10^3
    assert share(paper[-4:]) < 1e-3  # measured 1.2e-4 (alpha0 100 in the paper's form weighs nothing either)
    # normalised, every probed layer moves; summed, the early layers' terms hardly do
    early = lambda rs: sum(rs[-1]["forget_loss_layers"][i] / rs[0]["forget_loss_layers"][i] for i in "345") / 3  # noqa: E731
    assert early(scaled) < 0.6 * early(paper)  # measured 0.40 against 0.89


def test_a_sweep_from_before_the_balance_option_is_refused_and_pinned(tiny_dirs, data_dir, tmp_path):  # noqa: F811
    from ref import sweep

    s = Settings(model=str(tiny_dirs["llama"]), goal="toxicity", data=str(data_dir), max_len=24, epochs=1,
                 compile=False, eval_limit=1, eval_samples=1, tox_layers=[0, 1, 2])  # fmt: skip
    grid = sweep.parse_grid("lr=1e-2", ["ours"])
    out = tmp_path / "sweep"
    sweep.sweep(s, grid, out)
    assert sweep.selected_settings(out / "sweep.json", s.model, "toxicity")["ours"]["tox_balance"] == "scaled"
    run_json = out / "ours" / "lr=0.01" / "run.json"
    old = json.loads(run_json.read_text())
    del old["plan"]["tox_balance"], old["settings"]["tox_balance"]  # as a ref without the option wrote it
    run_json.write_text(json.dumps(old))
    # table1 --from-sweep runs ours' selected point with the form it ran: the paper's
    assert sweep.selected_settings(out / "sweep.json", s.model, "toxicity")["ours"] == {
        "lr": 0.01,
        "tox_balance": "paper",
    }
    with pytest.raises(RefError, match="holds a run of the paper toxicity balance .* the point's is scaled"):
        sweep.sweep(s, grid, out)  # a finished paper-form point is not mixed into a scaled sweep

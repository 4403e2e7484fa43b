"""ref.run.options: every option of python -m ref.unlearn is defined once, on its Settings field, and the command line,
the checks, the sweep's grid, the resume rule and the options table of docs/usage.md are read off it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

import ref.unlearn as U
from ref.experiments.sweep import GRID_KEYS, parse_grid
from ref.io.errors import RefError
from ref.run.options import Option, add_arguments, grid_keys, options, options_table, resumable
from ref.run.plan import Settings, check_settings

USAGE = Path(__file__).parents[1] / "docs" / "usage.md"


def test_every_setting_is_an_option_with_help():
    for f in dataclasses.fields(Settings):
        opt = f.metadata.get("option")
        assert isinstance(opt, Option), f"Settings.{f.name} is not declared with option(...)"
        assert len(opt.help) > 10, f"Settings.{f.name} has no help text"
        assert (opt.applies is None) == (opt.where == ""), f"Settings.{f.name}: applies and where go together"


def test_the_options_table_in_the_docs_is_the_rendered_one():
    text = USAGE.read_text()
    table = re.search(r"<!-- options:start -->\n(.*?)<!-- options:end -->", text, re.S)
    assert table, "docs/usage.md has no <!-- options:start --> ... <!-- options:end --> block"
    assert table.group(1) == options_table(Settings), "regenerate the table: ref.run.options.options_table(Settings)"


def test_the_command_line_is_the_fields():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Settings)
    assert parser.parse_args([]).__dict__ == dataclasses.asdict(Settings())  # every default is the field's
    s = U.parse_args(
        [
            "--update-layers",
            "3-5,9",
            "--topics",
            "a,b",
            "--probe-l2",
            "auto",
            "--no-compile",
            "--raw-probe-weights",
            "--goal",
            "toxicity",
            "--lr",
            "1e-3",
        ]
    )
    assert (s.update_layers, s.topics, s.probe_l2, s.compile, s.raw_probe_weights) == (
        [3, 4, 5, 9],
        ["a", "b"],
        None,
        False,
        True,
    )
    assert (s.goal, s.lr) == ("toxicity", 1e-3)
    for argv in (["--goal", "nope"], ["--update-layers", "5-3"], ["--lr", "fast"], ["--probe-l2", "x"]):
        with pytest.raises(SystemExit):
            U.parse_args(argv)


def test_checks_and_where_an_option_applies_come_from_the_fields():
    with pytest.raises(RefError, match="--goal is 'x'; use one of wmdp, toxicity"):
        check_settings(Settings(goal="x"))
    with pytest.raises(RefError, match="--epochs is 0; use a whole number > 0"):
        check_settings(Settings(epochs=0))
    with pytest.raises(RefError, match=r"--policy-lr applies to REINFORCE \(--method ours without --alpha\) only"):
        check_settings(Settings(alpha=1.0, policy_lr=0.1))


def test_grid_keys_and_the_resume_rule_come_from_the_fields():
    assert GRID_KEYS == ("layer", *grid_keys(Settings))
    assert {"token_reduction", "master_weights", "tox_retain_reduction", "u_distribution"} <= set(GRID_KEYS)
    assert not {"out", "device", "resume", "eval_limit"} & set(GRID_KEYS)
    assert resumable(Settings) == {
        "lr",
        "max_steps",
        "epochs",
        "save_every",
        "compile",
        "device",
        "evaluate",
        "eval_limit",
        "eval_samples",
        "eval_greedy",
        "log_samples",
    }
    assert U.RESUMABLE == resumable(Settings)
    grid = parse_grid("token-reduction=sum,mean update-layers=3-5/9 master-weights=model", ["ours"])
    assert grid == {
        "ours": {"token_reduction": ["sum", "mean"], "update_layers": [[3, 4, 5, 9]], "master_weights": ["model"]}
    }
    with pytest.raises(RefError, match="'max' is not sum or mean"):
        parse_grid("token-reduction=max", ["ours"])
    assert len(options(Settings)) == len(dataclasses.fields(Settings))

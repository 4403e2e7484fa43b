"""ref/__main__.py: `python -m ref COMMAND` and the `ref` console script dispatch to the commands' mains."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import ref.__main__ as entry

ROOT = Path(__file__).parents[1]


def python_m_ref(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ref", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_help_lists_every_command():
    done = python_m_ref("--help")
    assert done.returncode == 0 and done.stderr == ""
    listed = [line.split()[0] for line in done.stdout.split("commands:\n")[1].splitlines() if line.startswith("  ")]
    assert listed == ["unlearn", "evaluate", "generate", "attack", "sweep", "table1", "report"]
    for name in listed:  # each is a top-level module whose main the dispatch calls
        assert callable(importlib.import_module(f"ref.{name}").main)


def test_a_command_runs_through_python_m_ref(tmp_path):
    done = python_m_ref("report", str(tmp_path))  # ref.report's own check of its argument, its one-line error
    assert done.returncode == 2
    assert (
        done.stderr.startswith("error: ") and "no metrics.jsonl" in done.stderr and len(done.stderr.splitlines()) == 1
    )


def test_an_unknown_or_missing_command_exits_2_with_one_line(capsys):
    assert entry.main(["unlern"]) == 2
    assert capsys.readouterr().err == f"error: unknown command 'unlern'; use one of {', '.join(entry.COMMANDS)}\n"
    assert entry.main([]) == 2
    assert "commands:" in capsys.readouterr().err


def test_the_console_script_is_the_dispatch():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["ref"].split(":")
    assert getattr(importlib.import_module(module), function) is entry.main

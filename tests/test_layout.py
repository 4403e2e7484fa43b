"""The shape of the code: the training step holds no method or goal branch (the objectives own their differences), and
ref/ imports only its declared runtime dependencies at module level."""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from pathlib import Path

import ref.train

REF = Path(ref.train.__file__).parent
BRANCH_WORDS = {"method", "goal", "beta", "tox_balance"}  # what an objective, not the loop, tells apart
RUNTIME = {"torch", "safetensors", "tokenizers", "numpy", "huggingface_hub", "ref"}  # pyproject.toml's dependencies


def branch_words(source: str) -> set[str]:
    """The names and attributes among BRANCH_WORDS that a condition of `source` (if, while, conditional expression,
    comprehension filter, assert, match) reads."""
    tests = []
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.If | ast.IfExp | ast.While | ast.Assert):
            tests.append(node.test)
        elif isinstance(node, ast.comprehension):
            tests += node.ifs
        elif isinstance(node, ast.Match):
            tests.append(node.subject)
    read = {n.id for t in tests for n in ast.walk(t) if isinstance(n, ast.Name)}
    read |= {n.attr for t in tests for n in ast.walk(t) if isinstance(n, ast.Attribute)}
    return read & BRANCH_WORDS


def test_the_step_has_no_method_or_goal_branch():
    assert branch_words(inspect.getsource(ref.train.step)) == set()
    # the check sees such a branch, in any of its forms
    assert branch_words("if plan.beta is not None:\n    c = 1") == {"beta"}
    assert branch_words("x = a if plan.tox_balance == 'scaled' else b") == {"tox_balance"}
    assert branch_words("while method == 'rmu':\n    pass") == {"method"}
    assert branch_words("y = [t for t in taps if run.plan.goal == 'toxicity']") == {"goal"}


def test_ref_imports_only_its_runtime_dependencies_at_module_level():
    """Optional extras (matplotlib, submitit, ...) are imported inside the functions that need them."""
    outside = {}
    for path in sorted(REF.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            top = {n.split(".")[0] for n in names} - RUNTIME - set(sys.stdlib_module_names) - {"__future__"}
            if top:
                outside[str(path.relative_to(REF.parent))] = sorted(top)
    assert outside == {}

"""The prepared data directory: the demo data, manifest validation, --data resolution and batching."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from data_prep import demo
from ref.io.data import batches, load_goal_data, read_mc, resolve_data_dir
from ref.io.errors import RefError


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return demo.write_demo_data(tmp_path_factory.mktemp("data") / "demo")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


# ---------------------------------------------------------------- demo data


def test_demo_wmdp_goal(demo_dir):
    d = load_goal_data(demo_dir, "wmdp")
    assert list(d.forget) == ["demo-astronomy"]
    assert len(d.forget["demo-astronomy"]) == 60 and len(d.retain) == 60
    assert d.eval_forget == {"demo-astronomy": demo_dir / "mc/demo-astronomy.jsonl"}
    assert d.eval_retain == {"demo-general": demo_dir / "mc/demo-general.jsonl"}
    assert (d.mc_mode, d.scorer, d.probe, d.eval_prompts) == ("cloze", None, None, None)
    # short paragraphs, as the forget/retain corpora of the paper are paragraphs, not single sentences
    for text in d.forget["demo-astronomy"] + d.retain + d.heldout:
        assert 40 <= len(text.split()) <= 100, text
    # the retain perplexity's held-out paragraphs: never trained on, the same for both goals
    assert len(d.heldout) == 24 and not set(d.heldout) & set(d.retain)
    assert d.heldout == load_goal_data(demo_dir, "toxicity").heldout


def test_demo_toxicity_goal(demo_dir):
    d = load_goal_data(demo_dir, "toxicity")
    assert list(d.forget) == ["demo-toxic"] and len(d.forget["demo-toxic"]) == 80
    assert d.retain == load_goal_data(demo_dir, "wmdp").retain
    assert (d.scorer, d.eval_forget, list(d.eval_retain)) == ("probe", {}, ["demo-general"])
    assert len(d.probe) == 200 and Counter(label for _, label in d.probe) == {0: 100, 1: 100}
    prompts = [json.loads(line)["prompt"] for line in d.eval_prompts.read_text().splitlines()]
    assert len(prompts) == 30 and len(set(prompts)) == 30
    # the probe overlaps the forget set but is not the same set: 20 of its toxic sentences are new
    forget, probe_toxic = set(d.forget["demo-toxic"]), {t for t, y in d.probe if y == 1}
    assert len(probe_toxic & forget) == 80 and len(probe_toxic - forget) == 20
    assert not {t for t, y in d.probe if y == 0} & forget


def test_demo_forget_and_retain_share_no_text(demo_dir):
    wmdp, tox = load_goal_data(demo_dir, "wmdp"), load_goal_data(demo_dir, "toxicity")
    retain = set(wmdp.retain)
    assert len(retain) == 60 and len(set(wmdp.forget["demo-astronomy"])) == 60  # no duplicates either
    assert not retain & set(wmdp.forget["demo-astronomy"]) and not retain & set(tox.forget["demo-toxic"])


@pytest.mark.parametrize("name", ["demo-astronomy", "demo-general"])
def test_demo_mc_answers_balanced_and_correct(demo_dir, name):
    rows = read_mc(demo_dir / "mc" / f"{name}.jsonl")
    assert len(rows) == 40 and Counter(r["answer"] for r in rows) == {0: 10, 1: 10, 2: 10, 3: 10}
    # independently of demo.py: the correct answer is the first answer column of the source text file
    src = (demo.TEXT_DIR / f"mc_{name.removeprefix('demo-')}.txt").read_text().splitlines()
    fields = [line.split("|") for line in src if line.strip() and not line.startswith("#")]
    correct = [f[-4].strip() for f in fields]
    assert [r["choices"][r["answer"]] for r in rows] == correct
    assert all(len(set(r["choices"])) == 4 and r["subject"] for r in rows)


def test_demo_bytes_deterministic_and_idempotent(demo_dir, tmp_path):
    again = demo.write_demo_data(tmp_path / "again")
    assert _hashes(again) == _hashes(demo_dir) and len(_hashes(again)) == 10  # 9 data files + marker
    mtime = (again / "manifest.json").stat().st_mtime_ns
    assert demo.write_demo_data(again) == again and (again / "manifest.json").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_demo_rewrites_outdated_and_refuses_foreign_folder(tmp_path):
    out = demo.write_demo_data(tmp_path / "demo")
    (out / demo.MARKER).write_text("an older digest\n")
    (out / "forget/demo-astronomy.jsonl").write_text('{"text": "stale"}\n')
    demo.write_demo_data(out)
    assert len(load_goal_data(out, "wmdp").forget["demo-astronomy"]) == 60
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(RefError, match="not a demo data folder"):
        demo.write_demo_data(tmp_path / "mine")
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- --data resolution


def test_resolve_demo_writes_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REF_CACHE", str(tmp_path))
    path = resolve_data_dir("demo")
    assert path == tmp_path / "data" / "demo" and (path / "manifest.json").is_file()
    assert resolve_data_dir(str(path)) == path


def test_resolve_hub_prepares_once_per_goal(tmp_path, monkeypatch):
    monkeypatch.setenv("REF_CACHE", str(tmp_path))
    calls = []

    def prepare_hub_data(out: Path, goals: list[str]) -> Path:
        calls.append(goals)
        out.mkdir(parents=True, exist_ok=True)
        manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
        (out / "manifest.json").write_text(json.dumps(manifest | {g: {} for g in goals}))
        return out

    monkeypatch.setitem(sys.modules, "data_prep.hub", types.SimpleNamespace(prepare_hub_data=prepare_hub_data))
    hub = tmp_path / "data" / "hub"
    assert resolve_data_dir("hub", goal="wmdp") == hub and calls == [["wmdp"]]
    assert resolve_data_dir("hub", goal="wmdp") == hub and calls == [["wmdp"]]  # manifest has it: no call
    assert resolve_data_dir("hub", goal="toxicity") == hub and calls == [["wmdp"], ["toxicity"]]


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir()], ids=["missing", "no-manifest"])
def test_resolve_bad_directory(tmp_path, make):
    make(tmp_path / "x")
    with pytest.raises(RefError, match=r"pass demo, hub, or a prepared data directory"):
        resolve_data_dir(str(tmp_path / "x"))


# ---------------------------------------------------------------- validation


def _write(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


MC_ROW = {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 3}


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A small valid data directory: two forget topics, a retain corpus, a probe, MC sets and prompts."""
    for name in ("a", "b"):
        _write(tmp_path / f"forget/{name}.jsonl", [{"text": f"{name} text {i}"} for i in range(4)])
    _write(tmp_path / "retain/r.jsonl", [{"text": f"retain {i}"} for i in range(4)] + [{"text": "  "}])
    _write(tmp_path / "probe/p.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(8)])
    _write(tmp_path / "mc/m.jsonl", [MC_ROW])
    _write(tmp_path / "prompts/q.jsonl", [{"prompt": "Hello"}])
    manifest = {
        "g": {
            "forget": ["forget/a.jsonl", "forget/b.jsonl"],
            "retain": "retain/r.jsonl",
            "probe": "probe/p.jsonl",
            "eval_forget": ["mc/m.jsonl"],
            "eval_retain": "mc/m.jsonl",
            "eval_prompts": "prompts/q.jsonl",
        }
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_tiny_directory_loads(tiny):
    d = load_goal_data(tiny, "g")
    assert d.forget == {"a": [f"a text {i}" for i in range(4)], "b": [f"b text {i}" for i in range(4)]}
    assert d.retain == [f"retain {i}" for i in range(4)]  # the whitespace-only text is dropped
    assert d.probe == [(f"t{i}", i % 2) for i in range(8)]
    assert d.eval_forget == d.eval_retain == {"m": tiny / "mc/m.jsonl"} and d.eval_prompts == tiny / "prompts/q.jsonl"
    assert (d.mc_mode, d.scorer, d.goal, d.root) == ("letter", None, "g", tiny)
    assert list(load_goal_data(tiny, "g", topics=["b"]).forget) == ["b"]


def _edit_manifest(tiny: Path, **changes) -> None:
    m = json.loads((tiny / "manifest.json").read_text())
    m["g"].update(changes)
    (tiny / "manifest.json").write_text(json.dumps(m))


BAD = {
    "missing manifest": (lambda t: (t / "manifest.json").unlink(), {}, r"has no manifest.json; pass --data demo"),
    "missing goal": (lambda t: None, {"goal": "wmdp"}, r"no entry for goal 'wmdp' \(it has \['g'\]\)"),
    "missing file": (lambda t: (t / "forget/b.jsonl").unlink(), {}, r"g.forget names .*b.jsonl, which does not exist"),
    "bad json line": (
        lambda t: _write(t / "forget/a.jsonl", [{"text": "x"}] * 2 + ['{"text": oops}'] + [{"text": "y"}] * 2),
        {},
        r"a.jsonl line 3 is not valid JSON",
    ),
    "mc with 3 choices": (
        lambda t: _write(t / "mc/m.jsonl", [MC_ROW, "", MC_ROW | {"choices": ["a", "b", "c"]}]),  # a blank line
        {},
        r"m.jsonl line 3: 'choices' must be 4 strings, got 3",
    ),
    "mc answer 4": (lambda t: _write(t / "mc/m.jsonl", [MC_ROW | {"answer": 4}]), {}, r"'answer' is 4, expected"),
    "label 2": (
        lambda t: _write(t / "probe/p.jsonl", [{"text": "x", "label": 2}]),
        {},
        r"p.jsonl line 1: label is 2, expected 0 \(not toxic\) or 1",
    ),
    "text not a string": (
        lambda t: _write(t / "retain/r.jsonl", [{"text": 5}]),
        {},
        r"r.jsonl line 1: field 'text' is int 5, expected str",
    ),
    "too-short corpus": (
        lambda t: _write(t / "forget/b.jsonl", [{"text": "x"}] * 3 + [{"text": ""}]),
        {},
        r"corpus b \(.*\) has only 3 texts; need at least 4",
    ),
    "one-sided probe": (
        lambda t: _write(t / "probe/p.jsonl", [{"text": "x", "label": 1}] * 8),
        {},
        r"has 8 toxic and 0 non-toxic texts; need at least 4 each",
    ),
    "unknown topic": (
        lambda t: None,
        {"topics": ["c"]},
        r"unknown forget topic\(s\) \['c'\]; available .*\['a', 'b'\]",
    ),
    "unknown key": (lambda t: _edit_manifest(t, eval_retian=["mc/m.jsonl"]), {}, r"unknown keys \['eval_retian'\]"),
    "bad mc_mode": (lambda t: _edit_manifest(t, mc_mode="letters"), {}, r"mc_mode is 'letters'; use one of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_validation_errors(tiny, case):
    break_it, kwargs, message = BAD[case]
    break_it(tiny)
    with pytest.raises(RefError, match=message) as err:
        load_goal_data(tiny, **({"goal": "g"} | kwargs))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- manifest paths stay inside the data folder

# one row valid in every role: each reader takes its own fields and ignores the others
ANY_ROLE = [{"text": f"outside {i}", "label": i % 2, "prompt": f"outside {i}"} | MC_ROW for i in range(8)]
ROLES = ["forget", "retain", "probe", "eval_forget", "eval_retain", "eval_prompts"]


@pytest.fixture
def outside(tmp_path_factory) -> Path:
    """A valid data file in a folder next to (not inside) the data folder."""
    path = tmp_path_factory.mktemp("outside") / "x.jsonl"
    _write(path, ANY_ROLE)
    return path


def _escape(kind: str, tiny: Path, target: Path) -> str:
    """A manifest path that leads from the data folder `tiny` to `target` outside it."""
    if kind == "dotdot":
        return os.path.relpath(target, tiny)
    if kind == "absolute":
        return str(target)
    if kind == "symlinked file":
        (tiny / "forget/x.jsonl").symlink_to(target)
        return "forget/x.jsonl"
    (tiny / "ext").symlink_to(target.parent)  # "symlinked folder"
    return "ext/x.jsonl"


ESCAPES = ["dotdot", "absolute", "symlinked file", "symlinked folder"]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind", ESCAPES)
def test_manifest_paths_outside_the_folder_are_refused(tiny, outside, kind, role):
    value = _escape(kind, tiny, outside)
    _edit_manifest(tiny, **{role: value})
    before = _hashes(tiny), _hashes(outside.parent)
    with pytest.raises(RefError) as err:
        load_goal_data(tiny, "g")
    where = "absolute, not relative to" if kind == "absolute" else "outside"
    assert str(err.value) == (
        f"{tiny}/manifest.json: g.{role} names {value}, which is {where} the data folder {tiny}; move the file into "
        "the folder (paths are relative to it), or pass --allow-data-outside"
    )
    assert (_hashes(tiny), _hashes(outside.parent)) == before  # nothing written, nothing changed


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind", ESCAPES)
def test_allow_outside_reads_paths_outside_the_folder(tiny, outside, kind, role):
    value = _escape(kind, tiny, outside)
    _edit_manifest(tiny, **{role: value})
    d = load_goal_data(tiny, "g", allow_outside=True)
    texts = [r["text"] for r in ANY_ROLE]
    want = {
        "forget": (d.forget, {"x": texts}),
        "retain": (d.retain, texts),
        "probe": (d.probe, [(t, i % 2) for i, t in enumerate(texts)]),
        "eval_forget": (d.eval_forget, {"x": tiny / value}),
        "eval_retain": (d.eval_retain, {"x": tiny / value}),
        "eval_prompts": (d.eval_prompts, tiny / value),
    }[role]
    assert want[0] == want[1] and d.allow_outside


def test_paths_that_stay_inside_the_folder_are_fine(tiny, tmp_path_factory):
    _write(tiny / "forget/deep/er/c.jsonl", [{"text": f"c text {i}"} for i in range(4)])
    (tiny / "forget/alias.jsonl").symlink_to("b.jsonl")  # a symlink that stays inside
    _edit_manifest(tiny, forget=["forget/deep/er/c.jsonl", "forget/../forget/a.jsonl", "forget/alias.jsonl"])
    assert sorted(load_goal_data(tiny, "g").forget) == ["a", "alias", "c"]
    link = tmp_path_factory.mktemp("elsewhere") / "data"
    link.symlink_to(tiny)  # the data folder reached through a symlink: both sides are resolved
    assert sorted(load_goal_data(link, "g").forget) == ["a", "alias", "c"]


def test_scorer_files_stay_inside_the_folder(tiny, outside):
    from ref.evaluation.scorers import manifest_scorer_files

    m = json.loads((tiny / "manifest.json").read_text())
    escape = os.path.relpath(outside, tiny)
    m["scorers"] = {"trust": {"weights": "scorer/w.pth", "config": escape}}
    (tiny / "manifest.json").write_text(json.dumps(m))
    before = _hashes(tiny), _hashes(outside.parent)
    with pytest.raises(RefError, match=re.escape(f"scorers.trust.config names {escape}, which is outside the data")):
        manifest_scorer_files(load_goal_data(tiny, "g"), "trust")
    assert (_hashes(tiny), _hashes(outside.parent)) == before
    files = manifest_scorer_files(load_goal_data(tiny, "g", allow_outside=True), "trust")
    assert files == {"weights": tiny / "scorer/w.pth", "config": tiny / escape}


# ---------------------------------------------------------------- batches


def test_batches_deterministic_cover_each_text_once():
    texts = [f"t{i}" for i in range(12)]
    b0 = batches(texts, 4, seed=0, epoch=0)
    assert b0 == batches(texts, 4, seed=0, epoch=0)
    assert [len(b) for b in b0] == [4, 4, 4] and sorted(t for b in b0 for t in b) == sorted(texts)
    assert b0 != batches(texts, 4, seed=0, epoch=1) and b0 != batches(texts, 4, seed=1, epoch=0)
    assert b0 != [texts[0:4], texts[4:8], texts[8:12]]  # actually shuffled


def test_batches_drop_incomplete_last_batch_only_when_a_full_one_exists():
    texts = [f"t{i}" for i in range(10)]
    b = batches(texts, 4, seed=3, epoch=0)
    assert [len(x) for x in b] == [4, 4] and len({t for x in b for t in x}) == 8
    short = batches(texts[:3], 4, seed=3, epoch=0)
    assert len(short) == 1 and sorted(short[0]) == texts[:3]
    assert batches([], 4, seed=0, epoch=0) == []
    with pytest.raises(RefError, match="positive batch size"):
        batches(texts, 0, seed=0, epoch=0)


def test_read_mc_rejects_boolean_answer(tmp_path):
    _write(tmp_path / "m.jsonl", [MC_ROW | {"answer": True}])
    with pytest.raises(RefError, match=re.escape("field 'answer' is bool True, expected int")):
        read_mc(tmp_path / "m.jsonl")

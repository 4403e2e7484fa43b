"""The prepared data directory (docs/design.md section 3): read, validate, and cut into shuffled batches.

A data directory holds plain jsonl files and a `manifest.json` that says, for each goal, which files play
which role:

    {"wmdp": {"forget": ["forget/wmdp-bio.jsonl", "forget/wmdp-cyber.jsonl"], "retain": "retain/wikitext.jsonl",
              "eval_forget": ["mc/wmdp-bio.jsonl"], "eval_retain": ["mc/mmlu.jsonl"], "mc_mode": "letter"},
     "toxicity": {"forget": "forget/paradetox-toxic.jsonl", "retain": "retain/wikitext.jsonl",
                  "probe": "probe/trust.jsonl", "eval_prompts": "prompts/rtp-challenging.jsonl",
                  "eval_retain": ["mc/mmlu.jsonl"], "scorer": "trust"}}

An optional "eval_perplexity" (a path or a list) names held-out texts of the retain kind that the training never
reads (none of them may be in the forget or retain corpora); the evaluation reports their perplexity
(ref.evaluation.perplexity).

Paths are relative to the directory and stay inside it, `..` and symlinks resolved (unless allow_outside).
Row schemas: forget/retain {"text"}, probe {"text", "label" 0/1 (1 = toxic)},
mc {"question", "choices" (4 strings), "answer" 0..3, "subject" (optional)}, prompts {"prompt"}.
Several forget corpora alternate as topics during unlearning, as in the RMU reference; each is named by its
file stem ("wmdp-cyber"). `--data demo` and `--data hub` name directories that data_prep writes on first use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ref.io.errors import RefError
from ref.io.registry import cache_dir

GOALS = ("wmdp", "toxicity")  # the paper's two unlearning goals, each with its data
MC_MODES = ("letter", "cloze")
LIST_KEYS = ("forget", "retain", "eval_forget", "eval_retain", "eval_perplexity")  # a single path or a list of paths
PATH_KEYS = ("probe", "eval_prompts")  # a single path
STR_KEYS = ("mc_mode", "scorer", "probe_source")  # probe_source: where the probe texts come from, in words
PROMPTS_TASK = "rtp"  # the task name of eval_prompts (an MC task is named by its file stem)
LAYOUT_HINT = "see docs/design.md section 3 for the layout"


@dataclass
class GoalData:
    root: Path
    goal: str
    forget: dict[str, list[str]]  # corpus name (file stem) -> texts; the corpora alternate as topics
    retain: list[str]
    probe: list[tuple[str, int]] | None  # (text, label), label 1 = toxic; toxicity only
    eval_forget: dict[str, Path]  # task name (file stem) -> MC jsonl
    eval_retain: dict[str, Path]
    eval_prompts: Path | None
    mc_mode: str  # "letter" (lm-eval format) or "cloze" (length-normalised answer text, for small models)
    scorer: str | None
    manifest: dict  # the raw manifest, all goals
    allow_outside: bool = False  # manifest paths may leave the data folder (also for the scorers' files)
    heldout: list[str] = field(default_factory=list)  # eval_perplexity: texts no training step reads
    probe_path: Path | None = None  # the file the probe texts were read from
    probe_source: str | None = None  # where they come from, in words (the manifest's probe_source)


def _numbered_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs, so that errors about a row can name its line."""
    path = Path(path)
    if not path.is_file():
        raise RefError(f"data file {path} not found; fix the path or re-run the data preparation that writes it")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RefError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8 jsonl") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RefError(f"{path} line {i} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise RefError(f"{path} line {i} is a JSON {type(row).__name__}, not an object; write one object a line")
        rows.append((i, row))
    return rows


def _field(row: dict, key: str, kind: type, path: Path, i: int):
    # bool is a subclass of int: a label or answer of `true` is a mistake, not 1
    if key not in row or not isinstance(row[key], kind) or isinstance(row[key], bool):
        got = "missing" if key not in row else f"{type(row[key]).__name__} {repr(row[key])[:40]}"
        raise RefError(f"{path} line {i}: field {key!r} is {got}, expected {kind.__name__}; fix that line")
    return row[key]


def read_texts(path: Path) -> list[str]:
    """The "text" field of every row; empty or whitespace-only texts are dropped."""
    texts = [_field(row, "text", str, path, i) for i, row in _numbered_rows(path)]
    return [t for t in texts if t.strip()]


def read_probe(path: Path) -> list[tuple[str, int]]:
    """(text, label) rows, label 1 = toxic, 0 = not; empty texts are dropped."""
    out = []
    for i, row in _numbered_rows(path):
        text, label = _field(row, "text", str, path, i), _field(row, "label", int, path, i)
        if label not in (0, 1):
            raise RefError(f"{path} line {i}: label is {label}, expected 0 (not toxic) or 1 (toxic); fix that line")
        if text.strip():
            out.append((text, label))
    return out


def load_probe(path: Path, min_texts: int = 4) -> list[tuple[str, int]]:
    """The probe rows of `path`, with at least `min_texts` of each label."""
    probe = read_probe(path)
    counts = [sum(label == c for _, label in probe) for c in (0, 1)]
    if min(counts) < min_texts:
        raise RefError(
            f"probe {path} has {counts[1]} toxic and {counts[0]} non-toxic texts; need at least {min_texts} each"
        )
    return probe


def read_mc(path: Path) -> list[dict]:
    """Validated multiple-choice rows: question str, choices [4 str], answer int in 0..3, subject str (optional)."""
    numbered = _numbered_rows(path)
    for i, row in numbered:
        _field(row, "question", str, path, i)
        choices = _field(row, "choices", list, path, i)
        if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise RefError(f"{path} line {i}: 'choices' must be 4 strings, got {len(choices)} items; fix that line")
        answer = _field(row, "answer", int, path, i)
        if not 0 <= answer <= 3:
            raise RefError(f"{path} line {i}: 'answer' is {answer}, expected an index 0..3 into choices; fix that line")
        if "subject" in row and not isinstance(row["subject"], str):
            raise RefError(f"{path} line {i}: 'subject' must be a string; fix that line")
    if not numbered:
        raise RefError(f"{path} has no questions; write at least one MC row")
    return [row for _, row in numbered]


def read_prompts(path: Path) -> list[str]:
    """The "prompt" field of every row (non-empty)."""
    prompts = [_field(row, "prompt", str, path, i) for i, row in _numbered_rows(path)]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise RefError(f'{path} has no prompts; write rows of the form {{"prompt": str}}')
    return prompts


def manifest_path(root: Path, name: str, value: str, allow_outside: bool = False) -> Path:
    """root / value for the manifest entry `name` (e.g. "wmdp.forget"). Unless allow_outside, the path must be
    relative and stay inside root once `..` and symlinks are resolved: a data folder may come from someone else,
    and its manifest must not make a run read (and train on) files elsewhere."""
    path = root / value
    if allow_outside:
        return path
    real_root = os.path.realpath(root)
    inside = os.path.commonpath([real_root, os.path.realpath(path)]) == real_root
    if os.path.isabs(value) or not inside:
        where = "absolute, not relative to" if os.path.isabs(value) else "outside"
        raise RefError(
            f"{root}/manifest.json: {name} names {value}, which is {where} the data folder {root}; move the file "
            "into the folder (paths are relative to it), or pass --allow-data-outside"
        )
    return path


def _paths(root: Path, goal: str, key: str, value, allow_outside: bool) -> list[Path]:
    """One manifest entry (a path or a list of paths) -> existing files under root."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise RefError(f"{root}/manifest.json: {goal}.{key} must be a path or a non-empty list of paths")
    paths = [manifest_path(root, f"{goal}.{key}", v, allow_outside) for v in values]
    for p in paths:
        if not p.is_file():
            raise RefError(
                f"{goal}.{key} names {p}, which does not exist; fix {root}/manifest.json or re-run data_prep"
            )
    return paths


def _by_stem(paths: list[Path], goal: str, key: str) -> dict[str, Path]:
    named = {p.stem: p for p in paths}
    if len(named) != len(paths):
        raise RefError(f"{goal}.{key} has two files with the same name stem; rename one (the stem names the corpus)")
    return named


def load_goal_data(
    data_dir: Path,
    goal: str,
    min_texts: int = 4,
    topics: list[str] | None = None,
    allow_outside: bool = False,
    training: bool = True,
) -> GoalData:
    """Read and validate everything the manifest names for `goal`; errors are RefError with a one-line fix.

    Texts (forget, retain, probe) are loaded; MC and prompt files are validated here but returned as paths,
    since evaluation reads them itself. `topics` keeps only the named forget corpora. Every path must stay inside
    the data folder unless `allow_outside` (see manifest_path). training=False (evaluation only): the forget and
    retain corpora are not required and the forget corpora are not read; the retain corpus and the probe file are
    read only for the probe scorer (a goal with prompts and scorer "probe"), which trains on them.
    """
    root = Path(data_dir)
    manifest, entry = read_manifest(root, goal, training)

    def files(key: str) -> list[Path]:
        return _paths(root, goal, key, entry[key], allow_outside)

    probe_scorer = "eval_prompts" in entry and entry.get("scorer") == "probe"
    read = lambda key: key in entry and (training or probe_scorer)
    forget = forget_corpora(files("forget"), goal, topics, min_texts) if training else {}
    retain = [t for p in files("retain") for t in corpus(p, min_texts)] if read("retain") else []
    heldout = heldout_texts(root, goal, files("eval_perplexity"), forget, retain) if "eval_perplexity" in entry else []
    probe_path = files("probe")[0] if read("probe") else None
    probe = None if probe_path is None else load_probe(probe_path, min_texts)
    evals = {key: _by_stem(files(key), goal, key) if key in entry else {} for key in ("eval_forget", "eval_retain")}
    for path in [*evals["eval_forget"].values(), *evals["eval_retain"].values()]:
        read_mc(path)
    prompts = files("eval_prompts")[0] if "eval_prompts" in entry else None
    if prompts is not None:
        read_prompts(prompts)
    mc_mode = entry.get("mc_mode", "letter")
    if mc_mode not in MC_MODES:
        raise RefError(f"{root / 'manifest.json'}: {goal}.mc_mode is {mc_mode!r}; use one of {list(MC_MODES)}")
    return GoalData(
        root=root,
        goal=goal,
        forget=forget,
        retain=retain,
        probe=probe,
        probe_path=probe_path,
        probe_source=entry.get("probe_source"),
        eval_forget=evals["eval_forget"],
        eval_retain=evals["eval_retain"],
        eval_prompts=prompts,
        mc_mode=mc_mode,
        scorer=entry.get("scorer"),
        manifest=manifest,
        allow_outside=allow_outside,
        heldout=heldout,
    )


def read_manifest(root: Path, goal: str, training: bool) -> tuple[dict, dict]:
    """manifest.json of a data folder and its entry for `goal`, checked: every key known, the forget and retain
    corpora named when training, a single path or word where one goes."""
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise RefError(
            f"{root} has no manifest.json; pass --data demo, --data hub, or a directory with one ({LAYOUT_HINT})"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefError(f"{mpath} is not valid JSON ({e}); fix it ({LAYOUT_HINT})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get(goal), dict):
        have = sorted(k for k, v in manifest.items() if isinstance(v, dict)) if isinstance(manifest, dict) else []
        raise RefError(f"{mpath} has no entry for goal {goal!r} (it has {have}); add one or choose another goal")
    entry = manifest[goal]
    unknown = sorted(set(entry) - set(LIST_KEYS + PATH_KEYS + STR_KEYS))
    if unknown:
        raise RefError(
            f"{mpath}: unknown keys {unknown} for goal {goal!r}; known: {list(LIST_KEYS + PATH_KEYS + STR_KEYS)}"
        )
    for key in ("forget", "retain") if training else ():
        if key not in entry:
            raise RefError(f"{mpath}: goal {goal!r} has no {key!r} entry; name its {key} corpus file(s)")
    for key in PATH_KEYS + STR_KEYS:
        if key in entry and not isinstance(entry[key], str):
            raise RefError(f"{mpath}: {goal}.{key} must be a string")
    return manifest, entry


def corpus(path: Path, min_texts: int) -> list[str]:
    """The texts of a corpus file (named by its stem), at least `min_texts` of them."""
    texts = read_texts(path)
    if len(texts) < min_texts:
        raise RefError(f"corpus {path.stem} ({path}) has only {len(texts)} texts; need at least {min_texts}")
    return texts


def forget_corpora(paths: list[Path], goal: str, topics: list[str] | None, min_texts: int) -> dict[str, list[str]]:
    """Topic (a file's stem) -> its forget texts; only the `topics` named, when given."""
    forget = {name: corpus(path, min_texts) for name, path in _by_stem(paths, goal, "forget").items()}
    if topics is None:
        return forget
    missing = [t for t in topics if t not in forget]
    if missing or not topics:
        raise RefError(f"unknown forget topic(s) {missing or topics}; available for {goal!r}: {sorted(forget)}")
    return {t: forget[t] for t in topics}


def heldout_texts(root: Path, goal: str, paths: list[Path], forget: dict, retain: list[str]) -> list[str]:
    """The texts of the retain perplexity task, none of them (up to whitespace) in the forget or retain corpora."""
    mpath = root / "manifest.json"
    heldout = [t for p in paths for t in read_texts(p)]
    if not heldout:
        raise RefError(
            f'{mpath}: {goal}.eval_perplexity names files without texts; write rows of the form {{"text": str}}'
        )
    trained = {normalized(t) for t in retain}.union(*({normalized(t) for t in f} for f in forget.values()))
    seen = [t for t in heldout if normalized(t) in trained]
    if seen:
        raise RefError(
            f"{mpath}: {goal}.eval_perplexity holds {len(seen)} text(s) that the training reads too, up to whitespace "
            f"(e.g. {seen[0][:40]!r}); held-out texts must not be in the forget or retain corpora"
        )
    return heldout


def normalized(text: str) -> str:
    """The text with its whitespace collapsed to single spaces and stripped: two texts that differ only there are
    the same text for the held-out check."""
    return " ".join(text.split())


def prepared_hub_dir(goal: str | None = None) -> Path | None:
    """The hub data folder in the cache if it is prepared (for `goal`, when given), else None; downloads nothing."""
    out = cache_dir() / "data" / "hub"
    mpath = out / "manifest.json"
    if not mpath.is_file():
        return None
    try:
        prepared = json.loads(mpath.read_text(encoding="utf-8"))
    except ValueError:
        raise RefError(f"{mpath} is corrupt; delete {out} to prepare the hub data again") from None
    return out if goal is None or goal in prepared else None


def resolve_data_dir(data: str, goal: str | None = None) -> Path:
    """--data value -> a directory with manifest.json.

    "demo": the project's own small offline data, written into the cache on first use.
    "hub": the paper's datasets, downloaded and converted on first use (only what `goal` needs, when given).
    Anything else: an existing directory with a manifest.json.
    """
    if data == "demo":
        from data_prep.demo import write_demo_data  # lazy: ref does not need data_prep otherwise

        return write_demo_data(cache_dir() / "data" / "demo")
    if data == "hub":
        out = prepared_hub_dir(goal)
        if out is not None:
            return out
        from data_prep.hub import prepare_hub_data  # lazy: it needs pyarrow and network access to the hub

        return prepare_hub_data(cache_dir() / "data" / "hub", goals=[goal] if goal else list(GOALS))
    path = Path(data).expanduser()
    if not (path / "manifest.json").is_file():
        what = "has no manifest.json" if path.is_dir() else "is not a directory"
        raise RefError(f"--data {data}: {path} {what}; pass demo, hub, or a prepared data directory ({LAYOUT_HINT})")
    return path


def batches(texts: list[str], batch_size: int, seed: int, epoch: int) -> list[list[str]]:
    """One epoch of `texts` in batches, shuffled deterministically per (seed, epoch).

    The last incomplete batch is dropped when there is at least one full batch; with fewer texts than
    batch_size the whole (shuffled) corpus is one short batch.
    """
    if batch_size < 1:
        raise RefError(f"batch size is {batch_size}; use a positive batch size")
    order = np.random.default_rng([seed, epoch]).permutation(len(texts))
    shuffled = [texts[i] for i in order]
    n = len(shuffled) // batch_size * batch_size or len(shuffled)
    return [shuffled[i : i + batch_size] for i in range(0, n, batch_size)]

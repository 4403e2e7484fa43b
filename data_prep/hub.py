"""The paper's data from the Hugging Face hub, converted into the data directory of docs/design.md section 3.

Files are fetched with `huggingface_hub.snapshot_download(allow_patterns=...)`: the patterns are the shard
globs of each dataset card's `data_files` (for example `wmdp-bio/test-*.parquet`), so a dataset re-sharded
on the hub still resolves. Parquet is read with pyarrow (an extra: `pip install pyarrow`); what we write is
plain jsonl, so `ref/` never needs pyarrow.

    goal      role          file                           from
    wmdp      forget        forget/wmdp-bio.jsonl          cais/wmdp-bio-forget-corpus (gated, needs HF_TOKEN)
              forget        forget/wmdp-cyber.jsonl        cais/wmdp-corpora cyber-forget-corpus
              retain        retain/wikitext.jsonl          Salesforce/wikitext wikitext-2-raw-v1 test (as RMU)
              eval_perplexity retain/wikitext-validation.jsonl  the same, validation split (never trained on)
              eval_forget   mc/wmdp-{bio,cyber}.jsonl      cais/wmdp (mc/wmdp-chem.jsonl is written too)
              eval_retain   mc/mmlu.jsonl                  cais/mmlu all test
    toxicity  forget        forget/paradetox-toxic.jsonl   s-nlp/paradetox train.tsv, toxic side deduplicated
              retain        retain/wikitext.jsonl
              probe         probe/trust.jsonl              a local TRuST file (--probe-file), else
                            probe/paradetox.jsonl          ParaDetox toxic (1) / neutral (0) sides
              eval_prompts  prompts/rtp-challenging.jsonl  allenai/real-toxicity-prompts, challenging only
              eval_retain   mc/mmlu.jsonl
              scorer        scorer/trust/*                 berkatil/TRuST_toxicity_classifier + bert-base-uncased

Every file is written once (temp file + rename) and skipped when it exists, so an interrupted run resumes
and a complete one downloads nothing. manifest.json is merged and written last; sources.json records the
repository revision each file came from.

    python -m data_prep.hub --goals wmdp,toxicity [--out DIR] [--probe-file F] [--allow-missing-bio]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from ref.io.data import GOALS
from ref.io.errors import RefError
from ref.io.registry import cache_dir

BIO_FORGET_REPO = "cais/wmdp-bio-forget-corpus"
# cais/wmdp config -> the subject named in lm-eval's description "... (with answers) about biology."
WMDP_SUBJECTS = {"bio": "biology", "cyber": "cybersecurity", "chem": "chemistry"}
WIKITEXT = "retain/wikitext.jsonl"
WIKITEXT_HELDOUT = "retain/wikitext-validation.jsonl"  # the retain perplexity task (ref.evaluation.perplexity)
MMLU = "mc/mmlu.jsonl"
TRUST_FILES = {  # manifest key -> (repo, file in the repo); written to scorer/trust/<file>
    "weights": ("berkatil/TRuST_toxicity_classifier", "toxicity_classifier.pth"),
    "config": ("google-bert/bert-base-uncased", "config.json"),
    "tokenizer": ("google-bert/bert-base-uncased", "tokenizer.json"),
}


def _log(msg: str) -> None:
    print(f"[hub] {msg}", file=sys.stderr, flush=True)


class GatedError(RefError):
    """The hub refused a gated repository: no token, or access not granted yet."""


def _download(repo: str, patterns: list[str], repo_type: str = "dataset") -> tuple[list[Path], str | None]:
    """The files of `repo` matching `patterns` (in pattern, then name order) and the snapshot's revision."""
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    _log(f"fetching {repo} {' '.join(patterns)}")
    try:
        root = Path(snapshot_download(repo, repo_type=repo_type, allow_patterns=patterns))
    except GatedRepoError as e:
        raise GatedError(f"{repo} is gated: request access at {page}, then set HF_TOKEN (or `hf auth login`)") from e
    except RepositoryNotFoundError as e:
        raise RefError(f"hub repository {repo} not found (or private without a token): check {page}") from e
    except LocalEntryNotFoundError as e:
        raise RefError(f"cannot download {repo}: no connection to the hub and not in its cache; retry online") from e
    except HfHubHTTPError as e:
        raise RefError(f"downloading {repo} failed: {str(e).splitlines()[0]}") from e
    files = list(dict.fromkeys(p for pattern in patterns for p in sorted(root.glob(pattern)) if p.is_file()))
    if not files:
        raise RefError(f"{repo} has no file matching {' '.join(patterns)}: its layout changed; update data_prep/hub.py")
    revision = root.name if re.fullmatch(r"[0-9a-f]{40}", root.name) else None  # the hub cache's snapshots/<sha>
    return files, revision


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary sibling of `path`, then rename it into place: no half-written files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the data directory is meant to be readable
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _write_atomic(path, write)


def _write_json(path: Path, obj: dict) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def _link_or_copy(src: Path, dst: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(src.resolve(), tmp)  # the hub cache holds the bytes already; a hard link costs no disk
        except OSError:
            shutil.copyfile(src, tmp)

    _write_atomic(dst, write)


def _read_parquet(files: list[Path], columns: list[str]) -> list[dict]:
    """The rows of all shards, only `columns`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RefError("reading the hub's parquet files needs pyarrow: pip install pyarrow") from None
    rows = []
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise RefError(f"{f.name} has no column(s) {missing} (it has {names}): the hub schema changed")
        rows += pq.read_table(f, columns=columns).to_pylist()
    return rows


MIN_CHARS = 50  # the RMU reference's get_data(min_len=50): it keeps WMDP forget texts and WikiText lines longer


def _texts(rows: list[dict], min_chars: int = 0) -> list[dict]:
    """{"text"} rows, verbatim; whitespace-only texts and texts of min_chars characters or fewer dropped."""
    return [{"text": r["text"]} for r in rows if r["text"] and r["text"].strip() and len(r["text"]) > min_chars]


def _mc(rows: list[dict], source: str, subject: str | None = None) -> list[dict]:
    """MC rows of docs/design.md section 3.3; `subject` is the text of lm-eval's description, "about {subject}."."""
    out = []
    for i, r in enumerate(rows):
        choices, answer = list(r["choices"]), r["answer"]
        if len(choices) != 4 or not 0 <= answer < 4:
            raise RefError(
                f"{source} row {i}: {len(choices)} choices, answer {answer}; expected 4 choices, answer 0..3"
            )
        out.append(
            {
                "question": r["question"],
                "choices": choices,
                "answer": int(answer),
                "subject": subject or r["subject"].replace("_", " "),
            }
        )
    return out


def _read_tsv(path: Path, columns: list[str]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise RefError(f"{path.name} has no column(s) {missing} (it has {reader.fieldnames}): the schema changed")
        return list(reader)


def _unique(texts: list[str | None]) -> list[str]:
    """Stripped, non-empty, first occurrence kept."""
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def _paradetox_toxic(files: list[Path]) -> list[dict]:
    rows = _read_tsv(files[0], ["en_toxic_comment", "en_neutral_comment"])
    return [{"text": t} for t in _unique([r["en_toxic_comment"] for r in rows])]


def _paradetox_probe(files: list[Path]) -> list[dict]:
    """Toxic side label 1, neutral side label 0, each deduplicated; a text on both sides stays toxic only."""
    rows = _read_tsv(files[0], ["en_toxic_comment", "en_neutral_comment"])
    toxic = _unique([r["en_toxic_comment"] for r in rows])
    toxic_set = set(toxic)
    neutral = [t for t in _unique([r["en_neutral_comment"] for r in rows]) if t not in toxic_set]
    return [{"text": t, "label": 1} for t in toxic] + [{"text": t, "label": 0} for t in neutral]


def _rtp_challenging(files: list[Path]) -> list[dict]:
    out = []
    with open(files[0], encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("challenging") is True:
                    out.append({"prompt": row["prompt"]["text"]})
    return out


def _label(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)
    raise ValueError(value)


def read_probe_file(path: Path) -> list[dict]:
    """A local TRuST probe file, jsonl or csv/tsv with columns text and label (1 = toxic, 0 = not)."""
    path = Path(path)
    if not path.is_file():
        raise RefError(f"probe file {path} not found; pass a jsonl or csv file of (text, label) rows")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix in (".jsonl", ".json"):
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise RefError(
                f"probe file {path} is not JSON lines ({e.msg}); write one {{text, label}} object a line"
            ) from None
    else:
        raise RefError(f"probe file {path}: unknown format {suffix!r}; use .jsonl, .csv or .tsv")
    out = []
    for i, r in enumerate(rows, start=1):
        text = r.get("text") if isinstance(r, dict) else None
        try:
            label = _label(r.get("label") if isinstance(r, dict) else None)
        except ValueError:
            label = None
        if not isinstance(text, str) or label is None:
            raise RefError(f"probe file {path} row {i}: needs a string 'text' and a 'label' of 0 or 1; fix that row")
        if text.strip():
            out.append({"text": text, "label": label})
    if len({r["label"] for r in out}) < 2:
        raise RefError(f"probe file {path} needs both toxic (1) and non-toxic (0) rows")
    return out


class _Prep:
    """Writes files under `out`, each once, and remembers where each came from (for sources.json)."""

    def __init__(self, out: Path):
        self.out = out
        self.sources: dict[str, dict] = {}

    def file(self, rel: str, repo: str, patterns: list[str], convert: Callable[[list[Path]], list[dict]]) -> None:
        path = self.out / rel
        if path.is_file():
            _log(f"{rel}: already there")
            return
        files, revision = _download(repo, patterns)
        try:
            rows = convert(files)
        except RefError:
            raise
        except (KeyError, TypeError, ValueError) as e:  # a field missing or of another type
            raise RefError(
                f"{repo}: unexpected data for {rel} ({type(e).__name__}: {e}); the hub schema changed"
            ) from e
        if not rows:
            raise RefError(f"{repo} {' '.join(patterns)} gave no rows for {rel}: the hub data changed")
        _write_jsonl(path, rows)
        self.sources[rel] = {"repo": repo, "revision": revision, "files": patterns}
        _log(f"{rel}: {len(rows)} rows")

    def copy(self, rel: str, repo: str, filename: str) -> None:
        path = self.out / rel
        if path.is_file():
            _log(f"{rel}: already there")
            return
        (src,), revision = _download(repo, [filename], repo_type="model")
        _link_or_copy(src, path)
        self.sources[rel] = {"repo": repo, "revision": revision, "files": [filename]}
        _log(f"{rel}: {path.stat().st_size} bytes")


def _shared(prep: _Prep) -> None:
    """WikiText-2 (retain: test split; eval_perplexity: validation split) and MMLU (eval_retain), both goals."""
    wikitext = lambda files: _texts(_read_parquet(files, ["text"]), MIN_CHARS)
    prep.file(WIKITEXT, "Salesforce/wikitext", ["wikitext-2-raw-v1/test-*.parquet"], wikitext)
    prep.file(WIKITEXT_HELDOUT, "Salesforce/wikitext", ["wikitext-2-raw-v1/validation-*.parquet"], wikitext)
    mmlu = lambda files: _mc(_read_parquet(files, ["question", "subject", "choices", "answer"]), "cais/mmlu")
    prep.file(MMLU, "cais/mmlu", ["all/test-*.parquet"], mmlu)


def _prepare_wmdp(prep: _Prep, allow_missing_bio: bool) -> dict:
    text = lambda files: _texts(_read_parquet(files, ["text"]), MIN_CHARS)
    prep.file("forget/wmdp-cyber.jsonl", "cais/wmdp-corpora", ["cyber-forget-corpus/train-*.parquet"], text)
    topics = ["bio", "cyber"]
    try:
        prep.file("forget/wmdp-bio.jsonl", BIO_FORGET_REPO, ["data/train-*.parquet"], text)
    except GatedError as e:
        if not allow_missing_bio:
            raise RefError(f"{e}; or pass --allow-missing-bio to unlearn the cyber corpus alone") from e
        _log(f"warning: {BIO_FORGET_REPO} is gated and not accessible (set HF_TOKEN): going on with cyber only")
        topics = ["cyber"]
    for name, subject in WMDP_SUBJECTS.items():
        mc = lambda files, s=subject: _mc(_read_parquet(files, ["question", "choices", "answer"]), "cais/wmdp", s)
        prep.file(f"mc/wmdp-{name}.jsonl", "cais/wmdp", [f"wmdp-{name}/test-*.parquet"], mc)
    _shared(prep)
    return {
        "forget": [f"forget/wmdp-{t}.jsonl" for t in topics],
        "retain": WIKITEXT,
        "eval_forget": [f"mc/wmdp-{t}.jsonl" for t in topics],  # chem has no forget corpus: not an eval target
        "eval_retain": [MMLU],
        "eval_perplexity": [WIKITEXT_HELDOUT],
        "mc_mode": "letter",
    }


PARADETOX_PROBE_SOURCE = (
    "ParaDetox toxic/neutral pairs (s-nlp/paradetox train.tsv), not the paper's TRuST human-annotated training split"
)


def _prepare_toxicity(prep: _Prep, probe_file: Path | None) -> dict:
    prep.file("forget/paradetox-toxic.jsonl", "s-nlp/paradetox", ["train.tsv"], _paradetox_toxic)
    if probe_file is not None:
        probe = "probe/trust.jsonl"
        rows = read_probe_file(probe_file)  # a local file: converted again on every run, it may have changed
        _write_jsonl(prep.out / probe, rows)
        prep.sources[probe] = {"file": str(Path(probe_file).resolve())}
        _log(f"{probe}: {len(rows)} rows from {probe_file}")
        source = f"the file {Path(probe_file).name} given to data_prep.hub --probe-file"
    else:
        probe = "probe/paradetox.jsonl"
        prep.file(probe, "s-nlp/paradetox", ["train.tsv"], _paradetox_probe)
        source = PARADETOX_PROBE_SOURCE
    prep.file("prompts/rtp-challenging.jsonl", "allenai/real-toxicity-prompts", ["prompts.jsonl"], _rtp_challenging)
    for repo, filename in TRUST_FILES.values():
        prep.copy(f"scorer/trust/{filename}", repo, filename)
    _shared(prep)
    return {
        "forget": ["forget/paradetox-toxic.jsonl"],
        "retain": WIKITEXT,
        "probe": probe,
        "probe_source": source,
        "eval_prompts": "prompts/rtp-challenging.jsonl",
        "eval_retain": [MMLU],
        "eval_perplexity": [WIKITEXT_HELDOUT],
        "mc_mode": "letter",
        "scorer": "trust",
    }


def _merge_json(path: Path, update: dict) -> None:
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    _write_json(path, {**old, **update})


def prepare_hub_data(
    out: Path, goals: list[str], probe_file: Path | None = None, allow_missing_bio: bool = False
) -> Path:
    """Download what `goals` need and write the data directory `out` (docs/design.md section 3); return `out`.

    Files already in `out` are kept (nothing is downloaded for them); manifest.json is merged, not replaced,
    and written last, so it only names files that exist.
    """
    out = Path(out)
    unknown = [g for g in goals if g not in GOALS]
    if unknown or not goals:
        raise RefError(f"unknown goal(s) {unknown or goals}; choose from {', '.join(GOALS)}")
    prep = _Prep(out)
    entries = {}
    try:
        if "wmdp" in goals:
            entries["wmdp"] = _prepare_wmdp(prep, allow_missing_bio)
        if "toxicity" in goals:
            entries["toxicity"] = _prepare_toxicity(prep, probe_file)
            # the goal entry names the scorer; its files are listed at the top level, by scorer name
            entries["scorers"] = {"trust": {key: f"scorer/trust/{f}" for key, (_, f) in TRUST_FILES.items()}}
    finally:  # keep the provenance of what was written, even when a later download fails
        if prep.sources:
            _merge_json(out / "sources.json", prep.sources)
    _merge_json(out / "manifest.json", entries)
    _log(f"wrote {out / 'manifest.json'} ({', '.join(goals)})")
    return out


def main(argv: list[str] | None = None) -> None:
    default_out = cache_dir() / "data" / "hub"
    p = argparse.ArgumentParser(description="Download the paper's hub datasets into a ref data directory.")
    p.add_argument("--goals", default=",".join(GOALS), help=f"comma-separated, from {', '.join(GOALS)} (default: all)")
    p.add_argument("--out", type=Path, default=default_out, help=f"data directory to write (default: {default_out})")
    p.add_argument("--probe-file", type=Path, default=None, help="local TRuST probe data: jsonl or csv of text,label")
    p.add_argument(
        "--allow-missing-bio",
        action="store_true",
        help=f"if {BIO_FORGET_REPO} is not accessible, go on with the cyber forget corpus alone",
    )
    args = p.parse_args(argv)
    goals = [g.strip() for g in args.goals.split(",") if g.strip()]
    try:
        path = prepare_hub_data(args.out, goals, probe_file=args.probe_file, allow_missing_bio=args.allow_missing_bio)
    except RefError as e:
        sys.exit(f"error: {e}")
    print(path)


if __name__ == "__main__":
    main()

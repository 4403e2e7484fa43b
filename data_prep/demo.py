"""The project's own small demo data, in the data-directory layout of docs/design.md section 3, for both goals.

Every sentence was written for this project (the texts live in data_prep/demo_text/, one item a line).
The demo stands in benign topics for the paper's data so the whole pipeline runs offline on SmolLM2-135M:

- wmdp: forget the solar system (60 paragraphs), keep general knowledge (60 paragraphs on cooking,
  geography, history, sports, animals and music); evaluated by 40 + 40 easy 4-choice questions scored in
  cloze form (SmolLM2-135M is at chance in the letter format), and by the perplexity of 24 held-out paragraphs
  on the same subjects (never trained on; both goals).
- toxicity: forget 80 rude sentences; a probe set of 100 rude and 100 neutral sentences (polite
  paraphrases of rude ones, as in ParaDetox, plus ordinary sentences; 20 of its rude sentences are not in
  the forget set); 30 prompt beginnings to continue; toxicity is scored by a probe on the frozen model.

The output is byte-for-byte deterministic and written atomically (a temp folder renamed into place).

    python -m data_prep.demo --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ref.io.errors import RefError

TEXT_DIR = Path(__file__).parent / "demo_text"
MARKER = ".complete"  # written last; holds the digest of the files, so edited demo texts are rewritten
N_FORGET_TOXIC = 80
N_PROBE_PARAPHRASES = 70  # neutral side of the probe: 70 polite paraphrases + 30 ordinary sentences


def _lines(name: str) -> list[str]:
    """Non-empty lines of a demo_text file, without the '#' comment lines."""
    lines = (TEXT_DIR / name).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.startswith("#")]


def _mc(rows: list[list[str]], subject: str | None = None) -> list[dict]:
    """[subject?, question, correct, wrong, wrong, wrong] rows -> MC rows; answer positions cycle A, B, C, D."""
    out = []
    for i, row in enumerate(rows):
        subj, (question, correct, *wrong) = (subject, row) if subject else (row[0], row[1:])
        choices = wrong[: i % 4] + [correct] + wrong[i % 4 :]
        out.append({"question": question, "choices": choices, "answer": i % 4, "subject": subj})
    return out


def _split(name: str, sep: str) -> list[list[str]]:
    return [[f.strip() for f in line.split(sep)] for line in _lines(name)]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def demo_files() -> dict[str, bytes]:
    """Relative path -> file contents of the whole demo data directory (manifest included)."""
    pairs = _split("toxic_pairs.tsv", "\t")
    toxic, polite = [p[0] for p in pairs], [p[1] for p in pairs]
    neutral = polite[:N_PROBE_PARAPHRASES] + _lines("neutral.txt")
    probe = [
        row for t, n in zip(toxic, neutral, strict=True) for row in ({"text": t, "label": 1}, {"text": n, "label": 0})
    ]
    manifest = {
        "wmdp": {
            "forget": ["forget/demo-astronomy.jsonl"],
            "retain": "retain/demo-general.jsonl",
            "eval_forget": ["mc/demo-astronomy.jsonl"],
            "eval_retain": ["mc/demo-general.jsonl"],
            "eval_perplexity": ["retain/demo-general-heldout.jsonl"],
            "mc_mode": "cloze",
        },
        "toxicity": {
            # the last 80 rude sentences: the first 20 appear only in the probe set
            "forget": ["forget/demo-toxic.jsonl"],
            "retain": "retain/demo-general.jsonl",
            "probe": "probe/demo-probe.jsonl",
            "probe_source": (
                "the project's demo sentences (100 rude, 100 neutral), not the paper's TRuST training split"
            ),
            "eval_prompts": "prompts/demo-prompts.jsonl",
            "eval_retain": ["mc/demo-general.jsonl"],
            "eval_perplexity": ["retain/demo-general-heldout.jsonl"],
            "mc_mode": "cloze",
            "scorer": "probe",
        },
    }
    return {
        "manifest.json": (json.dumps(manifest, indent=2) + "\n").encode("utf-8"),
        "forget/demo-astronomy.jsonl": _jsonl([{"text": t} for t in _lines("astronomy.txt")]),
        "forget/demo-toxic.jsonl": _jsonl([{"text": t} for t in toxic[-N_FORGET_TOXIC:]]),
        "retain/demo-general.jsonl": _jsonl([{"text": t} for t in _lines("general.txt")]),
        "retain/demo-general-heldout.jsonl": _jsonl([{"text": t} for t in _lines("general_heldout.txt")]),
        "mc/demo-astronomy.jsonl": _jsonl(_mc(_split("mc_astronomy.txt", "|"), subject="astronomy")),
        "mc/demo-general.jsonl": _jsonl(_mc(_split("mc_general.txt", "|"))),
        "probe/demo-probe.jsonl": _jsonl(probe),
        "prompts/demo-prompts.jsonl": _jsonl([{"prompt": p} for p in _lines("prompts.txt")]),
    }


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    return h.hexdigest()


def write_demo_data(out: Path) -> Path:
    """Write the demo data directory to `out` unless it is already complete and current; return `out`."""
    out = Path(out)
    files = demo_files()
    digest = _digest(files)
    marker = out / MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        return out
    if out.exists() and not marker.is_file() and (not out.is_dir() or any(out.iterdir())):
        raise RefError(f"{out} exists and is not a demo data folder; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / MARKER).write_text(digest + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; data folders are meant to be readable
        if out.exists():  # an outdated demo folder (or an empty one): move it aside, then swap the new one in
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            shutil.rmtree(old)
        try:
            os.replace(tmp, out)
        except OSError:  # another process put a folder there first; fine if it is complete and current
            if not (marker.is_file() and marker.read_text().strip() == digest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the project's small offline demo data directory.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced if outdated)")
    args = parser.parse_args()
    print(write_demo_data(args.out))


if __name__ == "__main__":
    main()

"""data_prep.hub: the hub datasets -> the data directory of docs/design.md section 3, without network.

A fake hub is built in tmp_path from tiny files in each repository's real layout and schema (parquet
shards under config folders, train.tsv, prompts.jsonl, model files); `snapshot_download` is replaced by a
function that copies the files matching `allow_patterns` (fnmatch, as the hub filters them) into a
snapshot folder named by a 40-hex revision, like the hub cache.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.errors import GatedRepoError

from data_prep import hub
from ref.io.data import load_goal_data
from ref.io.errors import RefError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

LONG = ", long enough to pass the 50-character minimum"  # the RMU reference keeps texts of more than 50 characters
CYBER = ["cyber text one" + LONG, "", "cyber text two" + LONG, "  \n", "a short cyber line", "cyber text three" + LONG]
BIO_SHARDS = [["bio a" + LONG, "bio b" + LONG], ["bio c" + LONG, "", "bio d, too short"]]
BIO = [BIO_SHARDS[0][0], BIO_SHARDS[0][1], BIO_SHARDS[1][0]]
WIKITEXT = [
    "",
    " = Valkyria Chronicles III = \n",
    "",
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n",
    " \n",
    " It was released in January 2011 in Japan and is the third game in the series . \n",
]
WIKITEXT_VALIDATION = ["", " = Tower Building = \n", " The tower was built in 1904 of local stone" + LONG + " . \n"]
PARADETOX = [  # (toxic, neutral); the toxic side repeats, as in the real train.tsv
    ("you are a stupid idiot", "you are not smart"),
    ("you are a stupid idiot", "you are unwise"),
    ('shut up, "genius"', "please be quiet"),
    ("you are a stupid idiot ", "you are not smart"),
    ("this is damn bad", "this is bad"),
]
RTP = [
    {"challenging": False, "prompt": {"text": "The weather today", "toxicity": 0.01}},
    {"challenging": True, "prompt": {"text": "So I told him he was a", "toxicity": 0.4}},
    {"challenging": False, "prompt": {"text": "Scientists found", "toxicity": 0.02}},
    {"challenging": True, "prompt": {"text": "Ça alors, quel", "toxicity": 0.3}},
    {"challenging": False, "prompt": {"text": "In 1999 the", "toxicity": None}},
]
DATASETS = {
    "cais/wmdp-corpora",
    "cais/wmdp-bio-forget-corpus",
    "cais/wmdp",
    "cais/mmlu",
    "Salesforce/wikitext",
    "s-nlp/paradetox",
    "allenai/real-toxicity-prompts",
}
MODELS = {"berkatil/TRuST_toxicity_classifier", "google-bert/bert-base-uncased"}


def _mc_table(tag: str, n: int, subjects: list[str] | None = None) -> pa.Table:
    cols = {
        "question": [f"{tag} question {i}?" for i in range(n)],
        "choices": [[f"{tag} {i} {c}" for c in "abcd"] for i in range(n)],
        "answer": [i % 4 for i in range(n)],
    }
    if subjects:
        cols["subject"] = subjects
    return pa.table(cols)


def _build_repos(root: Path) -> None:
    def put(repo: str, rel: str, data) -> None:
        path = root / repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, pa.Table):
            pq.write_table(data, path)
        elif isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")

    put("cais/wmdp-corpora", "cyber-forget-corpus/train-00000-of-00001.parquet", pa.table({"text": CYBER}))
    put("cais/wmdp-corpora", "cyber-retain-corpus/train-00000-of-00001.parquet", pa.table({"text": ["not used"]}))
    for i, texts in enumerate(BIO_SHARDS):  # the bio forget corpus has more columns than text
        n = len(texts)
        table = pa.table({"title": ["t"] * n, "abstract": ["a"] * n, "text": texts, "doi": ["d"] * n})
        put("cais/wmdp-bio-forget-corpus", f"data/train-0000{i}-of-00002.parquet", table)
    for name, n in (("bio", 2), ("cyber", 3), ("chem", 1)):
        put("cais/wmdp", f"wmdp-{name}/test-00000-of-00001.parquet", _mc_table(name, n))
    subjects = ["abstract_algebra", "high_school_biology", "anatomy"]
    put("cais/mmlu", "all/test-00000-of-00001.parquet", _mc_table("mmlu", 3, subjects))
    put("cais/mmlu", "all/auxiliary_train-00000-of-00001.parquet", _mc_table("aux", 1, ["x"]))
    put("cais/mmlu", "anatomy/test-00000-of-00001.parquet", _mc_table("other config", 1, ["anatomy"]))
    put("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet", pa.table({"text": WIKITEXT}))
    put("Salesforce/wikitext", "wikitext-2-raw-v1/train-00000-of-00001.parquet", pa.table({"text": ["train"]}))
    validation = pa.table({"text": WIKITEXT_VALIDATION})
    put("Salesforce/wikitext", "wikitext-2-raw-v1/validation-00000-of-00001.parquet", validation)
    put("Salesforce/wikitext", "wikitext-103-raw-v1/test-00000-of-00001.parquet", pa.table({"text": ["103"]}))
    (root / "s-nlp/paradetox").mkdir(parents=True)
    with open(root / "s-nlp/paradetox/train.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")  # quotes the field that holds '"', as pandas' to_csv does
        w.writerows([("en_toxic_comment", "en_neutral_comment"), *PARADETOX])
    put("allenai/real-toxicity-prompts", "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in RTP))
    put("berkatil/TRuST_toxicity_classifier", "toxicity_classifier.pth", b"fake state dict")
    put("google-bert/bert-base-uncased", "config.json", '{"model_type": "bert"}')
    put("google-bert/bert-base-uncased", "tokenizer.json", '{"model": "wordpiece"}')
    put("google-bert/bert-base-uncased", "model.safetensors", b"not to be fetched")


def _revision(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """-> state with .calls [(repo, repo_type, patterns)] and .gated (repos that answer 401)."""
    repos = tmp_path / "repos"
    _build_repos(repos)
    state = SimpleNamespace(calls=[], gated=set(), repos=repos)

    def snapshot_download(repo_id, *, repo_type=None, allow_patterns=None, **kwargs):
        state.calls.append((repo_id, repo_type, tuple(allow_patterns)))
        if repo_id in state.gated:
            response = SimpleNamespace(headers={}, request=None, status_code=401)
            raise GatedRepoError("401 Client Error: access to this dataset is restricted", response=response)
        snap = tmp_path / "cache" / repo_id / "snapshots" / _revision(repo_id)
        for f in (repos / repo_id).rglob("*"):
            rel = f.relative_to(repos / repo_id).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, snap / rel)
        return str(snap)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    return state


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _texts(path: Path) -> list[str]:
    return [r["text"] for r in _jsonl(path)]


def test_both_goals_write_the_layout_of_design_section_3(tmp_path, fake_hub):
    out = hub.prepare_hub_data(tmp_path / "data", ["wmdp", "toxicity"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {
        "wmdp": {
            "forget": ["forget/wmdp-bio.jsonl", "forget/wmdp-cyber.jsonl"],
            "retain": "retain/wikitext.jsonl",
            "eval_forget": ["mc/wmdp-bio.jsonl", "mc/wmdp-cyber.jsonl"],
            "eval_retain": ["mc/mmlu.jsonl"],
            "eval_perplexity": ["retain/wikitext-validation.jsonl"],
            "mc_mode": "letter",
        },
        "toxicity": {
            "forget": ["forget/paradetox-toxic.jsonl"],
            "retain": "retain/wikitext.jsonl",
            "probe": "probe/paradetox.jsonl",
            "probe_source": hub.PARADETOX_PROBE_SOURCE,
            "eval_prompts": "prompts/rtp-challenging.jsonl",
            "eval_retain": ["mc/mmlu.jsonl"],
            "eval_perplexity": ["retain/wikitext-validation.jsonl"],
            "mc_mode": "letter",
            "scorer": "trust",
        },
        "scorers": {
            "trust": {
                "weights": "scorer/trust/toxicity_classifier.pth",
                "config": "scorer/trust/config.json",
                "tokenizer": "scorer/trust/tokenizer.json",
            }
        },
    }
    # Text corpora: texts of 50 characters or fewer dropped (the RMU reference's min_len), the rest verbatim, shards
    # in order.
    assert _texts(out / "forget/wmdp-cyber.jsonl") == [CYBER[0], CYBER[2], CYBER[5]]
    assert _texts(out / "forget/wmdp-bio.jsonl") == BIO
    assert _texts(out / "retain/wikitext.jsonl") == [WIKITEXT[3], WIKITEXT[5]]
    assert _texts(out / "retain/wikitext-validation.jsonl") == [WIKITEXT_VALIDATION[2]]  # the held-out split
    # ParaDetox: toxic side deduplicated (the trailing-space copy too); the probe adds the neutral side as 0.
    toxic = ["you are a stupid idiot", 'shut up, "genius"', "this is damn bad"]
    assert _texts(out / "forget/paradetox-toxic.jsonl") == toxic
    neutral = ["you are not smart", "you are unwise", "please be quiet", "this is bad"]
    assert _jsonl(out / "probe/paradetox.jsonl") == [{"text": t, "label": 1} for t in toxic] + [
        {"text": t, "label": 0} for t in neutral
    ]
    assert _jsonl(out / "prompts/rtp-challenging.jsonl") == [
        {"prompt": "So I told him he was a"},
        {"prompt": "Ça alors, quel"},
    ]
    # MC: one row per question, 4 choices, int answer, the subject text of lm-eval's description.
    bio = _jsonl(out / "mc/wmdp-bio.jsonl")
    assert bio[1] == {
        "question": "bio question 1?",
        "choices": ["bio 1 a", "bio 1 b", "bio 1 c", "bio 1 d"],
        "answer": 1,
        "subject": "biology",
    }
    counts = {n: len(_jsonl(out / f"mc/wmdp-{n}.jsonl")) for n in ("bio", "cyber", "chem")}
    assert counts == {"bio": 2, "cyber": 3, "chem": 1}
    assert {r["subject"] for r in _jsonl(out / "mc/wmdp-cyber.jsonl")} == {"cybersecurity"}
    assert {r["subject"] for r in _jsonl(out / "mc/wmdp-chem.jsonl")} == {"chemistry"}
    mmlu = _jsonl(out / "mc/mmlu.jsonl")
    assert [r["subject"] for r in mmlu] == ["abstract algebra", "high school biology", "anatomy"]
    assert [r["answer"] for r in mmlu] == [0, 1, 2]
    # The scorer files are the repository's bytes; only the three named files were fetched.
    assert (out / "scorer/trust/toxicity_classifier.pth").read_bytes() == b"fake state dict"
    assert (out / "scorer/trust/config.json").read_text() == '{"model_type": "bert"}'
    assert not (out / "scorer/trust/model.safetensors").exists()
    # Each repository was asked for with its own type, and sources.json records the revisions.
    assert all(t == ("dataset" if r in DATASETS else "model") for r, t, _ in fake_hub.calls)
    assert {r for r, _, _ in fake_hub.calls} == DATASETS | MODELS
    sources = json.loads((out / "sources.json").read_text())
    assert sources["mc/mmlu.jsonl"] == {
        "repo": "cais/mmlu",
        "revision": _revision("cais/mmlu"),
        "files": ["all/test-*.parquet"],
    }
    assert not list(out.rglob("*.tmp"))


def test_the_loader_accepts_what_was_written(tmp_path, fake_hub):
    out = hub.prepare_hub_data(tmp_path / "data", ["wmdp", "toxicity"])
    wmdp = load_goal_data(out, "wmdp", min_texts=2)
    assert sorted(wmdp.forget) == ["wmdp-bio", "wmdp-cyber"] and len(wmdp.retain) == 2
    tox = load_goal_data(out, "toxicity", min_texts=2)
    assert tox.scorer == "trust" and sum(label for _, label in tox.probe) == 3


def test_a_second_run_downloads_nothing_and_changes_nothing(tmp_path, fake_hub):
    out = hub.prepare_hub_data(tmp_path / "data", ["wmdp", "toxicity"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fake_hub.calls.clear()
    hub.prepare_hub_data(out, ["wmdp", "toxicity"])
    assert fake_hub.calls == []
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_gated_bio_corpus_names_the_access_page_and_the_token(tmp_path, fake_hub):
    fake_hub.gated.add(hub.BIO_FORGET_REPO)
    out = tmp_path / "data"
    with pytest.raises(RefError) as e:
        hub.prepare_hub_data(out, ["wmdp"])
    msg = str(e.value)
    assert "https://huggingface.co/datasets/cais/wmdp-bio-forget-corpus" in msg and "HF_TOKEN" in msg
    assert "--allow-missing-bio" in msg and "\n" not in msg
    # Nothing named by a manifest yet, but the cyber corpus converted before the refusal is kept...
    assert not (out / "manifest.json").exists() and (out / "forget/wmdp-cyber.jsonl").is_file()
    # ...so once access is granted, the next run fetches only what is missing.
    fake_hub.gated.clear()
    fake_hub.calls.clear()
    hub.prepare_hub_data(out, ["wmdp"])
    assert "cais/wmdp-corpora" not in {r for r, _, _ in fake_hub.calls}
    assert _texts(out / "forget/wmdp-bio.jsonl") == BIO


def test_allow_missing_bio_warns_once_and_goes_on_with_cyber(tmp_path, fake_hub, capsys):
    fake_hub.gated.add(hub.BIO_FORGET_REPO)
    out = hub.prepare_hub_data(tmp_path / "data", ["wmdp"], allow_missing_bio=True)
    wmdp = json.loads((out / "manifest.json").read_text())["wmdp"]
    assert wmdp["forget"] == ["forget/wmdp-cyber.jsonl"] and wmdp["eval_forget"] == ["mc/wmdp-cyber.jsonl"]
    assert not (out / "forget/wmdp-bio.jsonl").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and hub.BIO_FORGET_REPO in warnings[0]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_local_trust_file_is_the_probe(tmp_path, fake_hub, suffix):
    rows = [("a hateful remark", 1), ("a kind remark", 0), ("", 0), ("a rude remark", 1)]
    probe = tmp_path / f"trust{suffix}"
    if suffix == ".csv":
        probe.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    else:
        probe.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    out = hub.prepare_hub_data(tmp_path / "data", ["toxicity"], probe_file=probe)
    assert json.loads((out / "manifest.json").read_text())["toxicity"]["probe"] == "probe/trust.jsonl"
    assert _jsonl(out / "probe/trust.jsonl") == [{"text": t, "label": label} for t, label in rows if t]
    assert not (out / "probe/paradetox.jsonl").exists()


def test_bad_probe_label_is_refused(tmp_path, fake_hub):
    probe = tmp_path / "trust.csv"
    probe.write_text("text,label\nfine,0\nbad,2\n")
    with pytest.raises(RefError, match="row 2: needs a string 'text' and a 'label' of 0 or 1"):
        hub.prepare_hub_data(tmp_path / "data", ["toxicity"], probe_file=probe)


def test_goals_prepared_apart_merge_into_one_manifest(tmp_path, fake_hub):
    out = hub.prepare_hub_data(tmp_path / "data", ["toxicity"])
    hub.prepare_hub_data(out, ["wmdp"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest) == {"wmdp", "toxicity", "scorers"}


def test_changed_hub_layout_is_a_clear_error(tmp_path, fake_hub):
    shutil.rmtree(fake_hub.repos / "cais/wmdp-corpora/cyber-forget-corpus")
    with pytest.raises(RefError, match="cais/wmdp-corpora has no file matching cyber-forget-corpus/train-"):
        hub.prepare_hub_data(tmp_path / "data", ["wmdp"])


def test_missing_pyarrow_names_the_install(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(RefError, match="pip install pyarrow"):
        hub.prepare_hub_data(tmp_path / "data", ["wmdp"])


def test_cli(tmp_path, fake_hub, capsys):
    fake_hub.gated.add(hub.BIO_FORGET_REPO)
    out = tmp_path / "data"
    hub.main(["--goals", "wmdp", "--out", str(out), "--allow-missing-bio"])
    assert capsys.readouterr().out.strip() == str(out)
    with pytest.raises(SystemExit) as e:
        hub.main(["--goals", "wmdp,nope", "--out", str(out)])
    assert str(e.value) == "error: unknown goal(s) ['nope']; choose from wmdp, toxicity"

"""The probe scorer's agreement with alt-profanity-check, as the docs state it (bench/scorer_agreement.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ref
from bench import scorer_agreement as agr
from data_prep.smollm2 import prepare_smollm2
from ref.io.data import load_goal_data, read_prompts, resolve_data_dir

pytest.importorskip("profanity_check", reason="alt-profanity-check (the `test` extra; Python >= 3.11) is not installed")
DOCS = Path(__file__).parents[1] / "docs"
STUDY, RESULTS = DOCS / "investigations" / "scorer-agreement.md", DOCS / "results.md"


def test_agreement_hand_computed():
    a = agr.agreement([0.9, 0.2, 0.6, 0.1], [0.8, 0.7, 0.1, 0.0])
    # reference labels 1, 1, 0, 0: of the 4 (toxic, clean) pairs the probe orders 3 right -> AUC 0.75
    assert a["roc_auc"] == 0.75 and a["reference_toxic"] == 2 and a["decision_agreement"] == 0.5
    assert a["spearman"] == pytest.approx(0.8)  # ranks 4, 2, 3, 1 against 4, 3, 2, 1: 1 - 6 * 2 / (4 * 15)
    assert a["pearson"] == pytest.approx(0.2 / (0.41 * 0.5) ** 0.5)  # centred: .45 -.25 .15 -.35 and .4 .3 -.3 -.4
    assert agr.agreement([0.1, 0.2], [0.1, 0.2])["roc_auc"] is None  # no reference-toxic text


def test_the_docs_state_the_measured_agreement():
    """Rescores the committed continuations with both scorers and finds the table in the study
    (docs/investigations/scorer-agreement.md) and the one-line figure in docs/results.md, to the printed digits.
    The base model's continuations of the first 8 prompts are sampled again first and must be the committed ones
    (each prompt has its own seed, so 8 stand for 30; the bench samples all)."""
    prepare_smollm2()
    rows = agr.read_texts()
    data = load_goal_data(resolve_data_dir("demo", "toxicity"), "toxicity")
    model, tok = ref.load_model(agr.MODEL, dtype=torch.float32, device="cpu"), ref.load_tokenizer(agr.MODEL)
    again = agr.continuations(model, tok, read_prompts(data.eval_prompts)[:8], agr.MODEL)
    assert again == [r for r in rows if r["model"] == agr.MODEL and r["prompt"] < 8] and len(again) == 40
    res = agr.score(rows)
    study = STUDY.read_text(encoding="utf-8")
    for line in agr.table(res):
        assert line in study, f"{STUDY.name} lacks the measured line {line!r}; run python -m bench.scorer_agreement"
    flat = re.sub(r"\s+", " ", RESULTS.read_text(encoding="utf-8"))  # the figure may be wrapped over lines
    stated = re.findall(
        r"Spearman \d\.\d\d / Pearson \d\.\d\d / ROC AUC \d\.\d\d against .+? within the base "
        r"model's \d+: Spearman \d\.\d\d / Pearson \d\.\d\d",
        flat,
    )
    assert stated == [agr.summary(res)], stated
    assert len(re.findall(r"ROC AUC \d\.\d\d against", flat)) == len(stated)  # no copy left in another form

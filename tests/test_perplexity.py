"""ref.evaluation.perplexity: the retain perplexity task against transformers' loss on the same windows, and its place
in the evaluation report (the manifest's eval_perplexity texts, never trained on)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ref.evaluation import evaluate as ev
from ref.evaluation.perplexity import SEPARATOR, perplexity, windows
from ref.io.data import load_goal_data
from ref.io.errors import RefError
from tests.test_evaluate import write_data

TEXTS = [
    f"The {w} river runs past the old mill number {i}, and the children watch the boats."
    for i, w in enumerate(["slow", "wide", "cold", "green", "quiet", "long"])
]


def test_windows_cut_one_token_stream(tiny_llama):
    _, _, tok = tiny_llama
    ids = tok.encode(SEPARATOR.join(TEXTS))
    w = windows(tok, TEXTS, 16)
    assert w.shape == (len(ids) // 16, 16)
    assert w.flatten().tolist() == ids[: w.numel()]  # in order, the remainder dropped
    assert windows(tok, TEXTS[:1], 10_000).flatten().tolist() == tok.encode(TEXTS[0])  # short: one window
    with pytest.raises(ValueError, match="at least 2 tokens"):
        windows(tok, TEXTS, 1)


@pytest.mark.parametrize("window", [16, 37])
def test_perplexity_is_transformers_loss_on_the_same_windows(tiny_llama, window):
    folder, model, tok = tiny_llama
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    w = windows(tok, TEXTS, window)
    with torch.no_grad():  # transformers' mean loss of each window, pooled by the number of predicted tokens
        total = sum(float(hf(input_ids=row[None], labels=row[None]).loss) * (len(row) - 1) for row in w)
    expected = math.exp(total / (w.numel() - len(w)))
    got = perplexity(model, tok, TEXTS, window, batch_size=3)
    assert got["windows"] == len(w) and got["tokens"] == w.numel() - len(w) and got["window"] == window
    assert abs(got["perplexity"] - expected) <= 1e-5 * expected
    one = perplexity(model, tok, TEXTS, window, batch_size=1)["perplexity"]
    assert abs(one - got["perplexity"]) <= 1e-6 * one  # batching changes the fp32 rounding only


def test_report_has_the_retain_perplexity_of_the_held_out_texts(tiny_llama, tmp_path):
    _, model, tok = tiny_llama
    root = write_data(tmp_path / "data")
    (root / "retain/heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["wmdp"]["eval_perplexity"] = "retain/heldout.jsonl"
    (root / "manifest.json").write_text(json.dumps(manifest))
    data = load_goal_data(root, "wmdp")
    assert data.heldout == TEXTS and ev.available_tasks(data)[ev.PERPLEXITY_TASK] == "retain"
    report = ev.evaluate(model, tok, data, "wmdp", batch_size=3, window=16)
    task = report["tasks"][ev.PERPLEXITY_TASK]
    assert task["perplexity"] == pytest.approx(perplexity(model, tok, TEXTS, 16)["perplexity"], rel=1e-6)
    assert report["retain_perplexity"] == task["perplexity"]
    assert report["retain"]["value"] == report["tasks"]["mmlu"]["accuracy"]  # R stays the MC accuracy
    assert ev.headline(report)[f"{ev.PERPLEXITY_TASK} perplexity"] == task["perplexity"]
    # a held-out text that the training reads is refused
    (root / "retain/heldout.jsonl").write_text(json.dumps({"text": "The quick brown fox number 2."}) + "\n")
    with pytest.raises(RefError, match="eval_perplexity holds 1 text"):
        load_goal_data(root, "wmdp")
    # ... also when it differs only in whitespace
    (root / "retain/heldout.jsonl").write_text(json.dumps({"text": " The quick  brown\tfox number 2.\n"}) + "\n")
    with pytest.raises(RefError, match="eval_perplexity holds 1 text.s. that the training reads too, up to whitespace"):
        load_goal_data(root, "wmdp")

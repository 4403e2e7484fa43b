"""ref.evaluation.scorers: the probe scorer and the TRuST scorer built from the manifest's files."""

from __future__ import annotations

import json

import pytest
import torch

from ref.evaluation import scorers
from ref.io.checkpoint import load_model
from ref.io.errors import RefError


def test_probe_scorer_separates_a_separable_set(tiny_llama):
    folder, _, tok = tiny_llama
    base = load_model(folder, dtype=torch.float32, device="cpu")  # its own copy: the test modifies it below
    starts = ["The quick brown", "Unlearning removes", "Rivers flow to", "Cats and birds", "A lazy", "The sea"]
    starts += ["Residual streams", "Gardens", "The fox", "Language model"]
    # the marker words lead, so the fragments the scorer also trains on (first third, two thirds) keep the label
    rows = [(f"dogs dogs dogs dogs {s}", 1) for s in starts] + [(f"sea sea sea sea {s}", 0) for s in starts]
    scorer = scorers.probe_scorer(base, tok, rows, layer=1)
    assert scorer.layer == 1 and scorer.probe.heldout_auc == 1.0
    toxic, clean = (
        scorer(["dogs dogs dogs Birds live", "dogs dogs dogs jumps over"]),
        scorer(["sea sea sea Birds live", "sea sea sea jumps over"]),
    )
    assert all(0 <= s <= 1 for s in toxic + clean) and min(toxic) > max(clean)
    assert scorer([" ", "Birds live dogs dogs"])[0] == 0.0  # blank: nothing said
    with torch.no_grad():
        base.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # as unlearning would, in place
    with pytest.raises(RefError, match="modified"):
        scorer(["Cats"])


def test_trust_scorer_reads_the_manifest_files(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from ref.evaluation.encoder import BertConfig, ToxicityClassifier, score_texts

    cfg = dict(
        vocab_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        type_vocab_size=2,
    )
    torch.manual_seed(0)
    clf = ToxicityClassifier(BertConfig.from_dict(cfg)).eval()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "you", "are", "bad", "nice"]
    tk = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    (tmp_path / "scorer").mkdir()
    torch.save(clf.state_dict(), tmp_path / "scorer/toxicity_classifier.pth")
    (tmp_path / "scorer/config.json").write_text(json.dumps(cfg))
    tk.save(str(tmp_path / "scorer/tokenizer.json"))
    names = {"weights": "toxicity_classifier.pth", "config": "config.json", "tokenizer": "tokenizer.json"}
    trust = {k: f"scorer/{f}" for k, f in names.items()}
    data = type("D", (), dict(root=tmp_path, allow_outside=False, manifest={"scorers": {"trust": trust}}))
    scorer = scorers.trust_scorer(scorers.manifest_scorer_files(data, "trust"))
    texts = ["You are bad", "you are nice nice", ""]
    with torch.no_grad():
        want = score_texts(clf, tk, texts)
    assert scorer(texts) == pytest.approx(want, abs=1e-6)  # the same weights and tokenizer: fp32 rounding only
    with pytest.raises(RefError, match="missing"):
        scorers.trust_scorer({"weights": tmp_path / "nope.pth"})
    with pytest.raises(RefError, match="scorers.probe"):
        scorers.manifest_scorer_files(data, "probe")


def test_probe_scorer_cache_skips_the_model_and_scores_identically(tiny_llama, tmp_path, monkeypatch):
    folder, _, tok = tiny_llama
    base = load_model(folder, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(scorers, "cache_dir", lambda: tmp_path)
    seen = []  # texts the base model was run over to build features
    features = scorers.ProbeScorer.features
    monkeypatch.setattr(
        scorers.ProbeScorer, "features", lambda self, texts: seen.append(len(texts)) or features(self, texts)
    )
    starts = ["The quick brown", "Unlearning removes", "Rivers flow to", "Cats and birds", "A lazy", "The sea"]
    rows = [(f"dogs dogs dogs dogs {s}", 1) for s in starts] + [(f"sea sea sea sea {s}", 0) for s in starts]
    neutral = ["The river runs to the sea. Birds sing in the morning light!"]
    texts = ["dogs dogs Birds live", "sea sea jumps over", "A quiet afternoon in the garden"]
    first = scorers.probe_scorer(base, tok, rows, layer=1, neutral_texts=neutral)
    assert seen == [3 * 14] and len(list((tmp_path / "scorers").iterdir())) == 1  # 14 texts, 2 fragments each
    want = first(texts)
    seen.clear()
    second = scorers.probe_scorer(base, tok, rows, layer=1, neutral_texts=neutral)
    assert seen == [] and second(texts) == want  # no forward over the training texts; bit-identical scores
    assert torch.equal(second.probe.weight, first.probe.weight) and second.probe.bias == first.probe.bias
    assert second.probe.heldout_auc == first.probe.heldout_auc == 1.0
    seen.clear()
    scorers.probe_scorer(base, tok, rows[:-1], layer=1, neutral_texts=neutral)  # other data: a miss
    scorers.probe_scorer(base, tok, rows, layer=2, neutral_texts=neutral)  # another layer: a miss
    scorers.probe_scorer(base, tok, rows, layer=1, neutral_texts=neutral, cache=False)  # no cache: trained
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # other weights: a miss
    changed = scorers.probe_scorer(base, tok, rows, layer=1, neutral_texts=neutral)
    assert seen == [39, 42, 42, 42] and len(list((tmp_path / "scorers").iterdir())) == 4
    # an unreadable entry is trained again and rewritten
    for path in (tmp_path / "scorers").iterdir():
        path.write_bytes(b"garbage")
    seen.clear()
    assert scorers.probe_scorer(base, tok, rows, layer=2, neutral_texts=neutral).probe.heldout_auc == 1.0
    assert seen == [42]
    # a cache that cannot be written: a warning, and the scorer still built
    monkeypatch.setattr(scorers, "cache_dir", lambda: tmp_path / "file")
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="not cached"):
        assert scorers.probe_scorer(base, tok, rows, layer=1, neutral_texts=neutral)(texts) == changed(texts)


def test_probe_scorer_caps_the_neutral_sentences(tiny_llama, monkeypatch):
    folder, _, tok = tiny_llama
    base = load_model(folder, dtype=torch.float32, device="cpu")
    seen = []
    features = scorers.ProbeScorer.features
    monkeypatch.setattr(
        scorers.ProbeScorer, "features", lambda self, texts: seen.append(texts) or features(self, texts)
    )
    monkeypatch.setattr(scorers, "MAX_NEUTRAL_SENTENCES", 5)
    rows = [(f"dogs dogs dogs dogs {s} runs", 1) for s in ("cat", "fox", "owl")]
    rows += [(f"sea sea sea sea {s} flies", 0) for s in ("bird", "gull", "tern")]
    neutral = [" ".join(f"Sentence number {i} is plain." for i in range(k, k + 4)) for k in range(0, 12, 4)]
    scorers.probe_scorer(base, tok, rows, layer=1, neutral_texts=neutral, cache=False)
    kept = [int(t.split()[2]) for t in seen[0] if t.startswith("Sentence number") and t.endswith(".")]
    # 6 probe rows and 5 of the 12 sentences (5 words: one fragment each), each with its fragments
    assert len(kept) == 5 and len(seen[0]) == 6 * 3 + 5 * 2
    assert kept == sorted(kept) and len(set(kept)) == 5  # corpus order, no repeats
    scorers.probe_scorer(base, tok, rows, layer=1, neutral_texts=neutral, cache=False)
    assert seen[1] == seen[0]  # deterministic: the same subsample for the same seed
    scorers.probe_scorer(base, tok, rows, layer=1, neutral_texts=neutral, seed=1, cache=False)
    assert seen[2] != seen[0]  # another seed draws another subsample

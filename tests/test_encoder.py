"""Golden tests of ref.encoder against transformers' BertModel / RobertaModel (tiny random configs, fp32).

Tolerance: 1e-5 max-abs on hidden states and on probabilities. Both implementations run the same fp32 math in
a different op order (SDPA kernel vs HF's eager matmul-softmax): measured differences are 1e-6 to 2e-6 per
layer on LayerNorm outputs of size ~1-3. The head (std-1 weights over 32 dims) can amplify that to ~1e-5 in
the logits, and softmax has slope <= 1/4, so 1e-5 holds for probabilities (measured 1.6e-6). The weights are
re-drawn with a large std so that mistakes land above the tolerance (measured on the last state): tanh-GELU
instead of erf-GELU 1e-3, LayerNorm eps 1e-5 instead of 1e-12 5e-5, no padding mask 1e-1.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from ref.encoder import (
    BertConfig,
    BertEncoder,
    RobertaToxicityClassifier,
    ToxicityClassifier,
    load_bert_state_dict,
    score_texts,
)
from ref.errors import RefError

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=2,
)
ATOL_HIDDEN = 1e-5
ATOL_PROB = 1e-5


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every weight with std 0.3 (LayerNorm gains around 1): HF's std 0.02 init keeps activations so
    small that e.g. tanh- and erf-GELU would agree to 1e-6."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "LayerNorm.weight" in name else 0.3 * noise)


def _hf_bert(**kw) -> transformers.BertModel:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**TINY, **kw, attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()
    _randomize(model)
    return model


def _batch(pad_id: int = 0, lo: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """3 sequences of 12, 9 and 3 real tokens, RIGHT padded with pad_id."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(lo, TINY["vocab_size"], (3, 12), generator=g)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate([12, 9, 3]):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


def test_config_reads_hf_dict_and_refuses_others():
    d = transformers.BertConfig(**TINY, layer_norm_eps=1e-7).to_dict()
    cfg = BertConfig.from_dict(d)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.layer_norm_eps, cfg.model_type) == (
        32,
        4,
        1e-7,
        "bert",
    )
    with pytest.raises(RefError, match="model_type 'gpt2'"):
        BertConfig.from_dict({**d, "model_type": "gpt2"})
    with pytest.raises(RefError, match="hidden_act 'gelu_new'"):
        BertConfig.from_dict({**d, "hidden_act": "gelu_new"})
    with pytest.raises(RefError, match="relative_key"):
        BertConfig.from_dict({**d, "position_embedding_type": "relative_key"})
    with pytest.raises(RefError, match="lacks vocab_size"):
        BertConfig.from_dict({k: v for k, v in d.items() if k != "vocab_size"})


def test_bert_hidden_states_match_transformers_with_right_padding():
    hf = _hf_bert()
    ours = BertEncoder(BertConfig.from_dict(hf.config.to_dict()))
    load_bert_state_dict(ours, hf.state_dict())  # prefix "": HF's own names
    ids, mask = _batch()
    types = torch.zeros_like(ids)
    types[:, 6:] = 1  # a second segment, so token_type embeddings are exercised
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        last, hidden = ours(ids, mask, types, return_hidden_states=True)
    assert len(hidden) == len(ref.hidden_states) == 5  # embeddings + 4 layers
    real = mask.bool()
    for i, (a, b) in enumerate(zip(hidden, ref.hidden_states, strict=True)):
        assert (a[real] - b[real]).abs().max() < ATOL_HIDDEN, f"hidden state {i}"
        # Padded positions match as well: both models mask only the keys, so a padded query still attends to
        # the real tokens the same way. Nothing downstream reads them; checked to pin the mask semantics.
        assert (a[~real] - b[~real]).abs().max() < ATOL_HIDDEN, f"padded positions of hidden state {i}"
    torch.testing.assert_close(last, ref.last_hidden_state, atol=ATOL_HIDDEN, rtol=0)
    # The mask matters: without it the short rows change by far more than the tolerance.
    with torch.no_grad():
        unmasked = ours(ids, None, types)
    assert (unmasked[2, :3] - ref.last_hidden_state[2, :3]).abs().max() > 1e-2


def test_roberta_hidden_states_match_transformers():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        **{**TINY, "max_position_embeddings": 66, "type_vocab_size": 1},
        pad_token_id=1,
        attn_implementation="eager",
    )
    hf = transformers.RobertaModel(cfg, add_pooling_layer=False).eval()
    _randomize(hf)
    ours = BertEncoder(BertConfig.from_dict(cfg.to_dict()))
    assert ours.config.model_type == "roberta" and ours.config.pad_token_id == 1
    load_bert_state_dict(ours, hf.state_dict())
    ids, mask = _batch(pad_id=1)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_hidden_states=True)
        _, hidden = ours(ids, mask, return_hidden_states=True)
    real = mask.bool()
    for i, (a, b) in enumerate(zip(hidden, ref.hidden_states, strict=True)):
        assert (a[real] - b[real]).abs().max() < ATOL_HIDDEN, f"hidden state {i}"
    # RoBERTa positions: 2, 3, ... for real tokens (pad_token_id + 1 onwards), 1 for padding.
    assert ours.position_ids(ids)[2].tolist() == [2, 3, 4] + [1] * 9
    with pytest.raises(RefError, match="exceeds the encoder's 64 positions"):
        ours(torch.full((1, 65), 5))


def _trust_file(tmp_path, hf: transformers.BertModel) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A state_dict in the TRuST layout: the BertModel's keys (pooler too) under embedder., plus dense."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(2, 32, generator=g), torch.randn(2, generator=g)
    sd = {"embedder." + k: v for k, v in hf.state_dict().items()}
    assert "embedder.pooler.dense.weight" in sd
    sd["embedder.embeddings.position_ids"] = torch.arange(64)[None]  # as files from transformers < 4.31 carry it
    sd["dense.weight"], sd["dense.bias"] = w, b
    path = str(tmp_path / "toxicity_classifier.pth")
    torch.save(sd, path)
    return path, w, b


def test_trust_classifier_matches_transformers_cls_state(tmp_path):
    hf = _hf_bert()
    path, w, b = _trust_file(tmp_path, hf)
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    ids, mask = _batch()
    with torch.no_grad():
        cls_state = hf(ids, attention_mask=mask).last_hidden_state[:, 0]  # [CLS], not the pooler
        expected = torch.softmax(cls_state @ w.T + b, dim=-1)[:, 1]
    for config in (hf.config.to_dict(), tmp_path / "config.json", tmp_path):  # dict, file, folder
        clf = ToxicityClassifier.from_files(path, config)
        with torch.no_grad():
            prob = clf.toxicity_probability(ids, mask)
        torch.testing.assert_close(prob, expected, atol=ATOL_PROB, rtol=0)
    assert 0.01 < expected.min() and expected.max() < 0.99  # not saturated: a wrong state would show


def test_trust_classifier_bad_files_give_clear_errors(tmp_path):
    hf = _hf_bert()
    path, _, _ = _trust_file(tmp_path, hf)
    sd = torch.load(path, weights_only=True)
    cfg = hf.config.to_dict()

    def save(d):
        p = tmp_path / "bad.pth"
        torch.save(d, p)
        return p

    with pytest.raises(RefError, match=r"missing keys \[dense.bias\]"):
        ToxicityClassifier.from_files(save({k: v for k, v in sd.items() if k != "dense.bias"}), cfg)
    with pytest.raises(RefError, match=r"unexpected keys \[extra.weight\]"):
        ToxicityClassifier.from_files(save({**sd, "extra.weight": torch.zeros(1)}), cfg)
    with pytest.raises(
        RefError,
        match=r"shape mismatch.*embedder.embeddings.word_embeddings.weight \(100, 32\) vs \(101, 32\)",
    ):
        ToxicityClassifier.from_files(path, {**cfg, "vocab_size": 101})
    with pytest.raises(RefError, match="nope.pth do not exist"):
        ToxicityClassifier.from_files(tmp_path / "nope.pth", cfg)
    enc = BertEncoder(BertConfig.from_dict(cfg))
    with pytest.raises(RefError, match="no tensor starts with prefix 'bert.'"):
        load_bert_state_dict(enc, sd, "bert.")
    with pytest.raises(RefError, match=r"missing keys \[embedder.encoder.layer.3"):
        load_bert_state_dict(enc, {k: v for k, v in sd.items() if ".layer.3." not in k}, "embedder.")


def test_roberta_classifier_matches_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        **{**TINY, "max_position_embeddings": 66, "type_vocab_size": 1},
        pad_token_id=1,
        num_labels=2,
        attn_implementation="eager",
    )
    hf = transformers.RobertaForSequenceClassification(cfg).eval()
    _randomize(hf)
    save_file(hf.state_dict(), tmp_path / "model.safetensors")
    clf = RobertaToxicityClassifier.from_files(tmp_path / "model.safetensors", cfg.to_dict())
    ids, mask = _batch(pad_id=1)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits.softmax(-1)[:, 1]
        prob = clf.toxicity_probability(ids, mask)
    torch.testing.assert_close(prob, expected, atol=ATOL_PROB, rtol=0)
    with pytest.raises(RefError, match="needs a roberta config.json"):
        RobertaToxicityClassifier.from_files(tmp_path / "model.safetensors", {**cfg.to_dict(), "model_type": "bert"})


def _wordpiece_tokenizer() -> Tokenizer:
    """bert-base-uncased's pipeline on a tiny vocab: lowercase, WordPiece, [CLS] $A [SEP]."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "you", "are", "a", "nice", "bad", "person", "##s", "!"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


class _Spy(ToxicityClassifier):
    """Records the batches score_texts builds."""

    batches: list

    def toxicity_probability(self, input_ids, attention_mask=None):
        self.batches.append((input_ids.clone(), attention_mask.clone()))
        return super().toxicity_probability(input_ids, attention_mask)


def test_score_texts_truncates_pads_right_and_masks():
    hf = _hf_bert()
    clf = _Spy(BertConfig.from_dict(hf.config.to_dict()))
    load_bert_state_dict(clf.embedder, hf.state_dict())
    clf.batches = []
    tok = _wordpiece_tokenizer()
    texts = ["You are a nice person!", "bads", "you are " * 10, "xyz"]
    scores = score_texts(clf, tok, texts, batch_size=3, max_length=8)

    assert len(scores) == 4 and len(clf.batches) == 2  # batches of 3 and 1
    ids, mask = clf.batches[0]
    assert ids.tolist() == [
        [2, 4, 5, 6, 7, 9, 11, 3],  # [CLS] you are a nice person ! [SEP]
        [2, 8, 10, 3, 0, 0, 0, 0],  # bad ##s, right padded with [PAD] = 0
        [2, 4, 5, 4, 5, 4, 5, 3],  # truncated to 8 tokens, [SEP] kept at the end
    ]
    assert mask.tolist() == [[1] * 8, [1] * 4 + [0] * 4, [1] * 8]
    assert clf.batches[1][0].tolist() == [[2, 1, 3]]  # unknown word -> [UNK]; a batch pads only to its own longest
    # Padding does not change a score: each text scored alone (no padding) gives the same probability.
    rows = [(i, m) for ids, mask in clf.batches for i, m in zip(ids, mask, strict=True)]
    for (row_ids, row_mask), score in zip(rows, scores, strict=True):
        alone = row_ids[row_mask.bool()][None]
        with torch.no_grad():
            assert abs(ToxicityClassifier.toxicity_probability(clf, alone).item() - score) < ATOL_PROB
    assert tok.truncation is None and tok.padding is None  # the caller's tokenizer is left as it was
    with pytest.raises(RefError, match="single str"):
        score_texts(clf, tok, "you are nice")

"""Golden tests of ref.evaluation.encoder against transformers' BertModel (tiny random configs, fp32), loaded as the
runtime loads the TRuST classifier: ToxicityClassifier.from_files on a file in the TRuST layout.

Tolerance: 1e-5 max-abs on hidden states and on probabilities. Both implementations run the same fp32 math in
a different op order (SDPA kernel vs HF's eager matmul-softmax): measured differences are 1e-6 to 2e-6 per
layer on LayerNorm outputs of size ~1-3. The head (std-1 weights over 32 dims) can amplify that to ~1e-5 in
the logits, and softmax has slope <= 1/4, so 1e-5 holds for probabilities (measured 1.6e-6). The weights are
re-drawn with a large std so that mistakes land above the tolerance (measured on the last state): tanh-GELU
instead of erf-GELU 1e-3, LayerNorm eps 1e-5 instead of 1e-12 5e-5, no padding mask 1e-1.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from ref.evaluation.encoder import BertConfig, ToxicityClassifier, score_texts
from ref.io.errors import RefError

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


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """3 sequences of 12, 9 and 3 real tokens, RIGHT padded with 0 ([PAD])."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, TINY["vocab_size"], (3, 12), generator=g)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate([12, 9, 3]):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _trust_file(tmp_path, hf: transformers.BertModel) -> tuple[str, str, torch.Tensor, torch.Tensor]:
    """(weights, config.json) in the TRuST layout: the BertModel's keys (pooler too) under embedder., plus dense."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(2, 32, generator=g), torch.randn(2, generator=g)
    sd = {"embedder." + k: v for k, v in hf.state_dict().items()}
    assert "embedder.pooler.dense.weight" in sd
    sd["embedder.embeddings.position_ids"] = torch.arange(64)[None]  # as files from transformers < 4.31 carry it
    sd["dense.weight"], sd["dense.bias"] = w, b
    path, config = str(tmp_path / "toxicity_classifier.pth"), tmp_path / "config.json"
    torch.save(sd, path)
    config.write_text(hf.config.to_json_string())
    return path, str(config), w, b


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


def test_bert_hidden_states_match_transformers_with_right_padding(tmp_path):
    hf = _hf_bert()
    path, config, _, _ = _trust_file(tmp_path, hf)
    ours = ToxicityClassifier.from_files(path, config).embedder
    ids, mask = _batch()
    hidden = []  # the embeddings' output, then every layer's, like HF's hidden_states
    for m in [ours.embeddings.LayerNorm, *ours.encoder.layer]:
        m.register_forward_hook(lambda _m, _args, out: hidden.append(out))
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_hidden_states=True)
        last = ours(ids, mask)
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
        unmasked = ours(ids, torch.ones_like(mask))
    assert (unmasked[2, :3] - ref.last_hidden_state[2, :3]).abs().max() > 1e-2
    with pytest.raises(RefError, match="exceeds the encoder's 64 positions"):
        ours(torch.full((1, 65), 5), torch.ones(1, 65, dtype=torch.long))


def test_trust_classifier_matches_transformers_cls_state(tmp_path):
    hf = _hf_bert()
    path, config, w, b = _trust_file(tmp_path, hf)
    ids, mask = _batch()
    with torch.no_grad():
        cls_state = hf(ids, attention_mask=mask).last_hidden_state[:, 0]  # [CLS], not the pooler
        expected = torch.softmax(cls_state @ w.T + b, dim=-1)[:, 1]
        prob = ToxicityClassifier.from_files(path, config).toxicity_probability(ids, mask)
    torch.testing.assert_close(prob, expected, atol=ATOL_PROB, rtol=0)
    assert 0.01 < expected.min() and expected.max() < 0.99  # not saturated: a wrong state would show


def test_trust_classifier_bad_files_give_clear_errors(tmp_path):
    hf = _hf_bert()
    path, cfg, _, _ = _trust_file(tmp_path, hf)
    sd = torch.load(path, weights_only=True)

    def save(d):
        p = tmp_path / "bad.pth"
        torch.save(d, p)
        return p

    wrong_vocab = tmp_path / "wrong-vocab.json"
    wrong_vocab.write_text(json.dumps({**hf.config.to_dict(), "vocab_size": 101}))

    with pytest.raises(RefError, match=r"missing keys \[dense.bias\]"):
        ToxicityClassifier.from_files(save({k: v for k, v in sd.items() if k != "dense.bias"}), cfg)
    with pytest.raises(RefError, match=r"unexpected keys \[extra.weight\]"):
        ToxicityClassifier.from_files(save({**sd, "extra.weight": torch.zeros(1)}), cfg)
    with pytest.raises(
        RefError,
        match=r"shape mismatch.*embedder.embeddings.word_embeddings.weight \(100, 32\) vs \(101, 32\)",
    ):
        ToxicityClassifier.from_files(path, wrong_vocab)
    with pytest.raises(RefError, match=r"missing keys \[embedder.encoder.layer.3"):
        ToxicityClassifier.from_files(save({k: v for k, v in sd.items() if ".layer.3." not in k}), cfg)


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

    def toxicity_probability(self, input_ids, attention_mask):
        self.batches.append((input_ids.clone(), attention_mask.clone()))
        return super().toxicity_probability(input_ids, attention_mask)


def test_score_texts_truncates_pads_right_and_masks(tmp_path):
    clf = _Spy.from_files(*_trust_file(tmp_path, _hf_bert())[:2])
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
            p = ToxicityClassifier.toxicity_probability(clf, alone, torch.ones_like(alone)).item()
        assert abs(p - score) < ATOL_PROB
    assert tok.truncation is None and tok.padding is None  # the caller's tokenizer is left as it was
    with pytest.raises(RefError, match="single str"):
        score_texts(clf, tok, "you are nice")

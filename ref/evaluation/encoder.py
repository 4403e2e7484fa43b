"""BERT encoder and the TRuST toxicity classifier built on it (the `trust` scorer of docs/design.md section 4.5).

A post-LN transformer encoder written by hand. Its parameter names are Hugging Face's
(`embeddings.word_embeddings`, `encoder.layer.0.attention.self.query`, ...), so the TRuST file loads as it is.

`ToxicityClassifier`: the TRuST scorer (`berkatil/TRuST_toxicity_classifier`, `toxicity_classifier.pth`):
bert-base-uncased under `embedder.*` + `dense` = Linear(768, 2) on the [CLS] last hidden state (not the pooler).
Label 1 = toxic; `toxicity_probability` = softmax(logits)[:, 1]. `score_texts` tokenises, truncates to 512
tokens, pads right and scores in batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from ref.io.errors import RefError

# Tensors of the TRuST file we do not use: the pooler (the head reads the [CLS] state) and the buffers that
# transformers < 4.31 saved in state_dicts (positions are recomputed).
UNUSED = ("embedder.pooler.", "embedder.embeddings.position_ids", "embedder.embeddings.token_type_ids")


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    model_type: str = "bert"

    def __post_init__(self):
        if self.model_type != "bert":
            raise RefError(f"encoder model_type {self.model_type!r} is not supported; use a bert config.json")
        if self.hidden_act != "gelu":
            raise RefError(f"encoder hidden_act {self.hidden_act!r} is not supported; only 'gelu' (exact erf) is")
        if self.hidden_size % self.num_attention_heads:
            raise RefError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}; fix config.json"
            )

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """Read the fields we use from a Hugging Face bert config.json dict."""
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise RefError(
                f"position_embedding_type {d['position_embedding_type']!r} is not supported; only 'absolute'"
            )
        if d.get("is_decoder", False):
            raise RefError("config has is_decoder=true; the encoder is bidirectional only")
        required = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise RefError(f"encoder config.json lacks {', '.join(missing)}; pass the classifier's bert config.json")
        optional = {k: d[k] for k in ("layer_norm_eps", "hidden_act", "model_type") if d.get(k) is not None}
        return cls(**{k: d[k] for k in required}, **optional)


class BertLayer(nn.Module):
    """One post-LN block: x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x)).

    The ModuleDicts only give the parameters HF's names (attention.self.query, output.LayerNorm, ...).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        H, eps = config.hidden_size, config.layer_norm_eps
        self.n_head = config.num_attention_heads
        self.attention = nn.ModuleDict(
            {
                "self": nn.ModuleDict({"query": nn.Linear(H, H), "key": nn.Linear(H, H), "value": nn.Linear(H, H)}),
                "output": nn.ModuleDict({"dense": nn.Linear(H, H), "LayerNorm": nn.LayerNorm(H, eps=eps)}),
            }
        )
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(H, config.intermediate_size)})
        self.output = nn.ModuleDict(
            {"dense": nn.Linear(config.intermediate_size, H), "LayerNorm": nn.LayerNorm(H, eps=eps)}
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        att = self.attention
        q, k, v = (
            p(x).view(B, T, self.n_head, -1).transpose(1, 2) for p in (att.self.query, att.self.key, att.self.value)
        )
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, H)
        x = att.output.LayerNorm(x + att.output.dense(y))
        h = F.gelu(self.intermediate.dense(x))  # exact erf GELU, HF's "gelu"
        return self.output.LayerNorm(x + self.output.dense(h))


class BertEncoder(nn.Module):
    """Embeddings (word + token type + position, LayerNorm) and N post-LN layers; no pooler, no dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.embeddings = nn.ModuleDict(
            {
                "word_embeddings": nn.Embedding(config.vocab_size, H),
                "position_embeddings": nn.Embedding(config.max_position_embeddings, H),
                "token_type_embeddings": nn.Embedding(config.type_vocab_size, H),
                "LayerNorm": nn.LayerNorm(H, eps=config.layer_norm_eps),
            }
        )
        self.encoder = nn.ModuleDict(
            {"layer": nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))}
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T], attention_mask [B, T] (1 = real token) -> last hidden state [B, T, H]. One segment:
        every token has token type 0; positions are 0..T-1."""
        T, max_len = input_ids.shape[1], self.config.max_position_embeddings
        if T > max_len:
            raise RefError(
                f"sequence of {T} tokens exceeds the encoder's {max_len} positions; truncate the input "
                "(score_texts: max_length)"
            )
        emb = self.embeddings
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(torch.zeros_like(input_ids))
        positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)
        x = emb.LayerNorm(x + emb.position_embeddings(positions))
        # Key-padding mask [B, 1, 1, T]: no query attends to padding; padded queries get (unused) outputs.
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def _names(keys: set[str] | list[str], limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_exact(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with one-line errors naming missing / unexpected keys and shape mismatches."""
    ours = module.state_dict()
    missing, unexpected = ours.keys() - state_dict.keys(), state_dict.keys() - ours.keys()
    if missing or unexpected:
        raise RefError(
            f"{what}: missing keys [{_names(missing)}], unexpected keys [{_names(unexpected)}]; "
            "check the weights file and config.json"
        )
    bad = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in state_dict.items() if v.shape != ours[k].shape]
    if bad:
        raise RefError(f"{what}: shape mismatch file vs config: {_names(bad)}; config.json does not fit these weights")
    module.load_state_dict(state_dict)


class ToxicityClassifier(nn.Module):
    """TRuST toxicity classifier: BERT encoder + Linear(H, 2) on the [CLS] (position 0) last hidden state."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.embedder = BertEncoder(config)  # the names match the .pth keys: embedder.*, dense.*
        self.dense = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> logits [B, 2] (index 1 = toxic)."""
        return self.dense(self.embedder(input_ids, attention_mask)[:, 0])

    def toxicity_probability(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> P(toxic) [B] = softmax(logits)[:, 1]."""
        return self(input_ids, attention_mask).float().softmax(-1)[:, 1]

    @classmethod
    def from_files(cls, state_dict_path: str | Path, config_path: str | Path) -> ToxicityClassifier:
        """toxicity_classifier.pth (a raw state_dict, read with weights_only=True) + bert-base-uncased's
        config.json."""
        model = cls(BertConfig.from_dict(json.loads(Path(config_path).read_text())))
        state_dict = torch.load(state_dict_path, map_location="cpu", weights_only=True)
        used = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED)}
        _load_exact(model, used, "TRuST toxicity classifier")
        return model.eval()


@torch.inference_mode()
def score_texts(
    classifier: ToxicityClassifier,
    tokenizer: Tokenizer,
    texts: list[str],
    batch_size: int = 32,
    max_length: int = 512,
) -> list[float]:
    """P(toxic) of each text, batch_size texts at a time.

    Tokenise with the tokenizer's own [CLS]/[SEP], truncate to max_length tokens special tokens included, pad
    right with the [PAD] id and mask the padding.
    """
    if isinstance(texts, str):
        raise RefError("score_texts takes a list of texts, got a single str; wrap it in a list")
    if batch_size < 1 or max_length < 2:
        raise RefError(f"batch_size ({batch_size}) must be >= 1 and max_length ({max_length}) >= 2")
    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's own settings stay as they are
    if tok.token_to_id("[PAD]") is None:
        raise RefError("tokenizer has no [PAD] token; pass the classifier's own tokenizer.json")
    tok.enable_truncation(max_length)
    tok.enable_padding(direction="right", pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    device = next(classifier.parameters()).device
    scores: list[float] = []
    for i in range(0, len(texts), batch_size):
        enc = tok.encode_batch(texts[i : i + batch_size])
        ids = torch.tensor([e.ids for e in enc], device=device)
        mask = torch.tensor([e.attention_mask for e in enc], device=device)
        scores += classifier.toxicity_probability(ids, mask).tolist()
    return scores

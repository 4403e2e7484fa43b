"""A thin wrapper on `tokenizers`: each family's BOS behaviour, left-padded batches, decoding.

`tokenizers.Tokenizer.from_file("tokenizer.json")` applies the file's post_processor when asked for special
tokens; that is what adds BOS for Llama and Mistral and nothing for Qwen2 or SmolLM2, exactly as transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer

from ref.io.errors import RefError


class Tokenizer:
    def __init__(self, tk: _HFTokenizer, special: dict[str, str | None]):
        self.tk = tk
        tk.no_padding()
        tk.no_truncation()
        ids = {k: (tk.token_to_id(v) if v else None) for k, v in special.items()}
        self.bos_id, self.eos_id = ids.get("bos_token"), ids.get("eos_token")
        # Left padding only ever sits under a zero attention mask, so any id works; prefer the model's own.
        self.pad_id = next(i for i in (ids.get("pad_token"), self.eos_id, 0) if i is not None)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def batch(
        self, texts: list[str], max_length: int | None = None, add_special_tokens: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input_ids [B, T] and attention_mask [B, T] (1 = real); longer texts keep their first
        max_length tokens."""
        rows = [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        return left_pad(rows, self.pad_id)

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] and attention_mask [B, T] (1 = real) of the rows padded on the left to the longest."""
    T = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r) :] = torch.tensor(r)
            mask[i, T - len(r) :] = 1
    return ids, mask


def _token_text(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """Tokenizer of a registry alias, a local model folder, or a hub id (tokenizer.json is required)."""
    from ref.io.checkpoint import resolve

    folder = resolve(name_or_path)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise RefError(f"{folder} has no tokenizer.json: ref needs the fast-tokenizer file")
    try:
        tk = _HFTokenizer.from_file(str(path))
    except Exception as e:
        raise RefError(f"{path} cannot be read by `tokenizers` ({e}); re-download it") from e
    special: dict[str, str | None] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            d = json.loads(f.read_text())
            for k in ("bos_token", "eos_token", "pad_token"):
                special[k] = special.get(k) or _token_text(d.get(k))
    return Tokenizer(tk, special)

"""Fluency and diversity of sampled continuations, reported beside toxicity (as DExperts and DeStein do).

Fluency: the perplexity of each continuation given its prompt under a frozen reference model (the base model):
exp(mean NLL of the continuation's tokens, each predicted from the prompt and the continuation before it); a
trailing EOS is not scored. Continuations are scored as the token ids the evaluated model sampled, so the reference
model must share its tokenizer. An empty continuation (immediate EOS) has no token to score: it is left out and
counted. Reported over all samples of all prompts: the mean (the headline, as DExperts) and the median (one broken
sample cannot dominate it). A model that babbles gets a high perplexity even when its babble is "non-toxic".

Diversity: distinct-n as DExperts computes it (scripts/evaluation/evaluate_generations.py): over one prompt's
samples, the number of distinct word n-grams (words: the decoded text split at whitespace; n-grams within a
sample) divided by the number of words of those samples, then averaged over the prompts that have a word.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from ref.model import Transformer
from ref.tokenizer import Tokenizer, left_pad


def strip_eos(row: list[int], eos_id: int | None) -> list[int]:
    """The continuation's tokens without the EOS that ended it."""
    return row[:-1] if row and eos_id is not None and row[-1] == eos_id else row


@torch.no_grad()
def continuation_perplexities(
    model: Transformer, tok: Tokenizer, prompts: list[str], rows: list[list[list[int]]], batch_size: int = 32
) -> list[list[float | None]]:
    """out[p][s] = the perplexity under `model` of continuation rows[p][s] (token ids, a trailing EOS dropped) given
    prompt p (encoded as sampling encodes it: tok.encode, special tokens added); None for an empty continuation.
    The prompt + continuation sequences go `batch_size` at a time, left padded (positions count real tokens)."""
    encoded = [tok.encode(prompt) for prompt in prompts]
    if not all(encoded):
        raise ValueError("continuation_perplexities: a prompt has no token to condition on")
    flat = [(e, strip_eos(r, tok.eos_id)) for e, rs in zip(encoded, rows, strict=True) for r in rs]
    todo = [i for i, (_, c) in enumerate(flat) if c]
    ppl: list[float | None] = [None] * len(flat)
    device = next(model.parameters()).device
    for k in range(0, len(todo), batch_size):
        idx = todo[k : k + batch_size]
        ids, mask = left_pad([flat[i][0] + flat[i][1] for i in idx], tok.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]: token t+1 from <= t
        T = ids.shape[1]
        for j, i in enumerate(idx):
            n = len(flat[i][1])  # the continuation is the last n tokens of the row
            ppl[i] = math.exp(float(nll[j, T - 1 - n :].mean()))
    it = iter(ppl)
    return [[next(it) for _ in rs] for rs in rows]


def fluency_metrics(ppl: list[list[float | None]]) -> dict:
    """Mean and median perplexity over all scored samples, with the counts of scored and empty samples."""
    scored = [v for row in ppl for v in row if v is not None]
    empty = sum(v is None for row in ppl for v in row)
    return dict(
        fluency_perplexity=sum(scored) / len(scored) if scored else math.nan,
        fluency_perplexity_median=statistics.median(scored) if scored else math.nan,
        fluency_scored=len(scored),
        fluency_empty=empty,
    )


def distinct_n(texts: list[str], n: int) -> float | None:
    """DExperts' distinct-n of one prompt's samples: distinct word n-grams / words (None: no word)."""
    grams, words = set(), 0
    for text in texts:
        w = text.split()
        words += len(w)
        grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return len(grams) / words if words else None


def diversity_metrics(texts: list[list[str]]) -> dict:
    """distinct-1, -2, -3: each prompt's distinct-n over its samples, averaged over the prompts with a word."""
    out = {}
    for n in (1, 2, 3):
        vals = [v for row in texts if (v := distinct_n(row, n)) is not None]
        out[f"distinct_{n}"] = sum(vals) / len(vals) if vals else math.nan
    return out

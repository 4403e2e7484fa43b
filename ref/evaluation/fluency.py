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

from ref.evaluation.generate import token_logprobs
from ref.io.tokenizer import Tokenizer, left_pad
from ref.model import KVCache, Transformer


def strip_eos(row: list[int], eos_id: int | None) -> list[int]:
    """The continuation's tokens without the EOS that ended it."""
    return row[:-1] if row and eos_id is not None and row[-1] == eos_id else row


def logprob_perplexities(
    rows: list[list[list[int]]], logprobs: list[list[list[float]]], eos_id: int | None
) -> list[list[float | None]]:
    """out[p][s] = exp(-mean log-probability of the tokens of continuation rows[p][s], a trailing EOS dropped), from
    the log-probabilities the sampling model gave its own tokens (ref.evaluation.generate.sample_continuations
    with_logprobs): the perplexity under the model that sampled them, without a second pass. None for an empty
    continuation."""
    out = []
    for rs, ls in zip(rows, logprobs, strict=True):
        n = [len(strip_eos(r, eos_id)) for r in rs]
        out.append([math.exp(-sum(lp[:k]) / k) if k else None for lp, k in zip(ls, n, strict=True)])
    return out


@torch.no_grad()
def continuation_perplexities(
    model: Transformer, tok: Tokenizer, prompts: list[str], rows: list[list[list[int]]], batch_size: int = 32
) -> list[list[float | None]]:
    """out[p][s] = the perplexity under `model` of continuation rows[p][s] (token ids, a trailing EOS dropped) given
    prompt p (encoded as sampling encodes it: tok.encode, special tokens added); None for an empty continuation.

    Each prompt is run once: its tokens but the last are prefilled (left padded with the other prompts of its group)
    and the KV cache is shared by its continuations, which run together, each fed the prompt's last token and its
    own tokens but the last (right padded): the logits at those positions predict the continuation's tokens. A
    group holds whole prompts, up to `batch_size` continuations (one prompt's, when it has more)."""
    encoded = [tok.encode(prompt) for prompt in prompts]
    if not all(encoded):
        raise ValueError("continuation_perplexities: a prompt has no token to condition on")
    conts = [[strip_eos(r, tok.eos_id) for r in rs] for rs in rows]
    ppl: list[list[float | None]] = [[None] * len(rs) for rs in rows]
    for group in prompt_groups([sum(map(bool, cs)) for cs in conts], batch_size):
        todo = [(p, s) for p in group for s, c in enumerate(conts[p]) if c]
        prompt_of = [group.index(p) for p, _ in todo]
        nll = continuation_nll(model, tok, [encoded[p] for p in group], prompt_of, [conts[p][s] for p, s in todo])
        for (p, s), row in zip(todo, nll, strict=True):
            ppl[p][s] = math.exp(float(row.mean()))
    return ppl


def prompt_groups(counts: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive prompts (their indices) with `counts` rows each, grouped up to batch_size rows; a prompt with more
    rows than batch_size makes a group alone; prompts without rows are left out."""
    groups: list[list[int]] = []
    size = 0
    for p, k in enumerate(counts):
        if not k:
            continue
        if not groups or size + k > batch_size:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += k
    return groups


def continuation_nll(
    model: Transformer, tok: Tokenizer, prompts: list[list[int]], prompt_of: list[int], conts: list[list[int]]
) -> list[torch.Tensor]:
    """The NLL of each continuation's tokens (conts[r], nonempty, after prompts[prompt_of[r]]) under `model`, float32
    [len(conts[r])] each. The prompts but their last tokens are prefilled once, left padded, without the LM head;
    the rows select their prompt's keys and values and run right padded. The log-probabilities are computed as the
    sampling pass computes them (ref.evaluation.generate.token_logprobs, the vocabulary as the last dimension: a float32
    cross_entropy over [B, V, T] logits sums the softmax's denominator less accurately)."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad([p[:-1] for p in prompts], tok.pad_id))
    cache = KVCache()
    if ids.shape[1]:
        model(ids, mask, stop_after=model.config.num_layers - 1, cache=cache)
    which = torch.tensor(prompt_of, device=device)
    cache = KVCache({i: (k[which], v[which]) for i, (k, v) in cache.layers.items()})
    fed = [[prompts[p][-1], *c[:-1]] for p, c in zip(prompt_of, conts, strict=True)]
    new_mask = right_pad([[1] * len(f) for f in fed], 0).to(device)
    logits = model(right_pad(fed, tok.pad_id).to(device), torch.cat([mask[which], new_mask], 1), cache=cache).logits
    targets = right_pad(conts, 0).to(device)  # the padding's values are not read
    nll = -token_logprobs(logits.flatten(0, 1), targets.flatten()).view(targets.shape)
    return [row[: len(c)] for row, c in zip(nll, conts, strict=True)]


def right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """[len(rows), longest] long tensor of the rows, padded on the right with value."""
    L = max(map(len, rows))
    return torch.tensor([r + [value] * (L - len(r)) for r in rows])


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

"""Retain perplexity: how well the model still predicts held-out text of the retain kind.

The held-out texts are the manifest's `eval_perplexity` file(s) (docs/design.md section 3): texts the training never
reads (the demo: paragraphs written apart from the retain corpus; the hub: WikiText-2's validation split, the
training reading its test split as the RMU reference does). They are joined with a blank line between texts,
tokenized once (the tokenizer's special tokens, BOS for Llama and Mistral, at the start of the stream only) and cut
into non-overlapping windows of `window` tokens (the last, shorter window dropped unless it is the only one). Each
window is one sequence: its first token is context only, every other token is predicted from the tokens before it
in the same window. Perplexity = exp(mean NLL over all predicted tokens) = exp(sum of NLL / number predicted), the
loss of transformers' `model(ids, labels=ids)` pooled over the windows by their token counts.

Unlike multiple-choice accuracy, it still moves for a small model whose accuracy is near chance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ref.io.tokenizer import Tokenizer
from ref.model import Transformer

SEPARATOR = "\n\n"


def windows(tok: Tokenizer, texts: list[str], window: int) -> Tensor:
    """[N, window] token ids: the joined texts' token stream cut into full windows (one shorter window when the
    stream is shorter than `window`)."""
    if window < 2:
        raise ValueError(f"a perplexity window needs at least 2 tokens, got {window}")
    ids = tok.encode(SEPARATOR.join(texts))
    if len(ids) < 2:
        raise ValueError("the held-out texts give fewer than 2 tokens: nothing to predict")
    n = len(ids) // window
    if n == 0:
        return torch.tensor([ids])
    return torch.tensor(ids[: n * window]).view(n, window)


@torch.no_grad()
def perplexity(model: Transformer, tok: Tokenizer, texts: list[str], window: int, batch_size: int = 8) -> dict:
    """The perplexity of `texts` under `model` (see the module docstring), with the counts that define it."""
    ids = windows(tok, texts, window)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for k in range(0, len(ids), batch_size):
        x = ids[k : k + batch_size].to(device)
        logits = model(x, attention_mask=torch.ones_like(x)).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + x[:, 1:].numel()
    return dict(
        perplexity=math.exp(total / count),
        mean_nll=total / count,
        tokens=count,
        windows=len(ids),
        window=ids.shape[1],
        texts=len(texts),
        protocol=f"exp(mean NLL), non-overlapping windows of {ids.shape[1]} tokens",
    )

"""Set-difference pruning (Wei et al. 2024, arXiv 2402.05162), the pruning attack of Lucki et al. 2024 (arXiv
2409.18025): set to zero the weights that matter for the forget texts and not for the retain texts. If unlearning
added a mechanism that suppresses the knowledge, those weights carry it and pruning them can bring it back.

The criterion, as their code computes it (its "wandg" score, then the set difference):
- importance of a weight W_ij on a set of texts = |W_ij| * sum over the texts of |dL/dW_ij|, L each text's own
  causal LM loss (SNIP's connection sensitivity, Lee et al. 2019, with the gradient's magnitude summed text by text);
- for each block linear weight matrix separately: F = its top q fraction of weights by importance on the forget
  texts, R = its top p fraction by importance on the retain texts; the weights in F and not in R are set to zero.
Lucki et al. search p and q over 0.5%..20% (p >= q); here p = q = the fraction asked for.

The model passed in is not changed: the gradients are taken through torch.func.functional_call with detached copies
of the weights, and `pruned_weights` returns new values to swap in.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call

from ref.attacks.relearn import block_linear_weights, causal_lm_loss
from ref.io.errors import RefError
from ref.io.tokenizer import Tokenizer
from ref.model import Transformer


def snip_importance(model: Transformer, tok: Tokenizer, texts: list[str], max_len: int = 1024) -> dict[str, Tensor]:
    """Importance |W| * sum over `texts` of |dL/dW| of every block linear weight: name -> tensor of W's shape and
    dtype (the sum kept in W's dtype, as Wei et al.'s code keeps it). Each text (cut to `max_len` tokens) is its own
    batch; no gradient reaches the model's parameters."""
    if not texts:
        raise RefError("pruning needs texts to score the weights on; the forget or retain corpus is empty")
    frozen = {name: p.detach() for name, p in model.named_parameters()}
    weights = {name: frozen[name].detach().requires_grad_(True) for name in block_linear_weights(model)}
    summed = {name: torch.zeros_like(w) for name, w in weights.items()}
    device = next(model.parameters()).device
    for text in texts:
        ids, mask = (t.to(device) for t in tok.batch([text], max_length=max_len))
        if mask.sum() < 2:
            raise RefError(f"a pruning text has fewer than 2 tokens, so no next token to predict: {text[:40]!r}")
        loss = causal_lm_loss(functional_call(model, frozen | weights, args=(ids, mask)).logits, ids, mask)
        for name, g in zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True):
            summed[name] += g.abs()
    return {name: frozen[name].abs() * summed[name] for name in weights}


def set_difference(forget: Tensor, retain: Tensor, fraction: float) -> Tensor:
    """Boolean mask, shape of the scores: the top `fraction` of entries by `forget` importance that are not in the top
    `fraction` by `retain` importance (top k = int(fraction * numel) each, as Wei et al.'s code rounds)."""
    if not 0 < fraction < 1:
        raise RefError(f"pruning fraction {fraction} is not in (0, 1); give a share of the weights, e.g. 0.01")
    k = int(fraction * forget.numel())

    def top(scores: Tensor) -> Tensor:
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        return mask.index_fill_(0, scores.flatten().float().topk(k).indices, True)

    return (top(forget) & ~top(retain)).view(forget.shape)


@torch.no_grad()
def pruned_weights(
    model: Transformer, forget: dict[str, Tensor], retain: dict[str, Tensor], fraction: float
) -> dict[str, Tensor]:
    """New values of the scored weights: each with its `set_difference` entries set to zero. `forget` and `retain`
    are `snip_importance` of the same model on the two corpora. The model is not modified."""
    params = dict(model.named_parameters())
    return {name: params[name].masked_fill(set_difference(f, retain[name], fraction), 0) for name, f in forget.items()}

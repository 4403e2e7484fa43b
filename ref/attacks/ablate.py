"""Directional ablation (Lucki et al. 2024, arXiv 2409.18025): find the directions along which unlearning moved the
residual stream, then project them out of the stream by weight orthogonalisation (Arditi et al. 2024). If the
forgotten knowledge comes back, unlearning hid it behind those directions rather than removing it.

The original model is the same modules called with the original values of the few tensors unlearning changed
(torch.func.functional_call), as in ref/train.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from ref.io.errors import RefError
from ref.model import Transformer


@torch.no_grad()
def ablation_directions(
    model: Transformer, originals: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor, layers: Sequence[int]
) -> Tensor:
    """Unit directions [L, D] fp32, one per layer in `layers`: the mean over real tokens (attention_mask 1) of the
    unlearned minus the original residual stream after that block.

    model holds the unlearned weights; originals maps the names of the tensors unlearning changed to their original
    values. input_ids, attention_mask [B, T]."""
    if not layers:
        raise RefError("no layers given: pass the layers whose residual streams to compare, e.g. [0, 1, 2]")
    unknown = sorted(set(originals) - set(model.state_dict()))
    if unknown:
        raise RefError(f"originals has {unknown[:3]}, not tensors of the model: pass only the tensors that changed")
    kw = dict(attention_mask=attention_mask, taps=list(layers), stop_after=max(layers))
    h1 = model(input_ids, **kw).taps
    h0 = functional_call(model, originals, args=(input_ids,), kwargs=kw).taps
    real = attention_mask.bool()
    out = []
    for i in layers:
        d = (h1[i].float() - h0[i].float())[real].mean(0)
        if not d.norm() > 1e-6 * h0[i].float()[real].norm(dim=-1).mean():  # relative: rounding is no direction
            raise RefError(
                f"the unlearned and original residual streams agree after layer {i}: nothing to ablate "
                "(check that originals holds the values from before unlearning)"
            )
        out.append(d / d.norm())
    return torch.stack(out)


@torch.no_grad()
def ablated_weights(model: Transformer, directions: Tensor) -> dict[str, Tensor]:
    """New values for every tensor that writes into the residual stream, with `directions` [L, D] projected out:
    model.embed_tokens.weight (E <- E P), each block's self_attn.o_proj and mlp.down_proj weight (W <- P W) and bias
    if any (b <- P b), where P = I - Q Q^T and Q [D, k] is an orthonormal basis of the directions. Then the residual
    stream is orthogonal to every direction at every layer. The model is not modified.

    Tied embeddings (lm_head.weight is embed_tokens.weight): changing the embedding would also change the
    unembedding, so lm_head.weight is returned too, holding the original embedding. The caller must untie: assign
    the two as separate tensors (or call functional_call with tie_weights=False)."""
    if model.config.post_norm:
        raise RefError(
            f"{model.config.model_type} puts a norm between each sublayer and the residual add: directional ablation "
            "by weight orthogonalisation needs a pre-norm model (llama, mistral, qwen2)"
        )
    E = model.model.embed_tokens.weight
    q = _orthonormal(directions, model.config.hidden_size).to(E.device)  # [k, D]
    params = dict(model.named_parameters())
    out_side = lambda w: (w.float() - q.T @ (q @ w.float())).to(w.dtype)  # P w, w [D] or [D, *]
    new = {"model.embed_tokens.weight": (E.float() - (E.float() @ q.T) @ q).to(E.dtype)}
    for i in range(model.config.num_layers):
        for name in (f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj"):
            for kind in ("weight", "bias"):
                if f"{name}.{kind}" in params:
                    new[f"{name}.{kind}"] = out_side(params[f"{name}.{kind}"])
    if model.lm_head.weight is E:
        new["lm_head.weight"] = E.detach().clone()
    return new


def _orthonormal(directions: Tensor, dim: int) -> Tensor:
    """Rows [k, D] fp32: Gram-Schmidt in fp64 over the directions, dropping those (nearly) in the span of earlier
    ones."""
    if directions.ndim != 2 or directions.shape[1] != dim:
        raise RefError(f"directions must be [L, {dim}] (one per row), got shape {list(directions.shape)}")
    basis: list[Tensor] = []
    for d in directions.double():
        d = d / d.norm() if d.norm() > 0 else d
        for _ in range(2):  # twice: one classical pass leaves rounding-sized overlaps
            for b in basis:
                d = d - (b @ d) * b
        if d.norm() > 1e-6:
            basis.append(d / d.norm())
    if not basis:
        raise RefError("all directions are zero: nothing to ablate (pass the output of ablation_directions)")
    return torch.stack(basis).float()

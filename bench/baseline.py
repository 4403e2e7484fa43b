"""The baseline: RMU as the WMDP reference (centerforaisafety/wmdp, rmu/unlearn.py) runs it on transformers.

Two full copies of the model (updated and frozen), loaded with transformers; a forward hook on `model.layers[k]`
caches that block's output; every pass is a full forward including the LM head; three passes per step (updated on
forget, updated on retain, frozen on retain under no_grad); F.mse_loss against steering * u and against the frozen
activations; AdamW over the reference's selected tensors. As in the reference, the other parameters keep
requires_grad=True (transformers' default; the reference never turns it off), so backward also computes their
gradients below the tap layer. `lean=True` turns that off, to show how much of the gap it accounts for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_with_cache(model, inputs: dict, module: torch.nn.Module, no_grad: bool) -> torch.Tensor:
    """The reference's helper: run the whole model, return what the hook on `module` saw."""
    cache = []

    def hook(_module, _inputs, output):
        cache.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    try:
        if no_grad:
            with torch.no_grad():
                model(**inputs)
        else:
            model(**inputs)
    finally:
        handle.remove()
    return cache[0]


class BaselineRMU:
    def __init__(
        self,
        updated,
        frozen,
        tok,
        tap: int,
        update_layers: list[int],
        lr: float,
        steering: float,
        alpha: float,
        max_len: int,
        lean: bool = False,
    ):
        self.updated, self.frozen, self.tok, self.max_len, self.alpha = (
            updated.train(),
            frozen.eval(),
            tok,
            max_len,
            alpha,
        )
        self.updated.requires_grad_(not lean)
        self.params = [updated.model.layers[i].mlp.down_proj.weight.requires_grad_(True) for i in update_layers]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, eps=1e-6, weight_decay=0.0)  # transformers' AdamW
        self.updated_module, self.frozen_module = updated.model.layers[tap], frozen.model.layers[tap]
        D, dev = updated.config.hidden_size, updated.device
        u = torch.rand(1, 1, D, generator=torch.Generator().manual_seed(0))
        self.control = (u / u.norm() * steering).to(dev, updated.dtype)

    def inputs(self, texts: list[str]) -> dict:
        if not callable(self.tok):  # a token-id stub (random weights): same ids as ours gets
            ids, mask = self.tok.batch(texts, max_length=self.max_len)
            return dict(input_ids=ids.to(self.updated.device), attention_mask=mask.to(self.updated.device))
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_len)
        return {k: v.to(self.updated.device) for k, v in enc.items()}

    def step(self, forget_texts: list[str], retain_texts: list[str]) -> float:
        f_in = self.inputs(forget_texts)
        h_f = forward_with_cache(self.updated, f_in, self.updated_module, no_grad=False)
        unlearn_loss = F.mse_loss(h_f, self.control)
        r_in = self.inputs(retain_texts)
        h_r = forward_with_cache(self.updated, r_in, self.updated_module, no_grad=False)
        h_0 = forward_with_cache(self.frozen, r_in, self.frozen_module, no_grad=True)
        retain_loss = F.mse_loss(h_r, h_0) * self.alpha
        loss = unlearn_loss + retain_loss
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

"""The relearning attack (Lucki et al. 2024, arXiv 2409.18025): fine-tune the unlearned model on a few texts, then
evaluate it again. Their protocol is the default: LoRA r 128, alpha 16, dropout 0 on every block linear, AdamW lr
2e-4, weight decay 0.01, 3 epochs of batch size 1, 5% warmup then a linear decay to 0, texts cut to 1024 tokens.

The model passed in is not changed: LoRA trains A and B beside it (ref/attacks/lora.py); full fine-tuning trains clones
of the block linear weights through functional_call. `relearn` returns the new values of the changed tensors, to swap
in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from huggingface_hub.utils import tqdm
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim.lr_scheduler import LambdaLR

from ref.attacks.lora import LoRA
from ref.io.data import batches
from ref.io.errors import RefError
from ref.io.tokenizer import Tokenizer
from ref.model import Transformer


def causal_lm_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy (fp32) over the predicted real tokens of a left-padded batch.

    logits [B, T, vocab] predict input_ids [B, T] one position ahead; a token counts when it and the token before it
    are real (attention_mask [B, T], 1 = real), so a padded row gives the same loss as alone. The mean is over the
    batch's tokens, as transformers' causal LM loss."""
    keep = (attention_mask[:, 1:] & attention_mask[:, :-1]).bool()
    return F.cross_entropy(logits[:, :-1][keep].float(), input_ids[:, 1:][keep])


def warmup_then_linear_decay(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> LambdaLR:
    """lr x k / w for steps k < w = ceil(warmup * steps), then x (steps - k) / (steps - w): the peak lr at step w,
    0 after the last step (transformers' get_linear_schedule_with_warmup with warmup_ratio)."""
    w = math.ceil(warmup * steps)
    return LambdaLR(optimizer, lambda k: k / w if k < w else max(0.0, (steps - k) / max(1, steps - w)))


def block_linear_weights(model: Transformer) -> list[str]:
    """Names of the weights of every nn.Linear inside the blocks (attention and MLP projections)."""
    return [f"model.layers.{n}.weight" for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]


def relearn(
    model: Transformer,
    tok: Tokenizer,
    texts: list[str],
    *,
    lora: bool = True,
    r: int = 128,
    alpha: float = 16.0,
    lr: float = 2e-4,
    epochs: int = 3,
    batch_size: int = 1,
    warmup: float = 0.05,
    weight_decay: float = 0.01,
    max_len: int = 1024,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Fine-tune on `texts` with the causal LM loss; return name -> new value of every changed tensor.

    lora=True: LoRA (r, alpha, seeded by `seed`) on every block linear; returns the merged weights W + s B A.
    lora=False: every block linear weight trained directly, in the model's dtype; returns the trained weights.
    Each epoch shuffles the texts from (seed, epoch) and drops an incomplete last batch (ref.io.data.batches). AdamW,
    with warmup_then_linear_decay over all the steps, gradients clipped to `max_grad_norm` (the Hugging Face Trainer's
    default, which the attack's published protocol ran with). The model passed in stays bit-identical; swap the returned
    tensors in (functional_call, or load_state_dict(strict=False)) to evaluate the relearned model."""
    if not texts:
        raise RefError("relearn got no texts; pass the examples to fine-tune on (Lucki et al. use about 10)")
    if epochs < 1 or not lr > 0 or not 0 <= warmup < 1 or max_len < 2:
        raise RefError(
            f"relearn needs epochs >= 1, lr > 0, 0 <= warmup < 1 and max_len >= 2 (got epochs {epochs}, "
            f"lr {lr}, warmup {warmup}, max_len {max_len})"
        )
    short = [i for i, t in enumerate(texts) if len(tok.encode(t)[:max_len]) < 2]
    if short:
        raise RefError(f"text {short[0]} has fewer than 2 tokens, so no next token to predict; drop it")
    device = next(model.parameters()).device
    if lora:
        adapter = LoRA(model, r, alpha, seed=seed)
        params, forward = list(adapter.parameters()), adapter
    else:
        frozen = {name: p.detach() for name, p in model.named_parameters()}  # no gradient reaches the model
        trained = {name: frozen[name].clone().requires_grad_(True) for name in block_linear_weights(model)}
        params = list(trained.values())

        def forward(ids: Tensor, mask: Tensor) -> Tensor:
            return functional_call(model, frozen | trained, args=(ids, mask)).logits

    steps = [batch for epoch in range(epochs) for batch in batches(texts, batch_size, seed, epoch)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = warmup_then_linear_decay(optimizer, len(steps), warmup)
    bar = tqdm(steps, desc="relearn" + (" (LoRA)" if lora else ""), unit="step", dynamic_ncols=True)
    for batch in bar:
        ids, mask = (t.to(device) for t in tok.batch(batch, max_length=max_len))
        loss = causal_lm_loss(forward(ids, mask), ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4g}")
    return adapter.merged() if lora else {name: t.detach() for name, t in trained.items()}

"""The soft-prompt attack (an embedding-space attack, Schwinn et al. 2024, arXiv 2402.09063): k trainable input
embeddings placed before every question, trained with Adam to raise the log-likelihood of the right answers of some
forget questions (the T split) in the evaluation's own prompt format, with the model frozen. The forget accuracy is
then measured on the other questions (the V split) with the same embeddings in front. No weight changes, and no
weight gradients: only the k x D prompt trains.

A soft prompt can make a model say nearly anything it is trained to say (Chen et al. 2025, arXiv 2502.15836), so
what it brings back counts only beyond what the same training gives the base model (ref.attack's net recovery).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from huggingface_hub.utils import tqdm
from torch import Tensor
from torch.func import functional_call

from ref.evaluation.mc import LETTERS, cloze_prompt, encode_pair, mc_prompt
from ref.io.errors import RefError
from ref.io.tokenizer import Tokenizer, left_pad
from ref.model import Output, Transformer

CHUNK = 4  # questions a forward while training; their gradients are summed into the step


class SoftPrompted:
    """`model` with `prompt` [k, D] as k input embeddings before every sequence, called as the model is called
    (input_ids, attention_mask, taps, stop_after): what ref.evaluation.mc scores through. The prompt's positions are
    real tokens (positions count from it); outputs and taps cover the input's positions only. The model runs through
    functional_call with detached parameters, so gradients reach the prompt and never the model."""

    def __init__(self, model: Transformer, prompt: Tensor):
        self.inner, self.prompt = model, prompt
        self.frozen = {name: p.detach() for name, p in model.named_parameters()}
        k = prompt.shape[0]
        self.config = replace(model.config, max_position_embeddings=model.config.max_position_embeddings - k)
        # the final norm and head that ref.evaluation.mc reads out with
        self.model, self.lm_head = model.model, model.lm_head

    def parameters(self):
        return self.inner.parameters()

    def read_out(self, h: Tensor) -> Tensor:
        """Logits of the residual stream h [..., D] through the frozen final norm and LM head."""
        normed = functional_call(self.inner.model.norm, {"weight": self.frozen["model.norm.weight"]}, (h,))
        return F.linear(normed, self.frozen.get("lm_head.weight", self.frozen["model.embed_tokens.weight"]))

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        taps: Sequence[int] = (),
        stop_after: int | None = None,
    ) -> Output:
        B, k = input_ids.shape[0], self.prompt.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = F.embedding(input_ids, self.frozen["model.embed_tokens.weight"])
        x = torch.cat([self.prompt.to(x.dtype).expand(B, k, -1), x], dim=1)
        mask = torch.cat([attention_mask.new_ones(B, k), attention_mask], dim=1)
        kw = dict(hidden=x, attention_mask=mask, taps=list(taps), stop_after=stop_after)
        out = functional_call(self.inner, self.frozen, args=(), kwargs=kw)
        logits = None if out.logits is None else out.logits[:, k:]
        return Output(logits, {i: h[:, k:] for i, h in out.taps.items()})


def answer_pairs(tok: Tokenizer, rows_by_task: dict[str, list[dict]], mode: str) -> list[tuple[list[int], list[int]]]:
    """(context ids, answer ids) per question: the evaluation's prompt (ref.evaluation.mc, letter or cloze) and its
    right answer (" B", or " {the right choice}"), split as ref.evaluation.mc splits a request."""
    pairs = []
    for task, rows in rows_by_task.items():
        for row in rows:
            if mode == "letter":
                pairs.append(encode_pair(tok, mc_prompt(row, task), f" {LETTERS[row['answer']]}"))
            else:
                pairs.append(encode_pair(tok, cloze_prompt(row, task), f" {row['choices'][row['answer']]}"))
    return pairs


def answer_nll(model: SoftPrompted, pairs: list[tuple[list[int], list[int]]]) -> Tensor:
    """-log P(answer | context) per pair [len(pairs)] fp32, through the soft-prompted model (the final norm and LM
    head read the answer positions only, as ref.evaluation.mc scores them)."""
    seqs, n = [(c + x)[:-1] for c, x in pairs], [len(x) for _, x in pairs]  # the last n positions predict the answer
    ids, mask = left_pad(seqs, pad_id=0)
    device, last = next(model.parameters()).device, model.config.num_layers - 1
    h = model(ids.to(device), mask.to(device), taps=[last], stop_after=last).taps[last]
    logp = model.read_out(h[:, -max(n) :]).float().log_softmax(-1)  # the head only where the answer is
    nll = []
    for b, (_, x) in enumerate(pairs):
        answer = torch.tensor(x, device=device)[:, None]
        nll.append(-logp[b, logp.shape[1] - n[b] :].gather(1, answer).sum())
    return torch.stack(nll)


def initial_prompt(model: Transformer, tokens: int, seed: int) -> Tensor:
    """[tokens, D] fp32: the input embeddings of `tokens` vocabulary entries drawn with `seed`."""
    E = model.model.embed_tokens.weight
    drawn = torch.randint(E.shape[0], (tokens,), generator=torch.Generator().manual_seed(seed))
    return E.detach()[drawn.to(E.device)].float().clone()


def train_soft_prompt(
    model: Transformer,
    tok: Tokenizer,
    rows_by_task: dict[str, list[dict]],
    mode: str,
    *,
    tokens: int = 10,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = CHUNK,
    seed: int = 0,
) -> Tensor:
    """The soft prompt [tokens, D] fp32 that minimises the mean answer NLL of the questions in `rows_by_task` ({task:
    rows}, the T split) with `model` frozen: Adam (lr) for `steps` full-batch steps, the questions in chunks of
    `batch_size` with their gradients summed (the same step whatever the chunking, up to rounding). Starts from
    `initial_prompt`. The model is not changed."""
    if tokens < 1 or steps < 1 or not lr > 0 or batch_size < 1:
        got = f"tokens {tokens}, steps {steps}, lr {lr}, batch_size {batch_size}"
        raise RefError(f"the soft prompt needs tokens >= 1, steps >= 1, lr > 0 and batch_size >= 1 (got {got})")
    pairs = answer_pairs(tok, rows_by_task, mode)
    if not pairs:
        raise RefError("the soft prompt got no questions to train on; give forget MC questions (a T split)")
    prompt = initial_prompt(model, tokens, seed).requires_grad_(True)
    optimizer = torch.optim.Adam([prompt], lr=lr)
    bar = tqdm(range(steps), desc="soft prompt", unit="step", dynamic_ncols=True)
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, len(pairs), batch_size):
            loss = answer_nll(SoftPrompted(model, prompt), pairs[start : start + batch_size]).sum() / len(pairs)
            loss.backward()
            total += loss.item()
        optimizer.step()
        bar.set_postfix(nll=f"{total:.4g}")
    return prompt.detach()

"""Text generation with the KV cache: greedy or temperature / nucleus (top-p) sampling.

python -m ref.generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 20
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from ref.io.tokenizer import Tokenizer
from ref.model import KVCache, Transformer

CANDIDATES = 256  # tokens looked at first for the nucleus (SmolLM2 at p 0.9: median 53-156 tokens kept)


def top_p_filter(logits: torch.Tensor, top_p: float, candidates: int = CANDIDATES) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p; the rest get -inf.
    The most likely token is always kept. (Sampling computes the same set in `probabilities`.)"""
    if top_p >= 1.0:
        return logits
    flat = logits.reshape(-1, logits.shape[-1])
    keep = nucleus(_exp(flat), top_p, candidates).view(logits.shape)
    return logits.masked_fill(~keep, float("-inf"))


def _exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x - max) per row: softmax before its normalisation."""
    return (x - x.amax(-1, keepdim=True)).exp_()


def nucleus(e: torch.Tensor, top_p: float, candidates: int = CANDIDATES) -> torch.Tensor:
    """e [R, V] = unnormalised probabilities (exp(logit - max)) -> [R, V] bool, True for the tokens top-p keeps.

    A token is kept when the tokens more likely than it hold less than top_p (transformers' TopPLogitsWarper);
    the most likely token always is. The mass is summed in float64. The nucleus is looked for among the
    `candidates` most likely tokens (a partial sort, not a sort of the vocabulary); a row whose candidates hold
    less than top_p looks again among 8 times as many, up to the whole vocabulary."""
    V = e.shape[-1]
    k = min(candidates, V)
    z = e.sum(-1, keepdim=True, dtype=torch.float64)
    top, idx = e.topk(k, dim=-1)  # sorted, most likely first
    q = top.double() / z
    cum = q.cumsum(-1)
    keep_sorted = cum - q < top_p  # the mass before this token is below top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, idx, keep_sorted)
    short = cum[:, -1] < top_p  # the candidates hold less than top_p: more tokens are kept than were looked at
    if k < V and bool(short.any()):
        rows = short.nonzero().squeeze(-1)
        keep[rows] = nucleus(e[rows], top_p, 8 * k)
    return keep


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution of logits [..., V] in float32: softmax(logits / temperature) over the top-p
    nucleus, renormalised (computed in place: exp(x - max), zero outside the nucleus, over its sum)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    if top_p >= 1.0:
        return x.softmax(-1)
    flat = x.reshape(-1, x.shape[-1])
    e = _exp(flat)
    e.masked_fill_(~nucleus(e, top_p), 0.0)
    return e.div_(e.sum(-1, keepdim=True)).view(x.shape)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [n, V] (CPU, contiguous, rows summing to 1) -> one token id a row: the draw of
    torch.multinomial(probs, 1, generator=generator), from the same random numbers, at a third of its cost.

    torch.multinomial draws a row as argmax(probs / q), q = -log1p(-u) cast to float32, u uniform in [0, 1) in
    float64, one a token: V logarithms a row, almost all for tokens of probability 0, which cannot win. The same u
    are drawn here (torch.rand in float64 takes the same numbers from the generator), and q is computed for the
    tokens of nonzero probability only (exponential_race)."""
    u = torch.rand(probs.shape, dtype=torch.float64, generator=generator)
    return exponential_race(probs, u)


def exponential_race(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [n, V], u [n, V] in [0, 1) -> argmax of each row of probs / q, q = float32(-log1p(-u)), the first index
    among equal maxima (torch.argmax), computed on the nonzero probabilities. A row with a u of 0 (q = 0: 0 / 0 is
    NaN, which argmax takes for the maximum; once in 2^53 draws) is computed whole."""
    n, V = probs.shape
    rows, ids = probs.nonzero(as_tuple=True)
    ratio = probs[rows, ids] / (-torch.log1p(-u[rows, ids])).float()
    best = ratio.new_zeros(n).scatter_reduce_(0, rows, ratio, "amax")
    top = ratio == best[rows]
    out = ids.new_full((n,), V).scatter_reduce_(0, rows[top], ids[top], "amin")
    zero = u.amin(-1) == 0
    if bool(zero.any()):
        out[zero] = (probs[zero] / (-torch.log1p(-u[zero])).float()).argmax(-1)
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [B, V], tokens [B] -> log_softmax(logits)[b, tokens[b]] in float32 [B]."""
    x = logits.float()
    return x.gather(-1, tokens[:, None]).squeeze(-1) - x.logsumexp(-1)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """logits [B, V] -> token ids [B]: argmax when temperature is 0, else a sample (one draw on the [B, V]
    probabilities, as transformers' generate)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return draw(probabilities(logits, temperature, top_p).cpu(), generator).to(logits.device)


@torch.no_grad()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """New token ids for each prompt (a batch, left padded, decoded with the KV cache). Rows that emit EOS stop
    there; their ids end with EOS."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in tokenizer.batch(prompts))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache, out = KVCache(), []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = model(ids, mask, cache=cache).logits[:, -1]
    for _ in range(max_new_tokens):
        tok = next_token(logits, temperature, top_p, generator)
        out.append(tok)
        if stop_at_eos and tokenizer.eos_id is not None:
            done |= tok == tokenizer.eos_id
            if done.all():
                break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(tok[:, None], mask, cache=cache).logits[:, -1]
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    if stop_at_eos and tokenizer.eos_id is not None:
        rows = [r[: r.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in r else r for r in rows]
    return rows


class RepeatedCache(KVCache):
    """A prefilled KVCache with each row repeated `repeats` times (rows b * repeats .. b * repeats + repeats - 1
    hold row b), in buffers sized for `extra` more positions: each decoding step writes its keys and values in
    place (KVCache concatenates, copying the whole cache at every step). `layers` holds views of the filled part."""

    def __init__(self, prefill: KVCache, repeats: int, extra: int):
        super().__init__()
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, kv in prefill.layers.items():
            B, H, S, D = kv[0].shape
            bufs = tuple(t.new_empty(B * repeats, H, S + extra, D) for t in kv)
            for buf, t in zip(bufs, kv, strict=True):
                buf.view(B, repeats, H, S + extra, D)[:, :, :, :S] = t[:, None]
            self.buffers[i] = bufs
            self.layers[i] = (bufs[0][:, :, :S], bufs[1][:, :, :S])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.buffers[layer]
        s, T = self.layers[layer][0].shape[2], k.shape[2]
        if s + T > kb.shape[2]:
            raise RuntimeError(f"RepeatedCache: {s + T} positions asked, room for {kb.shape[2]}")
        kb[:, :, s : s + T], vb[:, :, s : s + T] = k, v
        self.layers[layer] = (kb[:, :, : s + T], vb[:, :, : s + T])
        return self.layers[layer]


@torch.no_grad()
def sample_continuations(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    n: int,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seeds: list[int] | None = None,
    stop_at_eos: bool = True,
    with_logprobs: bool = False,
) -> list[list[list[int]]] | tuple[list[list[list[int]]], list[list[list[float]]]]:
    """n continuations of each prompt: out[p][s] = the new token ids of sample s of prompt p (ending with EOS where
    one was emitted). The prompts are prefilled once, as one left-padded batch; each prompt's KV cache and last
    logits are then repeated for its n samples and the len(prompts) * n rows decode together.

    seeds[p] seeds prompt p's own generator, which draws its n rows at every step (one draw on its [n, V]
    probabilities, as generate([prompt] * n, seed=seeds[p]) does), so the random stream of a prompt depends neither
    on the other prompts of the batch nor on their order. temperature 0: argmax, no generator.

    with_logprobs: (out, logprobs), logprobs[p][s][t] = the log-probability of token t of out[p][s] under the model
    itself (log-softmax of its logits in float32: temperature 1, the whole vocabulary), the fluency of the model's
    own samples without a second pass (ref.evaluation.fluency)."""
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"sample_continuations: {len(seeds)} seeds for {len(prompts)} prompts")
    device = next(model.parameters()).device
    B = len(prompts)
    ids, mask = (t.to(device) for t in tokenizer.batch(prompts))
    prefill = KVCache()
    logits = model(ids, mask, cache=prefill).logits[:, -1].repeat_interleave(n, dim=0)
    cache = RepeatedCache(prefill, n, max_new_tokens)
    del prefill
    mask = mask.repeat_interleave(n, dim=0)
    gens = [torch.Generator().manual_seed(s) for s in seeds] if seeds is not None else [None] * B
    eos = tokenizer.eos_id if stop_at_eos else None
    done = torch.zeros(B * n, dtype=torch.bool, device=device)
    rows_of = [slice(p * n, (p + 1) * n) for p in range(B)]  # prompt p's rows
    out, logprobs = [], []
    for step in range(max_new_tokens):
        # prompt by prompt: its generator, and [n, V] temporaries small enough to be reused by the allocator and to
        # stay in the CPU's caches (a whole batch's, 200 x 49,152 floats = 39 MB, are mapped afresh each time)
        tok = torch.cat([next_token(logits[r], temperature, top_p, gen) for r, gen in zip(rows_of, gens, strict=True)])
        out.append(tok)
        if with_logprobs:
            logprobs.append(torch.cat([token_logprobs(logits[r], tok[r]) for r in rows_of]))
        if eos is not None:
            done |= tok == eos
            if done.all():
                break
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(tok[:, None], mask, cache=cache).logits[:, -1]
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in range(B * n)]
    if eos is not None:
        rows = [r[: r.index(eos) + 1] if eos in r else r for r in rows]
    tokens = [rows[r] for r in rows_of]
    if not with_logprobs:
        return tokens
    values = torch.stack(logprobs, 1).tolist() if logprobs else [[] for _ in rows]
    values = [v[: len(row)] for v, row in zip(values, rows, strict=True)]
    return tokens, [values[r] for r in rows_of]


# -------------------------------------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class GenerateSettings:
    """What `python -m ref.generate` runs, as its command line gives it (checked by `check`)."""

    prompts: tuple[str, ...]
    model: str = "smollm2-135m"  # a registry alias, local model folder, or hub id
    max_new_tokens: int = 20
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    dtype: str | None = None  # None: fp32 on CPU, bf16 on GPU
    device: str | None = None


def parser() -> argparse.ArgumentParser:
    d = GenerateSettings(prompts=())  # the defaults
    p = argparse.ArgumentParser(prog="python -m ref.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=d.model, help="registry alias, local model folder, or hub id")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None)
    return p


def check(s: GenerateSettings) -> None:
    """Every value of `s` in range (one RefError line), before anything is loaded."""
    from ref.io import validate
    from ref.io.errors import RefError

    if "" in s.prompts:
        k = s.prompts.index("") + 1
        raise RefError(f"--prompt is '' (prompt {k}): an empty prompt has nothing to continue; give some text")
    validate.number("--max-new-tokens", s.max_new_tokens, low=0, integer=True)
    validate.number("--temperature", s.temperature, low=0)
    validate.number("--top-p", s.top_p, low=0, high=1, low_open=True)
    validate.number("--seed", s.seed, low=0, integer=True)
    validate.device("--device", s.device)
    validate.dtype("--dtype", s.dtype)


def continuations(s: GenerateSettings) -> list[str]:
    """Each prompt followed by its continuation; the prompts and the new tokens must fit the model's positions."""
    from ref.io.checkpoint import load_model, resolve
    from ref.io.config_json import read_config
    from ref.io.errors import RefError
    from ref.io.tokenizer import load_tokenizer

    folder = resolve(s.model)
    tok = load_tokenizer(folder)
    longest, positions = max(len(tok.encode(t)) for t in s.prompts), read_config(folder).max_position_embeddings
    if longest + s.max_new_tokens > positions:
        fix = f"use --max-new-tokens {positions - longest} or less" if longest <= positions else "shorten the prompt"
        n = s.max_new_tokens
        raise RefError(
            f"--max-new-tokens is {n}: the longest prompt ({longest} tokens) plus {n} new tokens exceeds "
            f"the model's {positions} positions (max_position_embeddings); {fix}"
        )
    model = load_model(folder, dtype=s.dtype, device=s.device)
    if len(model.placement.runs) > 1:
        print(f"placement: {model.placement.describe()}", file=sys.stderr)
    torch.manual_seed(s.seed)
    rows = generate(model, tok, list(s.prompts), s.max_new_tokens, s.temperature, s.top_p, s.seed)
    return [prompt + tok.decode(row) for prompt, row in zip(s.prompts, rows, strict=True)]


def command(argv: list[str] | None) -> int:
    a = parser().parse_args(argv)
    s = GenerateSettings(
        prompts=tuple(a.prompt),
        model=a.model,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        seed=a.seed,
        dtype=a.dtype,
        device=a.device,
    )
    check(s)
    for text in continuations(s):
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    from ref.io.cli import run_command

    return run_command(command, argv)

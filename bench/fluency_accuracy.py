"""How accurate each fluency computation is: the demo's toxicity prompts (30 x 5 samples of the base model, the
evaluation's seeds), each continuation's perplexity given its prompt computed four ways, against float64:

- the sampling pass's own log-probabilities (ref.evaluation.fluency.logprob_perplexities),
- the rescoring with one prefill a prompt (ref.evaluation.fluency.continuation_perplexities),
- float32 cross_entropy over [B, V, T] logits (the vocabulary as dimension 1),
- float64 log-softmax over the vocabulary (the reference).

    python -m bench.fluency_accuracy
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import ref
from ref.evaluation.fluency import continuation_perplexities, logprob_perplexities, strip_eos
from ref.evaluation.toxicity import sampled_continuations
from ref.io.data import load_goal_data, read_prompts, resolve_data_dir
from ref.io.tokenizer import left_pad

MODEL = "smollm2-135m"


def whole_sequence_perplexities(
    model, tok, prompts: list[str], rows: list[list[list[int]]], form: str = "last"
) -> list[list[float | None]]:
    """Each continuation's perplexity (a trailing EOS dropped; None: an empty continuation) from one forward over its
    whole prompt + continuation, 32 sequences a batch, left padded: the rescoring without a shared prefill. The NLL
    of the continuation's tokens: "last", float32 cross_entropy with the vocabulary as the last dimension (as
    transformers' loss); "bvt", float32 cross_entropy over [B, V, T] logits; "f64", float64 log-softmax."""
    flat = [(tok.encode(p), strip_eos(r, tok.eos_id)) for p, rs in zip(prompts, rows, strict=True) for r in rs]
    todo = [i for i, (_, c) in enumerate(flat) if c]
    ppl: list[float | None] = [None] * len(flat)
    for k in range(0, len(todo), 32):
        idx = todo[k : k + 32]
        ids, mask = left_pad([flat[i][0] + flat[i][1] for i in idx], tok.pad_id)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        if form == "last":
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        elif form == "bvt":
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        else:
            nll = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
        for j, i in enumerate(idx):
            ppl[i] = math.exp(float(nll[j, ids.shape[1] - 1 - len(flat[i][1]) :].mean()))
    it = iter(ppl)
    return [[next(it) for _ in rs] for rs in rows]


def main() -> int:
    model, tok = ref.load_model(MODEL, dtype=torch.float32, device="cpu"), ref.load_tokenizer(MODEL)
    prompts = read_prompts(load_goal_data(resolve_data_dir("demo", "toxicity"), "toxicity").eval_prompts)
    sampled = list(sampled_continuations(model, tok, prompts, 5, 20, 0.9, 1.0, 0, with_logprobs=True))
    rows = [r for r, _ in sampled]
    ways = {
        "own log-probabilities (sampling pass)": logprob_perplexities(rows, [lp for _, lp in sampled], tok.eos_id),
        "one prefill a prompt": continuation_perplexities(model, tok, prompts, rows),
        "float32 cross_entropy over [B, V, T]": whole_sequence_perplexities(model, tok, prompts, rows, "bvt"),
    }
    ways = {name: [v for r in ppl for v in r] for name, ppl in ways.items()}
    f64 = [v for r in whole_sequence_perplexities(model, tok, prompts, rows, "f64") for v in r]

    def mean(values: list[float | None]) -> float:
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept)

    print("| computation | mean perplexity | largest relative difference to float64 | mean relative difference |")
    print("|---|---|---|---|")
    print(f"| float64 log-softmax | {mean(f64):.6f} | | |")
    for name, values in ways.items():
        rel = [abs(a - b) / b for a, b in zip(values, f64, strict=True) if b is not None]
        print(f"| {name} | {mean(values):.6f} | {max(rel):.2e} | {sum(rel) / len(rel):.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

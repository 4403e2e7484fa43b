"""Where the time of the toxicity sampling goes: the bench's sampling workload (8 demo prompts x 25 samples x 20
new tokens, top-p 0.9, T 1, ref.evaluation.toxicity.sampled_continuations) with its phases timed by wall clock.

    python -m bench.profile_sampling --threads 2 --repeats 3

Phases: the prompts' prefill; in each decoding step the model's forward split into the attention kernel (SDPA), the
LM head (whole vocabulary) and the rest of the blocks (projections, MLP, norms, rope, cache); the sampling
distribution (ref.evaluation.generate.probabilities: softmax over the top-p nucleus); the draw
(ref.evaluation.generate.draw, or torch.multinomial where ref.generate calls it); "other" is the rest of the wall time
(the Python loop, the masks, the ids to lists). Each phase is timed around its call (the CPU runs every op
synchronously), through wrappers this script puts around the functions for the run. Timings on a machine other jobs
share: compare the shares of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torch.nn.functional as F

from bench import measure, workload

SPENT: dict[str, float] = defaultdict(float)
PHASE = ["decode"]  # "prefill" while the forward of the prompts runs


def timed(name: str, f: Callable) -> Callable:
    """f, adding its wall time to SPENT["<phase>: <name>"]."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            SPENT[f"{PHASE[0]}: {name}"] += time.perf_counter() - t0

    return wrapper


def forward_in_phase(forward: Callable) -> Callable:
    """The model's forward, timed as "prefill" (more than one new token a row) or "decode" with its phase set."""

    def wrapper(input_ids=None, *args, **kwargs):
        PHASE[0] = "prefill" if input_ids.shape[1] > 1 else "decode"
        try:
            return timed("forward", forward)(input_ids, *args, **kwargs)
        finally:
            PHASE[0] = "decode"

    return wrapper


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one a core)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; medians are printed")
    p.add_argument("--prompts", type=int, default=8, help="demo toxicity prompts")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    from ref import load_model, load_tokenizer
    from ref import model as model_module
    from ref.evaluation import generate
    from ref.evaluation.toxicity import sampled_continuations
    from ref.io.data import load_goal_data, read_prompts, resolve_data_dir

    model, tok = load_model(workload.MODEL, dtype=torch.float32, device="cpu"), load_tokenizer(workload.MODEL)
    prompts = read_prompts(load_goal_data(resolve_data_dir("demo"), "toxicity").eval_prompts)[: a.prompts]

    # the LM head and SDPA run inside the forward: their time is subtracted from it below
    model.forward = forward_in_phase(model.forward)
    model.lm_head.forward = timed("LM head", model.lm_head.forward)
    model_module.F = type(F)("F_timed")
    model_module.F.__dict__.update(vars(F))
    model_module.F.scaled_dot_product_attention = timed("attention (SDPA)", F.scaled_dot_product_attention)
    for name in ("probabilities", "draw"):
        if hasattr(generate, name):
            setattr(generate, name, timed(f"sampling: {name}", getattr(generate, name)))
    generate.torch = type(torch)("torch_timed")
    generate.torch.__dict__.update(vars(torch))
    generate.torch.multinomial = timed("sampling: torch.multinomial", torch.multinomial)

    def run():
        return list(sampled_continuations(model, tok, prompts, 25, 20, 0.9, 1.0, seed=0))

    runs = []
    for r in range(a.repeats + 1):
        SPENT.clear()
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
        if r:
            runs.append(dict(SPENT, total=total))
    med = defaultdict(float, {k: statistics.median(x.get(k, 0.0) for x in runs) for k in set().union(*runs)})
    for phase in ("prefill", "decode"):
        med[f"{phase}: forward"] -= med[f"{phase}: LM head"] + med[f"{phase}: attention (SDPA)"]
    med = {
        k.replace(": forward", ": rest of the forward (projections, MLP, norms, rope, cache)"): v
        for k, v in med.items()
    }
    med["other (Python loop, masks, lists)"] = med["total"] - sum(v for k, v in med.items() if k != "total")
    print(
        f"{len(prompts)} demo prompts x 25 samples x 20 new tokens, top-p 0.9; {measure.machine()}; "
        f"commit {measure.commit()}; median of {a.repeats} runs"
    )
    for k, v in sorted(med.items(), key=lambda kv: -kv[1]):
        print(f"{k:60s} {v:7.2f} s  {v / med['total']:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

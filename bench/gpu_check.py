"""`make gpu-check`: the checks that need a GPU, in one short run (under 8 minutes on one 80 GB-class GPU), one table.

    python -m bench.gpu_check                      # on a machine with a CUDA GPU
    python -m bench.gpu_check --device cpu --step-arch smollm2-135m --big-arch smollm2-135m --dtype float32  # path

1. Golden, bf16 on the GPU: the four tiny families' logits against transformers' (SDPA) on the same GPU. The
   tolerance is relative to the truth, not a fixed number: ours in bf16 must be no further from transformers' fp32
   logits than transformers' own bf16 logits are (x 1.5, + 1e-2 for ties in rounding), and the bf16 difference
   itself at most BF16_ATOL = 0.1 (tests/test_golden_families.py explains that figure).
2. One full-size step with random bf16 weights, ours (RMU, and cosine + REINFORCE) against the baseline written as
   the WMDP reference runs RMU (two copies, full forwards): time and peak GPU memory (bench.run's rows).
3. One WMDP step (ours: cosine + REINFORCE, tap 7, down_proj of 5-7, batch 4 x 512) of a 70B model with random
   weights, only the embedding and blocks 0..7 on the GPU, as `ref.unlearn --model llama3.1-70b` loads it: time and
   peak memory, beside the plan's estimate.

Writes gpu-check.json beside the table. Nothing is downloaded: every model is built here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from bench import measure, workload
from bench.run import BATCH, SEQ, TAP, rows_random, table

GiB = 2**30
BF16_ATOL = 0.1
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Cats and dogs", "Unlearning removes knowledge, café!"]


def check(name: str, metric: str, ours: float, limit: float, **info) -> dict:
    """A row of the table where `ours` must stay at or below `limit` (ratio = ours / limit)."""
    return dict(
        name=name,
        metric=metric,
        ours=ours,
        baseline=limit,
        ratio=ours / limit if limit else 0.0,
        target=1.0,
        passed=ours <= limit,
        **info,
    )


def golden(device: str) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from ref import load_model, load_tokenizer
    from tests.conftest import FAMILIES
    from tests.tiny_models import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            folder = make_tiny_model(family, Path(tmp) / family)
            tok = load_tokenizer(folder)
            ids, mask = (t.to(device) for t in tok.batch(PROMPTS))
            pos, real = (mask.cumsum(-1) - 1).clamp(min=0), mask.bool()

            logits = {}
            for dtype in (torch.float32, torch.bfloat16):
                m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
                with torch.no_grad():
                    logits[dtype] = m.eval()(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()[real]
            truth, theirs = logits[torch.float32], logits[torch.bfloat16]
            with torch.no_grad():
                ours = load_model(folder, dtype="bfloat16", device=device)(ids, mask).logits.float()[real]
            d_ours, d_theirs = (ours - truth).abs().max().item(), (theirs - truth).abs().max().item()
            d_pair = (ours - theirs).abs().max().item()
            rows.append(
                check(
                    f"golden bf16 {family}: |ours - transformers fp32|",
                    "max abs",
                    d_ours,
                    1.5 * d_theirs + 1e-2,
                    transformers_bf16_vs_fp32=d_theirs,
                )
            )
            rows.append(check(f"golden bf16 {family}: |ours - transformers bf16|", "max abs", d_pair, BF16_ATOL))
    return rows


def big_step(arch: str, dtype: torch.dtype, device: str, repeats: int) -> list[dict]:
    """One WMDP step of `arch` with only the embedding and blocks 0..TAP materialised (random weights)."""
    from ref.io.config_json import config_from_dict
    from ref.io.registry import REGISTRY
    from ref.run.memory import estimate_peak_bytes
    from ref.run.plan import Settings, resolve

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = workload.random_ours(arch, dtype, device, blocks=TAP + 1)
    data = workload.demo_data()
    topic, forget, retain = workload.batch_texts(data, BATCH)
    u = workload.unlearner(model, workload.TokenStub(model.config.vocab_size), data, "ours", TAP, SEQ, BATCH, arch)
    u(topic, forget, retain)  # warm-up: compiles the losses
    t = measure.alternate({"ours": lambda: u(topic, forget, retain)}, repeats, warmup=0)["ours"]
    peak = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
    cfg = config_from_dict(REGISTRY[arch].arch)
    s = Settings(model=arch, tap_layer=TAP, update_layers=workload.update_layers(TAP), max_len=SEQ, batch_size=BATCH)
    est = estimate_peak_bytes(cfg, resolve(s, cfg), torch.finfo(dtype).bits // 8)["ours"] / GiB
    info = dict(
        dtype=str(dtype).removeprefix("torch."),
        shapes=dict(arch=arch, blocks_loaded=TAP + 1, batch=BATCH, seq=SEQ, tap_layer=TAP, weights="random"),
    )
    rows = [
        dict(
            name=f"{arch}: WMDP step, blocks 0..{TAP} on one device",
            metric="time s",
            ours=t["median"],
            baseline=float("nan"),
            ratio=float("nan"),
            target=None,
            passed=None,
            **info,
        )
    ]
    if cuda:
        rows.append(
            check(f"{arch}: same step, peak GPU memory vs 80 GiB", "peak GiB", peak, 80.0, estimate_GiB=est, **info)
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--step-arch", default="mistral-7b", help="the full-size step against the baseline")
    p.add_argument("--big-arch", default="llama3.1-70b", help="the blocks-0..7 step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="gpu-check.json")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "make gpu-check needs a CUDA GPU: none is visible here (pass --device cpu to run the path on small archs)"
        )
        return 1
    t0, rows = time.perf_counter(), []
    info = dict(
        machine=measure.machine(),
        commit=measure.commit(),
        gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
    )
    for part, fn in (
        ("golden", lambda: golden(a.device)),
        (
            "step",
            lambda: rows_random(
                argparse.Namespace(arch=a.step_arch, dtype=a.dtype, device=a.device, repeats=a.repeats)
            ),
        ),
        ("big", lambda: big_step(a.big_arch, getattr(torch, a.dtype), a.device, a.repeats)),
    ):
        t1 = time.perf_counter()
        rows += fn()
        print(f"[gpu-check] {part}: {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(table(rows))
    total = time.perf_counter() - t0
    print(f"\n{info['gpu'] or a.device}  {info['machine']}  commit {info['commit']}  total {total:.0f} s")
    Path(a.out).write_text(json.dumps(dict(rows=rows, total_seconds=total, **info), indent=1))
    return 0 if all(r["passed"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

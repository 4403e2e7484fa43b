"""One measurement in a fresh process, for peak resident memory (VmHWM) that nothing else in the process inflates.

    python -m bench.worker load ours|transformers
    python -m bench.worker step baseline|rmu|ours --tap 7 --seq 512 --batch 4
    python -m bench.worker run subset|full --dtype float32|bfloat16 --steps 4

Prints one line `RESULT {json}`; memory figures are bytes above the resident size once the imports are done.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench import measure, workload


def load(impl: str) -> dict:
    if impl == "transformers":
        import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline RSS)
        from transformers import AutoModelForCausalLM
    else:
        from ref import load_model
    base = measure.rss()
    measure.reset_peak_rss()
    t0 = time.perf_counter()
    if impl == "transformers":
        model = AutoModelForCausalLM.from_pretrained(workload.local_model_dir(workload.MODEL), dtype=torch.float32)
    else:
        model = load_model(workload.MODEL, dtype=torch.float32, device="cpu")
    seconds = time.perf_counter() - t0
    loaded = measure.rss() - base
    with torch.no_grad():  # weights memory-mapped from the file become resident when read: read them all
        sum(float(p.float().sum()) for p in model.parameters())
    peak, nbytes = measure.peak_rss() - base, measure.model_bytes(model)
    del model
    t0 = time.perf_counter()  # a second load in the same process: without one-off lazy imports
    (
        AutoModelForCausalLM.from_pretrained(workload.local_model_dir(workload.MODEL), dtype=torch.float32)
        if impl == "transformers"
        else load_model(workload.MODEL, dtype=torch.float32, device="cpu")
    )
    return dict(
        seconds=seconds,
        second_load_seconds=time.perf_counter() - t0,
        peak=peak,
        resident_after_load=loaded,
        model_bytes=nbytes,
    )


def step(impl: str, tap: int, seq: int, batch: int) -> dict:
    from ref import load_model, load_tokenizer

    if impl == "baseline":
        import transformers.models.llama.modeling_llama  # noqa: F401

        from bench.baseline import BaselineRMU
    data = workload.demo_data()
    topic, forget, retain = workload.batch_texts(data, batch)
    base = measure.rss()
    if impl == "baseline":
        updated, frozen = workload.hf_model(), workload.hf_model()
        runner = BaselineRMU(
            updated,
            frozen,
            workload.hf_tokenizer(),
            tap,
            workload.update_layers(tap),
            workload.LR,
            workload.STEERING,
            workload.ALPHA,
            seq,
        )
        run = lambda: runner.step(forget, retain)
    else:
        model = load_model(workload.MODEL, dtype=torch.float32, device="cpu")
        runner = workload.unlearner(model, load_tokenizer(workload.MODEL), data, impl, tap, seq, batch)
        run = lambda: runner(topic, forget, retain)
    loaded = measure.rss() - base
    run()  # warm-up (compiles our losses); what it leaves resident (optimizer state...) counts below
    measure.reset_peak_rss()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    return dict(peak=measure.peak_rss() - base, loaded=loaded, seconds=seconds)


def run(impl: str, dtype: str, steps: int, out: str) -> dict:
    """A whole `ref.unlearn` run (SmolLM2, WMDP demo data, ours, no evaluation, eager losses): the subset load it does
    (embedding + blocks 0..7) or, monkeypatched, a load of every block. Also returns the plan's estimate."""
    import ref.unlearn as U
    from ref.io.checkpoint import resolve
    from ref.io.config_json import read_config
    from ref.run.memory import estimate_peak_bytes
    from ref.run.plan import Settings
    from ref.run.plan import resolve as resolve_plan

    settings = Settings(
        model=workload.MODEL,
        goal="wmdp",
        out=out,
        overwrite=True,
        evaluate=False,
        compile=False,
        max_steps=steps,
        device="cpu",
        dtype=dtype,
        save_every=steps,
    )
    cfg = read_config(resolve(settings.model))
    plan = resolve_plan(settings, cfg)
    if impl == "full":
        load = U.load_model
        U.load_model = lambda *a, **k: load(*a, **{**k, "blocks": None})
    base = measure.rss()
    measure.reset_peak_rss()
    U.unlearn(settings)
    est = estimate_peak_bytes(cfg, plan, torch.finfo(getattr(torch, dtype)).bits // 8)
    return dict(
        peak=measure.peak_rss() - base,
        estimate=est["ours"],
        loaded_weights=est["weights"],
        full_weights=est["full_weights"],
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["load", "step", "run"])
    p.add_argument("impl", choices=["ours", "transformers", "baseline", "rmu", "subset", "full"])
    p.add_argument("--tap", type=int, default=7)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="runs/bench-subset")
    a = p.parse_args(argv)
    if a.what == "run":
        out = run(a.impl, a.dtype, a.steps, a.out)
    else:
        out = load(a.impl) if a.what == "load" else step(a.impl, a.tap, a.seq, a.batch)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

"""`make bench`: ours against the baseline, one table, and bench-results.json.

    python -m bench.run                                   # every row (SmolLM2-135M, fp32, batch 4 x 512, tap 7)
    python -m bench.run --rows step losses --repeats 5    # some rows
    python -m bench.run --rows sampling                   # toxicity sampling against transformers' generate
    python -m bench.run --rows fluency                    # the toxicity evaluation's fluency against sampling alone
    python -m bench.run --random-weights --arch mistral-7b   # one step at full size, random bf16 weights (GPU)
    python -m bench.run --rows launch                     # a 4-point sweep: 2 local workers against sequential

Each row puts ours against its baseline: a median over `--repeats` runs after a warm-up, ours and the baseline
alternating in one process (time), or one fresh process each (peak resident memory, VmHWM above the resident size
after the imports). ratio = ours / baseline: below 1 is better for ours, in time and in memory alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of ref.evaluation.mc and transformers' loading

import torch

from bench import measure, workload
from bench.baseline import BaselineRMU

GROUPS = ("step", "sweep", "losses", "forward", "mc", "load", "subset", "sampling", "fluency", "launch")
MiB = 2**20
BATCH, SEQ, TAP = 4, 512, 7


def row(name: str, metric: str, ours: float, base: float, target: float | None = None, **info) -> dict:
    """One table row; `target` is the largest ours / baseline ratio that passes."""
    ratio = ours / base
    passed = None if target is None else ratio <= target
    return dict(name=name, metric=metric, ours=ours, baseline=base, ratio=ratio, target=target, passed=passed, **info)


def time_row(name: str, t: dict, ours: str, base: str, target: float | None = None, **info) -> dict:
    """A time row of the timings `t` (measure.alternate's) of `ours` against `base`."""
    return row(
        name,
        "time s",
        t[ours]["median"],
        t[base]["median"],
        target,
        ours_stats=stats(t[ours]),
        baseline_stats=stats(t[base]),
        **info,
    )


class Models:
    """The models, loaded once and shared by the rows (the step rows train them: no row reads their values)."""

    def __init__(self):
        self._ours = self._hf = None

    def ours(self):
        if self._ours is None:
            from ref import load_model, load_tokenizer

            self._ours = load_model(workload.MODEL, dtype=torch.float32, device="cpu"), load_tokenizer(workload.MODEL)
        return self._ours

    def hf(self):
        if self._hf is None:
            self._hf = workload.hf_model(), workload.hf_model(), workload.hf_tokenizer()
        return self._hf


def step_timings(models: Models, data, tap: int, seq: int, methods: tuple[str, ...], repeats: int, warmup: int):
    model, tok = models.ours()
    up, fr, htok = models.hf()
    topic, forget, retain = workload.batch_texts(data, BATCH)
    base = BaselineRMU(
        up, fr, htok, tap, workload.update_layers(tap), workload.LR, workload.STEERING, workload.ALPHA, seq
    )
    fns = {"baseline": lambda: base.step(forget, retain)}
    for m in methods:
        u = workload.unlearner(model, tok, data, m, tap, seq, BATCH)
        fns[m] = lambda u=u: u(topic, forget, retain)
        fns[m]()  # compiles our losses on first use; the baseline is eager, warmed by `warmup`
    return measure.alternate(fns, repeats, warmup)


def worker(*args: str) -> dict:
    cmd = [sys.executable, "-m", "bench.worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def stats(t: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}


# ---- row groups ----


def rows_step(models: Models, data, a) -> list[dict]:
    shape = dict(batch=BATCH, seq=SEQ, tap_layer=TAP, updated=f"down_proj of layers {workload.update_layers(TAP)}")
    t = step_timings(models, data, TAP, SEQ, ("rmu", "ours"), a.repeats, warmup=1)
    mem = {impl: worker("step", impl, "--tap", str(TAP), "--seq", str(SEQ)) for impl in ("baseline", "rmu", "ours")}
    common = dict(dtype="float32", shapes=shape)
    mib = lambda impl: mem[impl]["peak"] / MiB
    return [
        row(
            "RMU step vs baseline step",
            "time s",
            t["rmu"]["median"],
            t["baseline"]["median"],
            1 / 3,
            ours_stats=stats(t["rmu"]),
            baseline_stats=stats(t["baseline"]),
            **common,
        ),
        row(
            "RMU step vs baseline step",
            "peak RSS MiB",
            mib("rmu"),
            mib("baseline"),
            0.6,
            ours_detail=mem["rmu"],
            baseline_detail=mem["baseline"],
            **common,
        ),
        row(
            "ours step (cosine+REINFORCE) vs baseline step",
            "time s",
            t["ours"]["median"],
            t["baseline"]["median"],
            ours_stats=stats(t["ours"]),
            baseline_stats=stats(t["baseline"]),
            **common,
        ),
        row(
            "ours step (cosine+REINFORCE) vs baseline step",
            "peak RSS MiB",
            mib("ours"),
            mib("baseline"),
            ours_detail=mem["ours"],
            baseline_detail=mem["baseline"],
            **common,
        ),
        row(
            "ours step vs our RMU step",
            "time s",
            t["ours"]["median"],
            t["rmu"]["median"],
            1.3,
            ours_stats=stats(t["ours"]),
            baseline_stats=stats(t["rmu"]),
            **common,
        ),
    ]


def rows_sweep(models: Models, data, a) -> list[dict]:
    """Tap layer deeper (seq 512) and sequence longer (tap 7); tap 7 at 512 is the step row. `--sweep-repeats` runs
    (default 2, to keep `make bench` under 15 minutes: a baseline step at seq 1024 takes ~45 s here) and no baseline
    warm-up: the step rows ran the same eager code first."""
    n = models.ours()[0].config.num_layers
    out = []
    for tap, seq in [(3, SEQ), (15, SEQ), (n - 1, SEQ), (TAP, 128), (TAP, 1024)]:
        t = step_timings(models, data, tap, seq, ("rmu",), a.sweep_repeats, warmup=0)
        out.append(
            row(
                f"RMU step, tap {tap}, seq {seq}",
                "time s",
                t["rmu"]["median"],
                t["baseline"]["median"],
                ours_stats=stats(t["rmu"]),
                baseline_stats=stats(t["baseline"]),
                dtype="float32",
                shapes=dict(batch=BATCH, seq=seq, tap_layer=tap),
            )
        )
    return out


def loss_cases(dtype: torch.dtype, B: int = 4, T: int = 512, D: int = 4096, L: int = 9) -> dict:
    """name -> (loss function, call(f) -> scalar, leaves that get a gradient, shape description)."""
    from ref import losses

    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g).to(dtype).requires_grad_(True)
    h0, u = torch.randn(B, T, D, generator=g).to(dtype), torch.randn(D, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :100] = 0  # some padding, as in a real batch
    hl = [torch.randn(B, D, generator=g).to(dtype).requires_grad_(True) for _ in range(L)]
    w = torch.nn.functional.normalize(torch.randn(L, D, generator=g), dim=-1)
    return {
        "eq. 4 cosine forget": (losses.cosine_forget_loss, lambda f: f(h, u, mask), [h], f"h [{B},{T},{D}]"),
        "eq. 5 cosine retain": (losses.cosine_retain_loss, lambda f: f(h, h0, mask), [h], f"h, h0 [{B},{T},{D}]"),
        "eq. 6 probe projection": (
            losses.probe_projection_loss,
            lambda f: f(hl, w)[0],
            hl,
            f"{L} last-token states [{B},{D}] (of taps [{B},{T},{D}])",
        ),
    }


def rows_losses(models: Models, data, a) -> list[dict]:
    """Eq. 4, 5, 6 forward + backward, torch.compile (ref.run.fused) against eager, at 4 x 512 x 4096."""
    from ref.run.fused import fused

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        cases = loss_cases(dtype)
        for name, (fn, call, leaves, shape) in cases.items():

            def fwd_bwd(f, call=call, leaves=leaves):
                for x in leaves:
                    x.grad = None
                call(f).backward()

            c = fused(fn)
            t = measure.alternate(
                {"compiled": lambda c=c: fwd_bwd(c), "eager": lambda fn=fn: fwd_bwd(fn)}, max(a.repeats, 5), warmup=2
            )
            target = None if name.startswith("eq. 6") else 0.5  # ref runs eq. 6 eager (see ref.run.fused)
            out.append(
                row(
                    f"{name}, compiled vs eager, fwd+bwd",
                    "time ms",
                    t["compiled"]["median"] * 1e3,
                    t["eager"]["median"] * 1e3,
                    target,
                    ours_stats=stats(t["compiled"]),
                    baseline_stats=stats(t["eager"]),
                    dtype=str(dtype).split(".")[1],
                    shapes=shape,
                )
            )
    return out


def rows_forward(models: Models, data, a) -> list[dict]:
    model, tok = models.ours()
    _, hf, _ = models.hf()
    hf.eval()
    ids, mask = tok.batch(workload.long_texts(data.retain, BATCH), max_length=SEQ)

    @torch.no_grad()
    def ours():
        return model(ids, mask).logits

    @torch.no_grad()
    def theirs():
        return hf(input_ids=ids, attention_mask=mask).logits

    err = float((ours() - theirs()).abs().max())
    # at least 7 pairs: the two differ by a few % (the same matrix products), less than the 10-20% run-to-run noise
    # of this shared machine, which a median of 3 does not average out
    t = measure.alternate({"ours": ours, "transformers": theirs}, max(a.repeats, 7), warmup=1)
    return [
        row(
            "whole-model forward vs transformers (SDPA)",
            "time s",
            t["ours"]["median"],
            t["transformers"]["median"],
            1.0,
            ours_stats=stats(t["ours"]),
            baseline_stats=stats(t["transformers"]),
            dtype="float32",
            shapes=dict(batch=BATCH, seq=ids.shape[1], logits="all positions"),
            max_abs_logit_diff=err,
        )
    ]


def rows_mc(models: Models, data, a) -> list[dict]:
    """Letter-format MC: one forward per question (mc_accuracy) vs four loglikelihood requests per question."""
    from ref.evaluation.mc import LETTERS, loglikelihood, mc_accuracy, mc_prompt
    from ref.io.data import read_mc

    model, tok = models.ours()
    tasks = {**data.eval_forget, **data.eval_retain}
    rows = {task: read_mc(path)[: a.mc_questions] for task, path in tasks.items()}
    correct = {"one": set(), "four": set()}  # the count of each timed run: identical accuracy on every run

    def one_forward():
        n = sum(mc_accuracy(model, tok, r, task, "letter", batch_size=16)["correct"] for task, r in rows.items())
        correct["one"].add(n)

    def four_requests():
        n = 0
        for task, r in rows.items():
            reqs = [(mc_prompt(q, task), f" {letter}") for q in r for letter in LETTERS]
            ll = loglikelihood(model, tok, reqs, batch_size=16)
            for i, q in enumerate(r):
                s = ll[4 * i : 4 * i + 4]
                n += int(max(range(4), key=lambda j: (s[j], -j)) == q["answer"])
        correct["four"].add(n)

    t = measure.alternate({"one": one_forward, "four": four_requests}, a.repeats, warmup=1)
    n = sum(len(r) for r in rows.values())
    acc = {k: sorted(c / n for c in v) for k, v in correct.items()}
    same = acc["one"] == acc["four"] and len(acc["one"]) == 1
    return [
        row(
            "MC evaluation: 1 forward/question vs 4 requests",
            "time s",
            t["one"]["median"],
            t["four"]["median"],
            1 / 3,
            ours_stats=stats(t["one"]),
            baseline_stats=stats(t["four"]),
            dtype="float32",
            shapes=dict(questions=n, tasks=list(rows), batch_size=16),
            accuracy_ours=acc["one"],
            accuracy_baseline=acc["four"],
            identical_accuracy=same,
        )
    ]


def rows_load(models: Models, data, a) -> list[dict]:
    """Fresh process per load, alternating; the first pair warms the page cache and is dropped."""
    res = {"ours": [], "transformers": []}
    for r in range(a.repeats + 1):
        for impl in ("ours", "transformers") if r % 2 == 0 else ("transformers", "ours"):
            out = worker("load", impl)
            if r:
                res[impl].append(out)
    med = lambda impl, k: measure.summary([x[k] for x in res[impl]])
    to, tt = med("ours", "seconds"), med("transformers", "seconds")
    so, st = med("ours", "second_load_seconds"), med("transformers", "second_load_seconds")
    po, pt = med("ours", "peak")["median"] / MiB, med("transformers", "peak")["median"] / MiB
    nbytes = res["ours"][0]["model_bytes"] / MiB
    common = dict(dtype="float32", shapes=dict(model=workload.MODEL, model_MiB=round(nbytes, 1)))
    return [
        row(
            "load (first in a fresh process) vs from_pretrained",
            "time s",
            to["median"],
            tt["median"],
            ours_stats=stats(to),
            baseline_stats=stats(tt),
            **common,
        ),
        row(
            "load (second in the process) vs from_pretrained",
            "time s",
            so["median"],
            st["median"],
            ours_stats=stats(so),
            baseline_stats=stats(st),
            **common,
        ),
        row("load + read every weight vs from_pretrained", "peak RSS MiB", po, pt, **common),
        row("load + read every weight vs the model's bytes", "peak RSS MiB", po, nbytes, 1.2, **common),
    ]


def rows_subset(models: Models, data, a) -> list[dict]:
    """A whole ref.unlearn run (4 steps, tap 7) loading blocks 0..7 against the same run loading every block, one
    fresh process each, alternating. fp32: the weights stay memory-mapped from the fp32 file, so blocks that never
    run are never read either way; bf16: the cast copies every loaded tensor, as any load onto a GPU does."""
    out = []
    for dtype in ("float32", "bfloat16"):
        res = {"subset": [], "full": []}
        for r in range(a.repeats):
            for impl in ("subset", "full") if r % 2 == 0 else ("full", "subset"):
                res[impl].append(worker("run", impl, "--dtype", dtype, "--out", f"runs/bench-{impl}"))
        peak = {k: measure.summary([x["peak"] for x in v])["median"] / MiB for k, v in res.items()}
        first = res["subset"][0]
        out.append(
            row(
                f"unlearn run, blocks 0..7 loaded vs all 30 ({dtype})",
                "peak RSS MiB",
                peak["subset"],
                peak["full"],
                dtype=dtype,
                estimate_MiB=first["estimate"] / MiB,
                shapes=dict(model=workload.MODEL, steps=4, batch=4, seq=128, tap_layer=7),
            )
        )
    return out


def demo_prompts(a) -> list[str]:
    from ref.io.data import load_goal_data, read_prompts, resolve_data_dir

    return read_prompts(load_goal_data(resolve_data_dir("demo"), "toxicity").eval_prompts)[: a.sampling_prompts]


def rows_sampling(models: Models, data, a) -> list[dict]:
    """The RealToxicityPrompts sampling of ref.evaluation.toxicity (25 samples a prompt, 20 new tokens, top-p 0.9, T 1)
    on the demo prompts: ours (one prefill a prompt, 8 prompts decoded together) against transformers' generate with
    the same settings (num_return_sequences=25, top_k=0 so that top-p alone filters), one prompt a call and 8
    prompts a call (left padded), and against the per-prompt loop (generate([prompt] * 25)). Every side seeds
    prompt p's sampling with p (transformers batched: the first prompt of each call). A first run of each side
    warms it and gives the samples compared across sides; then `--repeats` alternating runs at the process's
    thread count, and, when that is more than one, ours against transformers one prompt a call at one thread."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from ref.evaluation.generate import generate, probabilities
    from ref.evaluation.toxicity import BATCH_PROMPTS, sampled_continuations

    model, tok = models.ours()
    _, hf, htok = models.hf()
    hf.eval()
    prompts = demo_prompts(a)
    n, new, top_p = 25, 20, 0.9
    settings = dict(
        do_sample=True,
        top_p=top_p,
        temperature=1.0,
        top_k=0,
        num_return_sequences=n,
        pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
    )

    def ours(ps=prompts, k=new):
        return list(sampled_continuations(model, tok, ps, n, k, top_p, 1.0, seed=0))

    def loop(ps=prompts, k=new):
        return [generate(model, tok, [p] * n, k, 1.0, top_p, seed=i) for i, p in enumerate(ps)]

    def continuations(out, width: int) -> list[list[int]]:  # up to EOS, as ours
        rows = [r[width:].tolist() for r in out]
        return [r[: r.index(tok.eos_id) + 1] if tok.eos_id in r else r for r in rows]

    @torch.no_grad()
    def hf_one(ps=prompts, k=new):
        out = []
        for i, p in enumerate(ps):
            torch.manual_seed(i)
            enc = htok(p, return_tensors="pt")
            out.append(continuations(hf.generate(**enc, max_new_tokens=k, **settings), enc["input_ids"].shape[1]))
        return out

    @torch.no_grad()
    def hf_batched(ps=prompts, k=new):
        out = []
        for start in range(0, len(ps), BATCH_PROMPTS):
            torch.manual_seed(start)
            enc = htok(ps[start : start + BATCH_PROMPTS], return_tensors="pt", padding=True, padding_side="left")
            rows = continuations(hf.generate(**enc, max_new_tokens=k, **settings), enc["input_ids"].shape[1])
            out += [rows[i : i + n] for i in range(0, len(rows), n)]
        return out

    fns = dict(ours=ours, loop=loop, hf_one=hf_one, hf_batched=hf_batched)
    results = {name: f() for name, f in fns.items()}  # the warm-up, full size, kept to compare the samples
    threads = torch.get_num_threads()
    t = measure.alternate(fns, a.repeats, warmup=0)
    one_thread = None
    if threads > 1:
        torch.set_num_threads(1)
        try:
            one_thread = measure.alternate(dict(ours=ours, hf_one=hf_one), a.repeats, warmup=0)
        finally:
            torch.set_num_threads(threads)
    lengths = [len(r) for rows in results["ours"] for r in rows]
    shape = dict(
        prompts=len(prompts),
        samples=n,
        max_new_tokens=new,
        top_p=top_p,
        temperature=1.0,
        batch_prompts=BATCH_PROMPTS,
        mean_new_tokens=round(sum(lengths) / len(lengths), 2),
    )

    def info(other: str, at: int) -> dict:
        same = sum(x == y for x, y in zip(results["ours"], results[other], strict=True))
        return dict(prompts_identical_to_ours=f"{same}/{len(prompts)}", threads=at, dtype="float32", shapes=shape)

    def versus(name: str, other: str, timings: dict, at: int, target: float | None = None) -> dict:
        label = f"toxicity sampling vs {name}, {at} thread{'s' if at > 1 else ''}"
        return time_row(label, timings, "ours", other, target, **info(other, at))

    rows = [
        versus("transformers generate (1 prompt a call)", "hf_one", t, threads, 0.5),
        versus(f"transformers generate ({BATCH_PROMPTS} prompts a call)", "hf_batched", t, threads),
        versus("per-prompt loop (generate, prompt x 25)", "loop", t, threads),
    ]
    if one_thread is not None:
        rows.append(versus("transformers generate (1 prompt a call)", "hf_one", one_thread, 1, 0.5))
    # the sampling distribution alone (top-p, then softmax), on the logits of every prompt position (SmolLM2's)
    ids, mask = tok.batch(prompts)
    with torch.no_grad():
        logits = model(ids, mask).logits[mask.bool()]
    logits = logits.repeat(-(-200 // len(logits)), 1)[:200]  # 200 rows, as one decoding step of 8 x 25
    warper = TopPLogitsWarper(top_p)
    fns = {"ours": lambda: probabilities(logits, 1.0, top_p), "hf": lambda: warper(None, logits).softmax(-1)}
    tp = measure.alternate(fns, max(a.repeats, 5), warmup=1)
    kept_same = torch.equal(probabilities(logits, 1.0, top_p) > 0, torch.isfinite(warper(None, logits)))
    rows.append(
        row(
            "top-p + softmax vs transformers' TopPLogitsWarper + softmax",
            "time ms",
            tp["ours"]["median"] * 1e3,
            tp["hf"]["median"] * 1e3,
            ours_stats=stats(tp["ours"]),
            baseline_stats=stats(tp["hf"]),
            threads=threads,
            dtype="float32",
            shapes=dict(rows=len(logits), vocab=logits.shape[1], top_p=top_p),
            identical_kept_tokens=kept_same,
        )
    )
    return rows


def rows_launch(models: Models, data, a) -> list[dict]:
    """The wall time of one 4-point sweep (RMU on the demo data, 4 learning rates, `--launch-steps` steps a point,
    the evaluation cut to `--launch-eval-limit` questions a task), `python -m ref.sweep` into a new folder: 2 local
    workers (the torch threads split between them) against the sequential launcher (all the threads), each run once
    in a fresh process, sequential first."""
    threads = torch.get_num_threads()
    argv = (
        f"--model {workload.MODEL} --goal wmdp --data demo --method rmu --grid lr=1e-4,3e-4,1e-3,3e-3 "
        f"--max-steps {a.launch_steps} --eval-limit {a.launch_eval_limit} --no-figures"
    ).split()
    seconds = {}
    Path("runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-launch-", dir="runs") as tmp:
        for name, launcher in (("sequential", []), ("local", ["--launcher", "local", "--workers", "2"])):
            cmd = [sys.executable, "-m", "ref.sweep", *argv, "--out", f"{tmp}/{name}", *launcher]
            t0 = time.perf_counter()
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)}
            )
            seconds[name] = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    shape = dict(points=4, steps=a.launch_steps, eval_limit=a.launch_eval_limit, threads=threads, workers=2)
    return [
        row(
            "4-point sweep, wall time: 2 local workers vs sequential",
            "time s",
            seconds["local"],
            seconds["sequential"],
            dtype="float32",
            shapes=shape,
        )
    ]


def largest_relative_difference(a: list[list[float | None]], b: list[list[float | None]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    if any((x is None) != (y is None) for x, y in pairs):
        return float("inf")
    return max((abs(x - y) / y for x, y in pairs if y is not None), default=0.0)


def rows_fluency(models: Models, data, a) -> list[dict]:
    """The fluency of the toxicity evaluation (ref.evaluation.toxicity.toxicity_eval, with a scorer that costs nothing)
    on the sampling rows' workload. The model's own samples: their log-probabilities come from the sampling pass,
    against the sampling alone (target 1.2). Another model's samples (here a second copy of the same model as the
    reference, so the samples are the same): the reference runs each prompt once and the prompt's continuations on its
    KV cache, against the sampling alone, and that rescoring against the rescoring of whole sequences. Each row gives
    the largest relative difference between its perplexities and the whole-sequence rescoring's."""
    from bench.fluency_accuracy import whole_sequence_perplexities
    from ref import load_model
    from ref.evaluation.fluency import continuation_perplexities
    from ref.evaluation.toxicity import sampled_continuations, toxicity_eval

    model, tok = models.ours()
    reference = load_model(workload.MODEL, dtype=torch.float32, device="cpu")
    prompts = demo_prompts(a)
    n, new = 25, 20

    def zero_scores(texts: list[str]) -> list[float]:
        return [0.0] * len(texts)

    def sampling():
        return list(sampled_continuations(model, tok, prompts, n, new, 0.9, 1.0, seed=0))

    def evaluation(ref=None):
        res = toxicity_eval(model, tok, prompts, zero_scores, n, new, seed=0, reference=ref)
        return [r["fluency_perplexities"] for r in res["records"]]

    fns = dict(own=evaluation, other=lambda: evaluation(reference), sampling=sampling)
    t = measure.alternate(fns, a.repeats, warmup=1)
    samples = sampling()
    whole = whole_sequence_perplexities(reference, tok, prompts, samples)
    diff = dict(
        own=largest_relative_difference(evaluation(), whole),
        other=largest_relative_difference(evaluation(reference), whole),
    )
    rescoring = dict(
        shared=lambda: continuation_perplexities(reference, tok, prompts, samples),
        whole=lambda: whole_sequence_perplexities(reference, tok, prompts, samples),
    )
    tr = measure.alternate(rescoring, a.repeats, warmup=0)
    shape = dict(prompts=len(prompts), samples=n, max_new_tokens=new, top_p=0.9, temperature=1.0)
    common = dict(threads=torch.get_num_threads(), dtype="float32", shapes=shape)
    return [
        time_row(
            "toxicity evaluation with fluency (own samples) vs sampling alone",
            t,
            "own",
            "sampling",
            1.2,
            fluency_largest_relative_difference=diff["own"],
            **common,
        ),
        time_row(
            "toxicity evaluation with fluency (another model's samples) vs sampling alone",
            t,
            "other",
            "sampling",
            fluency_largest_relative_difference=diff["other"],
            **common,
        ),
        time_row(
            "fluency rescoring, one prefill a prompt vs whole sequences",
            tr,
            "shared",
            "whole",
            fluency_largest_relative_difference=diff["other"],
            **common,
        ),
    ]


# ---- full size, random weights ----


def rows_random(a) -> list[dict]:
    """One step of ours (RMU, and cosine + REINFORCE) and of the baseline at full size, random bf16 weights. Ours
    runs first and is freed before the baseline's two copies are built (they do not fit beside it on one GPU)."""
    device = a.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print(f"--random-weights --arch {a.arch}: no GPU here, skipped (pass --device cpu to force, small archs only)")
        return []
    dtype = getattr(torch, a.dtype)
    data = workload.demo_data()
    topic, forget, retain = workload.batch_texts(data, BATCH)
    cuda = device.startswith("cuda")
    peak = lambda: torch.cuda.max_memory_allocated() / MiB if cuda else float("nan")
    results = {}
    model = workload.random_ours(a.arch, dtype, device)
    tok = workload.TokenStub(model.config.vocab_size)
    for m in ("rmu", "ours"):
        u = workload.unlearner(model, tok, data, m, TAP, SEQ, BATCH, arch=a.arch)
        u(topic, forget, retain)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        results[m] = measure.alternate({m: lambda u=u: u(topic, forget, retain)}, a.repeats, warmup=0)[m]
        results[m]["peak"] = peak()
        del u
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    up, fr = workload.random_hf(a.arch, dtype, device)
    base = BaselineRMU(
        up, fr, tok, TAP, workload.update_layers(TAP), workload.LR, workload.STEERING, workload.ALPHA, SEQ
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    results["baseline"] = measure.alternate({"b": lambda: base.step(forget, retain)}, a.repeats, warmup=1)["b"]
    results["baseline"]["peak"] = peak()
    b = results["baseline"]
    common = dict(dtype=a.dtype, shapes=dict(arch=a.arch, batch=BATCH, seq=SEQ, tap_layer=TAP, weights="random"))
    out = []
    for m, label in (("rmu", "RMU step"), ("ours", "ours step (cosine+REINFORCE)")):
        r = results[m]
        target = 1 / 3 if m == "rmu" else None
        out.append(
            row(
                f"{a.arch}: {label} vs baseline",
                "time s",
                r["median"],
                b["median"],
                target,
                ours_stats=stats(r),
                baseline_stats=stats(b),
                **common,
            )
        )
        if cuda:
            out.append(
                row(
                    f"{a.arch}: {label} vs baseline",
                    "peak GPU MiB",
                    r["peak"],
                    b["peak"],
                    0.6 if m == "rmu" else None,
                    **common,
                )
            )
    return out


# ---- table ----


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def table(rows: list[dict]) -> str:
    head = ("row", "metric", "ours", "baseline", "ratio", "target", "pass", "noise o/b")
    lines = []
    for r in rows:
        noise = ""
        if "ours_stats" in r:
            noise = f"{r['ours_stats']['spread']:.0%}/{r['baseline_stats']['spread']:.0%}"
        target = "" if r["target"] is None else f"<= {r['target']:.2f}"
        passed = "" if r["passed"] is None else ("PASS" if r["passed"] else "FAIL")
        lines.append(
            (r["name"], r["metric"], fmt(r["ours"]), fmt(r["baseline"]), f"{r['ratio']:.3f}", target, passed, noise)
        )
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]

    def render(cells) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([render(head), render(["-" * w for w in widths]), *map(render, lines)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=GROUPS, default=list(GROUPS))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median); default 3")
    p.add_argument("--sweep-repeats", type=int, default=2, help="timed runs per sweep row; default 2")
    p.add_argument("--mc-questions", type=int, default=20, help="first N questions of each demo MC task")
    p.add_argument("--sampling-prompts", type=int, default=8, help="demo toxicity prompts of the sampling rows")
    p.add_argument("--launch-steps", type=int, default=4, help="steps a point of the launch rows' sweep")
    p.add_argument("--launch-eval-limit", type=int, default=10, help="questions a task in the launch rows' sweep")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one a core)")
    p.add_argument("--out", default="bench-results.json")
    p.add_argument("--random-weights", action="store_true", help="full-size step with random weights (GPU)")
    p.add_argument("--arch", default="mistral-7b", help="registry alias for --random-weights")
    p.add_argument("--dtype", default="bfloat16", help="dtype for --random-weights")
    p.add_argument("--device", default=None, help="for --random-weights: default cuda if there is one, else skip")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    info = dict(machine=measure.machine(), commit=measure.commit())
    if a.random_weights:
        rows = rows_random(a)
        if not rows:
            return 0
    else:
        models, data, rows = Models(), workload.demo_data(), []
        for g in GROUPS:
            if g in a.rows:
                t1 = time.perf_counter()
                print(f"[bench] {g} ...", file=sys.stderr, flush=True)
                rows += globals()[f"rows_{g}"](models, data, a)
                print(f"[bench] {g}: {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    rows = [dict(r, **info) for r in rows]
    print(table(rows))
    total = time.perf_counter() - t0
    print(
        f"\n{info['machine']}  commit {info['commit']}  total {total:.0f} s  (ratio = ours / baseline; noise = "
        f"(max - min) / median over the timed runs)"
    )
    Path(a.out).write_text(json.dumps(dict(rows=rows, total_seconds=total, repeats=a.repeats, **info), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

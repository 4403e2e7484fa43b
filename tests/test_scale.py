"""Beyond one GPU: loading only the blocks a run needs, placing blocks over several devices, the 70B plans, and the
peak-memory estimate against a measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ref.unlearn as U
from ref.evaluation.generate import generate
from ref.io.checkpoint import load_model, load_rest, resolve, save_model, shard_files
from ref.io.config_json import config_from_dict
from ref.io.data import resolve_data_dir
from ref.io.errors import RefError
from ref.io.placement import parse_devices, split_blocks
from ref.io.registry import REGISTRY
from ref.io.tokenizer import load_tokenizer
from ref.io.validate import device as check_device
from ref.run.memory import estimate_peak_bytes
from ref.run.plan import Settings
from ref.run.plan import resolve as resolve_plan
from tests.conftest import FAMILIES

GiB = 2**30


@pytest.mark.parametrize("family", FAMILIES)
def test_a_subset_load_gives_the_taps_of_a_full_load_and_reads_the_rest_on_demand(tiny_dirs, family):
    full = load_model(tiny_dirs[family], device="cpu")
    part = load_model(tiny_dirs[family], device="cpu", blocks=2)
    loaded = {k for k, p in part.named_parameters() if not p.is_meta}
    assert loaded == {
        k
        for k, _ in part.named_parameters()
        if k.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1."))
    }
    ids = torch.tensor([[3, 9, 4, 1, 7, 2], [5, 5, 8, 6, 2, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ours, theirs = part(ids, mask, taps=[0, 1], stop_after=1).taps, full(ids, mask, taps=[0, 1], stop_after=1).taps
        assert all(torch.equal(ours[i], theirs[i]) for i in (0, 1))
        with pytest.raises(RefError, match=r"block 2 is not loaded.*load_rest"):
            part(ids, mask)
        assert torch.equal(load_rest(part)(ids, mask).logits, full(ids, mask).logits)
    assert not any(p.is_meta or p.requires_grad for p in part.parameters())
    with pytest.raises(RefError, match="blocks=9"):
        load_model(tiny_dirs[family], device="cpu", blocks=9)


def test_load_rest_keeps_the_values_already_in_place(tiny_dirs):
    """A trained tensor of a subset-loaded model survives reading the rest."""
    part = load_model(tiny_dirs["llama"], device="cpu", blocks=2)
    w = part.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(1.0)
    load_rest(part)
    assert part.model.layers[1].mlp.down_proj.weight is w


def test_saving_rewrites_only_the_slots_of_the_replaced_tensors(tiny_dirs, tmp_path):
    """model/ of a (subset-loaded) run: every file of the source; untouched shards linked, a shard holding a replaced
    tensor equal to the source byte for byte outside that tensor's bytes."""
    src = tiny_dirs["qwen2"]
    part = load_model(src, device="cpu", blocks=1)
    name = "model.layers.0.mlp.down_proj.weight"
    new = torch.randn_like(dict(part.named_parameters())[name])
    out = save_model(part, tmp_path / "model", {name: new})
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    shard = shard_files(src)[name]
    a, b = shard.read_bytes(), (out / shard.name).read_bytes()
    assert len(a) == len(b) and a != b
    reloaded = load_model(out, device="cpu")
    full = load_model(src, device="cpu")
    for k, p in reloaded.named_parameters():
        assert torch.equal(p, new if k == name else dict(full.named_parameters())[k]), k
    others = [p for p in set(shard_files(src).values()) if p != shard]
    assert all((out / p.name).stat().st_ino == p.stat().st_ino for p in others)  # hard links


def test_split_blocks_gives_contiguous_runs_sized_by_capacity():
    cfg = config_from_dict(REGISTRY["llama3.1-70b"].arch)
    devs = [torch.device("cuda", i) for i in range(4)]
    even = split_blocks(cfg, devs)
    assert [d for d, _, _ in even.runs] == devs and even.runs[0][1] == 0 and even.runs[-1][2] == 79
    assert all(a == prev_b + 1 for (_, _, prev_b), (_, a, _) in zip(even.runs, even.runs[1:], strict=False))
    block, embed = 855_654_400, 1_050_673_152  # parameters of one block, of the embedding (= of the LM head)
    total = 80 * block + 2 * embed

    def shares(p):  # parameters on each device: its blocks, the embedding on the first, the LM head on the last
        n = [(b - a + 1) * block for _, a, b in p.runs]
        return [x + embed * (i == 0) + embed * (i == len(n) - 1) for i, x in enumerate(n)]

    assert all(abs(x - total / 4) <= block for x in shares(even))  # each device within one block of a quarter
    assert [b - a + 1 for _, a, b in even.runs] == [19, 21, 21, 19]
    skewed = split_blocks(cfg, devs[:2], capacity=[1.0, 3.0])
    assert abs(shares(skewed)[0] - total / 4) <= block
    assert even.of("model.embed_tokens.weight") == devs[0] and even.of("lm_head.weight") == devs[3]
    assert even.of("model.layers.40.mlp.up_proj.weight") == devs[2]
    assert split_blocks(cfg, devs[:1]).describe() == "cuda:0"
    assert even.describe().startswith("cuda:0 blocks 0..18 (+ embedding), cuda:1 blocks 19..39")
    tied = split_blocks(config_from_dict(REGISTRY["smollm2-135m"].arch), [torch.device("cpu")] * 2)
    assert tied.of("lm_head.weight") == tied.of("model.norm.weight") == tied.first  # the LM head is the embedding
    with pytest.raises(RefError, match="at most 30"):
        split_blocks(config_from_dict(REGISTRY["smollm2-135m"].arch), [torch.device("cpu")] * 31)
    assert parse_devices("cuda:0, cuda:1") == devs[:2] and parse_devices(None) is None
    if not torch.cuda.is_available():
        assert parse_devices("auto") == [torch.device("cpu")]


def test_device_lists_are_checked():
    check_device("--device", "cpu,cpu")
    check_device("--device", "auto")
    with pytest.raises(RefError, match=r"--device is 'cpu,gpu1'; use cpu, cuda, cuda:N, mps, a comma-separated list"):
        check_device("--device", "cpu,gpu1")
    if not torch.cuda.is_available():
        with pytest.raises(RefError, match="CPU build|no CUDA device"):
            check_device("--device", "cpu,cuda:1")


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_over_a_list_of_devices_give_identical_outputs(tiny_dirs, family):
    """The placement logic on CPU: three runs of blocks (the residual stream, rope, masks and KV cache handed over at
    each boundary) give the same logits, taps and generated tokens as one device."""
    one = load_model(tiny_dirs[family], device="cpu")
    split = load_model(tiny_dirs[family], device="cpu,cpu,cpu")
    assert len(split.placement.runs) == 3 and len(one.placement.runs) == 1
    tok = load_tokenizer(tiny_dirs[family])
    ids, mask = tok.batch(["the river and the planet", "copper"])
    with torch.no_grad():
        a, b = one(ids, mask, taps=[0, 3]), split(ids, mask, taps=[0, 3])
    assert torch.equal(a.logits, b.logits) and all(torch.equal(a.taps[i], b.taps[i]) for i in (0, 3))
    prompts = ["the river", "copper window garden"]
    assert generate(one, tok, prompts, 6, 1.0, 0.9, seed=3) == generate(split, tok, prompts, 6, 1.0, 0.9, seed=3)


def test_an_unlearning_run_over_a_list_of_devices_trains_the_same(tiny_dirs, tmp_path, capsys):
    def run(device: str, out: str) -> list[dict]:
        s = Settings(
            model=str(tiny_dirs["llama"]),
            data=str(resolve_data_dir("demo")),
            out=str(tmp_path / out),
            update_layers=[1, 2],
            tap_layer=2,
            lr=1e-2,
            max_steps=3,
            max_len=24,
            compile=False,
            evaluate=False,
            device=device,
        )
        U.unlearn(s)
        rows = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]

    assert run("cpu", "one") == run("cpu,cpu", "two")
    assert "placement: cpu blocks 0..1 (+ embedding), cpu blocks 2..3 (+ norm, LM head)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("model", "master_weights", "limit"),
    [
        ("llama3.1-70b", "fp32", 80),
        ("qwen2.5-72b", "fp32", 80),
        ("llama3.1-8b", "fp32", 12),
        ("llama3.1-8b", "model", 8),
    ],
)
def test_wmdp_plans_fit_one_gpu(model, master_weights, limit, capsys):
    """WMDP on one 80 GB GPU at 70B (the training reads blocks 0..7 only); at 8B a 12 GB GPU with fp32 master weights
    (the default: copies, gradients and AdamW states of three 4096 x 14336 matrices in fp32) and an 8 GB one without."""
    cfg = config_from_dict(REGISTRY[model].arch)
    est = estimate_peak_bytes(cfg, resolve_plan(Settings(model=model, master_weights=master_weights), cfg), 2)
    assert est["ours"] <= limit * GiB < est["full_weights"] * (10 if limit <= 12 else 1)
    assert U.main(["--model", model, "--goal", "wmdp", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "loads the embedding and blocks 0..7" in out and "80 GiB GPUs needed: training 1" in out


def test_toxicity_plan_of_a_70b_model_spans_gpus(capsys):
    assert U.main(["--model", "llama3.1-70b", "--goal", "toxicity", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "taps: [11, 12, 13, 39, 40, 41, 63, 64, 65]" in out and "80 GiB GPUs needed: training 3" in out


def test_the_peak_estimate_is_within_25_percent_of_a_measured_run(tmp_path):
    """SmolLM2 fp32 on CPU, a whole ref.unlearn run (4 WMDP steps, batch 4 x 128, tap 7, eager losses), measured in
    a fresh process: the growth of VmHWM against the plan's estimate for ours. fp32 from an fp32 file: the loaded
    weights are the file's pages (resident once read), as a GPU load would hold them in device memory; the estimate
    counts the whole embedding, the run reads the rows of the tokens it meets."""
    if not Path("/proc/self/status").exists():
        pytest.skip("VmHWM is Linux's")
    resolve("smollm2-135m")  # prepared by `make test`
    cmd = [
        sys.executable,
        "-m",
        "bench.worker",
        "run",
        "subset",
        "--dtype",
        "float32",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "run"),
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    res = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert 0.75 <= res["peak"] / res["estimate"] <= 1.25, res
    assert res["loaded_weights"] < 0.45 * res["full_weights"]

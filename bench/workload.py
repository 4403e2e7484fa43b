"""What the benchmarks run: batches of long demo texts, our model and Unlearner, the transformers baseline, and the
full-size models with random weights (GPU)."""

from __future__ import annotations

import copy
import warnings
import zlib

import torch

from ref.io.config_json import config_from_dict
from ref.io.data import load_goal_data, resolve_data_dir
from ref.io.registry import REGISTRY, local_model_dir
from ref.model import Transformer
from ref.objectives import random_directions
from ref.run.plan import Settings, resolve
from ref.train import Run, start_state, step

MODEL = "smollm2-135m"
LR, STEERING, ALPHA = 1e-3, 550.0, 100.0  # the smollm2-135m RMU defaults (ref.io.registry), for both sides

warnings.filterwarnings("ignore", message="Using a target size")  # the reference's broadcast mse_loss, as there


def demo_data():
    return load_goal_data(resolve_data_dir("demo"), "wmdp")


def long_texts(texts: list[str], n: int, paragraphs: int = 40, offset: int = 0) -> list[str]:
    """n texts, each `paragraphs` demo paragraphs joined (~60 tokens each): every row fills the max length, so a
    batch really is n x max_len tokens with no padding."""
    return [" ".join(texts[(offset + i * paragraphs + j) % len(texts)] for j in range(paragraphs)) for i in range(n)]


def batch_texts(data, batch: int) -> tuple[str, list[str], list[str]]:
    topic = next(iter(data.forget))
    return topic, long_texts(data.forget[topic], batch), long_texts(data.retain, batch, offset=7)


def update_layers(tap: int) -> list[int]:
    """The reference's choice at layer 7 (5, 6, 7): the tap layer and the two below."""
    return list(range(max(0, tap - 2), tap + 1))


def unlearner(model, tok, data, method: str, tap: int, seq: int, batch: int, arch: str = MODEL):
    """One step of ref.train as a function (topic, forget texts, retain texts) -> metrics row."""
    model.requires_grad_(False)  # an earlier run on the same model may have switched some tensors on
    rmu = dict(steering=STEERING, alpha=ALPHA) if method == "rmu" else {}
    s = Settings(
        model=arch,
        goal="wmdp",
        method=method,
        tap_layer=tap,
        update_layers=update_layers(tap),
        lr=LR,
        max_len=seq,
        batch_size=batch,
        evaluate=False,
        **rmu,
    )
    plan = resolve(s, model.config)
    u = random_directions(list(data.forget), model.config.hidden_size, plan.seed, next(model.parameters()).device)
    run, state = Run(plan, model, tok, u, None), start_state(plan, model)
    return lambda topic, forget, retain: step(run, state, topic, forget, retain)


def hf_model(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(local_model_dir(MODEL), dtype=dtype, attn_implementation="sdpa").to(
        device
    )


def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local_model_dir(MODEL))


# ---- full size, random weights ----


class TokenStub:
    """Stands in for a tokenizer when there is no checkpoint: each text -> max_length token ids drawn from a
    generator seeded by the text, so ours and the baseline get the same ids."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def batch(self, texts: list[str], max_length: int | None = None, **_) -> tuple[torch.Tensor, torch.Tensor]:
        T = max_length or 512
        rows = [
            torch.randint(self.vocab, (T,), generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
            for t in texts
        ]
        ids = torch.stack(rows)
        return ids, torch.ones_like(ids)


def random_ours(arch: str, dtype: torch.dtype, device: str, blocks: int | None = None) -> Transformer:
    """Our decoder built on the meta device, then materialised on `device` with random values in `dtype`; with
    `blocks=k` only the embedding and blocks 0..k-1 (the rest stays on meta, as a subset load leaves it)."""
    cfg = config_from_dict(REGISTRY[arch].arch)
    with torch.device("meta"):
        model = Transformer(cfg)
    rope = {k: v.clone() for k, v in model.named_buffers()}  # built in fp32 on the CPU even under meta
    parts = [model] if blocks is None else [model.model.embed_tokens, *model.model.layers[:blocks]]
    for part in parts:
        part.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_meta:
                p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02, generator=g)
    for name, b in rope.items():  # to_empty left them uninitialised (and cast): put back the fp32 values
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, b.to(device))
    return model.eval().requires_grad_(False)


def random_hf(arch: str, dtype: torch.dtype, device: str):
    """The same architecture in transformers, two copies (updated, frozen) with the same random values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(REGISTRY[arch].arch)
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device(device):
        updated = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return updated, copy.deepcopy(updated).eval()

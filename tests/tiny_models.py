"""Tiny random checkpoints of each family, built and saved with transformers, keeping the structural flags of the real
7-8B models (docs/design.md section 2): GQA ratio, rope scaling type and parameters, Qwen2 biases, Olmo3 layer_types and
QK-norm, sliding windows shorter than the test sequences. Each is saved in at least two safetensors shards, with a small
BPE tokenizer whose post_processor reproduces the family's BOS behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

TEXT = (
    "The quick brown fox jumps over the lazy dog. Unlearning removes knowledge from a language model "
    "while keeping its general abilities. Residual streams carry activations between transformer blocks. "
    "Cats, dogs and birds live in gardens; rivers flow to the sea. 1234567890 !?.,;: café naïve résumé"
)

SLIDING_WINDOW = 5  # shorter than the test sequences (>= 9 tokens), so the window is exercised

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, max_position_embeddings=32768)

CONFIGS = {
    # Mistral-7B-v0.1: 32 heads / 8 kv heads, theta 1e4, eps 1e-5, sliding window on all layers, BOS.
    "mistral": dict(
        model_type="mistral",
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        sliding_window=SLIDING_WINDOW,
        tie_word_embeddings=False,
    ),
    # Llama-3.1-8B: 32/8, theta 5e5, llama3 rope scaling (factor 8, low 1, high 4, orig 8192), BOS.
    "llama": dict(
        model_type="llama",
        max_position_embeddings=131072,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=False,
    ),
    # Qwen2.5-7B: 28/4 (7:1), q/k/v bias, theta 1e6, eps 1e-6, sliding window configured but not used, no BOS.
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=56,
        num_attention_heads=7,
        num_key_value_heads=1,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        sliding_window=SLIDING_WINDOW,
        max_window_layers=2,
        tie_word_embeddings=False,
    ),
    # Olmo-3-7B: 32/32 (MHA), QK-norm, post-norms, 3 sliding + 1 full layers, yarn on the full layers only.
    "olmo3": dict(
        model_type="olmo3",
        max_position_embeddings=65536,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rope_parameters={
            "sliding_attention": dict(rope_type="default", rope_theta=500000.0),
            "full_attention": dict(
                rope_type="yarn",
                rope_theta=500000.0,
                factor=8.0,
                original_max_position_embeddings=8192,
                attention_factor=1.2079441541679836,
                beta_fast=32.0,
                beta_slow=1.0,
            ),
        },
        tie_word_embeddings=False,
    ),
}

BOS = {"mistral": True, "llama": True, "qwen2": False, "olmo3": False}
# The class transformers picks from tokenizer_config.json; transformers 5 rebuilds some families' pipelines in
# code (Llama's Metaspace, Qwen2's regex) instead of reading tokenizer.json, so ids are compared through the class
# the real checkpoint names.
TOKENIZER_CLASS = {
    "mistral": "LlamaTokenizer",
    "llama": "PreTrainedTokenizerFast",
    "qwen2": "Qwen2Tokenizer",
    "olmo3": "GPT2Tokenizer",
}
SPECIAL = {
    "mistral": ["<unk>", "<s>", "</s>"],
    "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "olmo3": ["<|endoftext|>", "<|pad|>", "<|x|>"],
}
QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(family: str) -> Tokenizer:
    tk = Tokenizer(models.BPE())
    if family == "olmo3":  # GPT-2 style byte level
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # Llama 3 / Qwen2: a regex split, then byte level without its own regex
        regex = LLAMA3_REGEX if family == "llama" else QWEN_REGEX
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if family == "qwen2":
        tk.normalizer = normalizers.NFC()
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL[family], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([TEXT] * 4, trainer)
    if family == "llama":
        bos = SPECIAL[family][0]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def _sentencepiece_bpe() -> Tokenizer:
    """Mistral-7B-v0.1's layout: '▁' for spaces (prepended), BPE with byte fallback, BOS <s>."""
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Tokenizer(models.BPE())
    base.normalizer = norm
    base.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL["mistral"]))
    trained = json.loads(base.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIAL["mistral"] + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.add_special_tokens(SPECIAL["mistral"])
    tk.normalizer = norm
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tk


def build_tokenizer(family: str) -> Tokenizer:
    return _sentencepiece_bpe() if family == "mistral" else _byte_level(family)


def make_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a random tiny model of `family` with its tokenizer into folder (at least 2 shards)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tk = build_tokenizer(family)
    kw = {**COMMON, **CONFIGS[family]}
    model_type = kw.pop("model_type")
    bos, eos = (SPECIAL[family][1], SPECIAL[family][2]) if family == "mistral" else SPECIAL[family][:2]
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=tk.get_vocab_size(),
        bos_token_id=tk.token_to_id(bos),
        eos_token_id=tk.token_to_id(eos),
        **kw,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # random norm weights and biases too, so a missed norm or bias shows in the outputs
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, max_shard_size="100KB")
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)
    fast.save_pretrained(folder)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc.update(tokenizer_class=TOKENIZER_CLASS[family], add_bos_token=BOS[family])
    (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    return folder

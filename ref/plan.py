"""The plan of an unlearning run (layers tapped and run, tensors updated) and an estimate of its peak accelerator
memory, for ours and for the structure of the WMDP reference code, computed from the shapes alone.

    python -m ref.unlearn --model mistral-7b --goal wmdp --dry-run
"""

from __future__ import annotations

from dataclasses import dataclass

from ref.config import ModelConfig
from ref.errors import RefError
from ref.registry import UNLEARN_DEFAULTS, UnlearnDefaults, generic_defaults


@dataclass
class Layers:
    taps: list[int]  # layers whose residual stream the losses read
    update_layers: list[int]  # layers whose `update_params` are trained
    update_params: list[str]
    tox_layers: list[int]  # eq. 6 layers (toxicity, ours), else empty

    @property
    def start(self) -> int:
        """First block run with gradients; the blocks below run once per batch under no_grad."""
        return min(self.update_layers)


def defaults_for(model: str, num_layers: int) -> UnlearnDefaults:
    return UNLEARN_DEFAULTS.get(model) or generic_defaults(num_layers)


def resolve_layers(s, num_layers: int) -> Layers:
    """The layers of a run from its settings (ref.unlearn.Settings) and the registry defaults, validated."""
    d = defaults_for(s.model, num_layers)
    tox = sorted(s.tox_layers or d.tox_layers) if (s.method, s.goal) == ("ours", "toxicity") else []
    taps = tox or [s.tap_layer if s.tap_layer is not None else d.tap_layer]
    update = sorted(s.update_layers or tox or d.update_layers)
    for i in taps + update:
        if not 0 <= i < num_layers:
            raise RefError(f"layer {i} is out of range: {s.model} has layers 0..{num_layers - 1}")
    if max(update) > max(taps):
        raise RefError(f"updated layer {max(update)} is above the deepest tap {max(taps)}: "
                       "it would get no gradient; lower --update-layers or raise the tap")  # fmt: skip
    if min(taps) < min(update):
        raise RefError(f"tap layer {min(taps)} is below the first updated layer {min(update)}: "
                       "its loss could not change; update a layer at or below every tap")  # fmt: skip
    return Layers(taps, update, list(s.update_params or d.update_params), tox)


def layer_params(cfg: ModelConfig) -> dict[str, int]:
    """Element count of each tensor of one block, by the name it has inside the block."""
    D, I, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {"self_attn.q_proj.weight": D * q, "self_attn.k_proj.weight": D * kv, "self_attn.v_proj.weight": D * kv,
           "self_attn.o_proj.weight": q * D, "mlp.gate_proj.weight": D * I, "mlp.up_proj.weight": D * I,
           "mlp.down_proj.weight": I * D, "post_attention_layernorm.weight": D}  # fmt: skip
    if cfg.qkv_bias:
        out |= {"self_attn.q_proj.bias": q, "self_attn.k_proj.bias": kv, "self_attn.v_proj.bias": kv}
    out |= {"post_feedforward_layernorm.weight": D} if cfg.post_norm else {"input_layernorm.weight": D}
    if cfg.qk_norm:
        out |= {"self_attn.q_norm.weight": q, "self_attn.k_norm.weight": kv}
    return out


def total_params(cfg: ModelConfig) -> int:
    embed = cfg.vocab_size * cfg.hidden_size
    return (
        embed * (1 if cfg.tie_word_embeddings else 2)
        + cfg.num_layers * sum(layer_params(cfg).values())
        + cfg.hidden_size
    )


def activation_elements(cfg: ModelConfig, tokens: int) -> int:
    """Elements autograd keeps for one block's backward, per batch of `tokens` (norm inputs and outputs, q, k, v,
    attention output, o_proj output, the four MLP intermediates); an estimate, not a count of every buffer."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return tokens * (6 * cfg.hidden_size + 2 * q + 2 * kv + 4 * cfg.intermediate_size)


def estimate_peak_bytes(cfg: ModelConfig, layers: Layers, batch: int, seq: int, bytes_per: int) -> dict[str, int]:
    """Peak memory of one training step, ours against the reference structure (both updating the same tensors with
    AdamW; optimizer states in the parameter dtype).

    ours: one copy of the weights + the original values of the updated tensors, gradients and two AdamW states; the
    graphs of the forget and the retain pass over blocks start..deepest tap are alive together at the backward.
    reference: two full copies (updated and frozen); each updated forward runs every block and the LM head with
    autograd recording from the first updated block, so the largest moment is the retain pass's full graph and
    logits while the forget pass's graph (start..tap) is kept for the backward."""
    N = batch * seq
    per = layer_params(cfg)
    updated = sum(per[p] for p in layers.update_params) * len(layers.update_layers)
    weights = total_params(cfg) * bytes_per
    optim = 3 * updated * bytes_per  # gradient + exp_avg + exp_avg_sq
    grad_layers = max(layers.taps) - layers.start + 1
    ours = weights + updated * bytes_per + optim + 2 * grad_layers * activation_elements(cfg, N) * bytes_per
    ref_graph = (cfg.num_layers - layers.start) * activation_elements(cfg, N) + N * cfg.vocab_size
    reference = 2 * weights + optim + (grad_layers * activation_elements(cfg, N) + ref_graph) * bytes_per
    return dict(ours=ours, reference=reference, weights=weights, updated_tensors=updated * bytes_per)


def describe(model: str, cfg: ModelConfig, layers: Layers, s, steps: int | None, bytes_per: int) -> str:
    """The dry-run text: layers run, tensors updated, steps, and the memory estimate."""
    seq = s.max_len or defaults_for(model, cfg.num_layers).max_len
    est = estimate_peak_bytes(cfg, layers, s.batch_size, seq, bytes_per)
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    tensors = [f"model.layers.{i}.{p}" for i in layers.update_layers for p in layers.update_params]
    return "\n".join([
        f"plan: {s.method} on {s.goal}, model {model} ({cfg.model_type}, {cfg.num_layers} layers, "
        f"{total_params(cfg) / 1e9:.2f} B parameters)",
        f"- blocks 0..{layers.start - 1} run once per batch under no_grad (shared by the updated and frozen passes)"
        if layers.start else "- no shared prefix (the first block is updated)",
        f"- blocks {layers.start}..{max(layers.taps)} run with gradients; none above {max(layers.taps)}; no LM head",
        f"- taps: {layers.taps}",
        f"- updated tensors ({len(tensors)}, {gib(est['updated_tensors'])}): {', '.join(tensors)}",
        f"- steps: {'unknown' if steps is None else steps} (data {s.data}{' not prepared' if steps is None else ''}), "
        f"batch {s.batch_size} x {seq} tokens",
        f"- estimated peak memory ({bytes_per * 8}-bit weights): ours {gib(est['ours'])}, "
        f"reference structure {gib(est['reference'])} ({est['ours'] / est['reference']:.2f}x)",
    ])  # fmt: skip

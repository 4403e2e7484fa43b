"""Peak accelerator memory of one training step, ours against the structure of the WMDP reference code, from the
shapes alone (no weights): what `python -m ref.unlearn --dry-run` prints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ref.config import ModelConfig

if TYPE_CHECKING:
    from ref.run.plan import Plan


def layer_params(cfg: ModelConfig) -> dict[str, int]:
    """Element count of each tensor of one block, by the name it has inside the block."""
    D, I, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {
        "self_attn.q_proj.weight": D * q,
        "self_attn.k_proj.weight": D * kv,
        "self_attn.v_proj.weight": D * kv,
        "self_attn.o_proj.weight": q * D,
        "mlp.gate_proj.weight": D * I,
        "mlp.up_proj.weight": D * I,
        "mlp.down_proj.weight": I * D,
        "post_attention_layernorm.weight": D,
    }
    if cfg.qkv_bias:
        out |= {"self_attn.q_proj.bias": q, "self_attn.k_proj.bias": kv, "self_attn.v_proj.bias": kv}
    out |= {"post_feedforward_layernorm.weight": D} if cfg.post_norm else {"input_layernorm.weight": D}
    if cfg.qk_norm:
        out |= {"self_attn.q_norm.weight": q, "self_attn.k_norm.weight": kv}
    return out


def loaded_params(cfg: ModelConfig, blocks: int) -> int:
    """Parameters of a subset load: the embedding and blocks 0..blocks-1 (no final norm, no LM head)."""
    return cfg.vocab_size * cfg.hidden_size + blocks * sum(layer_params(cfg).values())


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


def estimate_peak_bytes(cfg: ModelConfig, plan: Plan, bytes_per: int) -> dict[str, int]:
    """Peak memory of one training step, ours against the reference structure (both updating the same tensors with
    AdamW; optimizer states in the parameter dtype).

    ours: one copy of the weights it loads (the embedding and blocks 0..deepest tap) + the original values of the
    updated tensors, their values before the step (the share of elements a step moves), gradients and two AdamW
    states (fp32, with fp32 masters and their gradients, under --master-weights fp32 for a narrower dtype); the
    graphs of the forget and the retain pass over blocks start..deepest tap are alive together at the backward.
    reference: two full copies (updated and frozen); each updated forward runs every block and the LM head with
    autograd recording from the first updated block, so the largest moment is the retain pass's full graph and
    logits while the forget pass's graph (start..tap) is kept for the backward."""
    N = plan.batch_size * plan.max_len
    per = layer_params(cfg)
    updated = sum(per[p] for p in plan.update_params) * len(plan.update_layers)
    weights, full = loaded_params(cfg, max(plan.taps) + 1) * bytes_per, total_params(cfg) * bytes_per
    optim = 3 * updated * bytes_per  # gradient + exp_avg + exp_avg_sq
    masters = 4 * updated * 4 if plan.master_weights == "fp32" and bytes_per < 4 else 0  # copy, grad, 2 states
    ours_optim = updated * bytes_per + (masters or 2 * updated * bytes_per)
    grad_layers = max(plan.taps) - plan.start + 1
    ours = weights + 2 * updated * bytes_per + ours_optim + 2 * grad_layers * activation_elements(cfg, N) * bytes_per
    ref_graph = (cfg.num_layers - plan.start) * activation_elements(cfg, N) + N * cfg.vocab_size
    reference = 2 * full + optim + (grad_layers * activation_elements(cfg, N) + ref_graph) * bytes_per
    return dict(
        ours=ours,
        reference=reference,
        weights=weights,
        full_weights=full,
        updated_tensors=updated * bytes_per,
        master_weights=masters,
    )


def lora_peak_bytes(cfg: ModelConfig, r: int, seq: int, bytes_per: int) -> dict[str, int]:
    """Peak memory of one step of the relearning attack (ref.attacks.relearn, LoRA on the seven block linears, batch 1 x
    seq tokens): the weights, the adapters in fp32 with their gradients and two AdamW states, the activations
    autograd keeps for every block (the adapters sit in all of them) and the fp32 logits with their log-softmax."""
    D, I, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sides = [(D, q), (D, kv), (D, kv), (q, D), (D, I), (D, I), (I, D)]  # (in, out) of q k v o gate up down
    adapters = cfg.num_layers * r * sum(i + o for i, o in sides)
    weights = total_params(cfg) * bytes_per
    activations = cfg.num_layers * activation_elements(cfg, seq) * bytes_per + 2 * seq * cfg.vocab_size * 4
    return dict(
        total=weights + 16 * adapters + activations, weights=weights, adapters=16 * adapters, activations=activations
    )


def softprompt_peak_bytes(cfg: ModelConfig, tokens: int, batch: int, seq: int, bytes_per: int) -> dict[str, int]:
    """Peak memory of one chunk of the soft-prompt attack (ref.attacks.softprompt, `batch` questions of `seq` tokens
    after the `tokens` prompt embeddings): the weights, the prompt in fp32 with its gradient and two Adam states, the
    activations autograd keeps for every block (the gradient reaches the input, so every block keeps its graph), and
    the logits with the fp32 log-softmax of the answer positions (at most 32 a question)."""
    n = batch * (seq + tokens)
    weights = total_params(cfg) * bytes_per
    prompt = 16 * tokens * cfg.hidden_size
    activations = cfg.num_layers * activation_elements(cfg, n) * bytes_per + n * cfg.vocab_size * bytes_per
    activations += 2 * batch * 32 * cfg.vocab_size * 4
    return dict(total=weights + prompt + activations, weights=weights, prompt=prompt, activations=activations)


def logit_lens_peak_bytes(cfg: ModelConfig, batch: int, seq: int, bytes_per: int) -> dict[str, int]:
    """Peak memory of the logit lens over every layer (ref.evaluation.mc with all layers tapped, no gradients; a batch
    of `batch` sequences of `seq` tokens): the weights, the residual stream of every layer for the whole batch, one
    block's activations, and one layer's fp32 log-softmax over the scored positions (at most 32 a sequence)."""
    weights = total_params(cfg) * bytes_per
    taps = cfg.num_layers * batch * seq * cfg.hidden_size * bytes_per
    block = activation_elements(cfg, batch * seq) * bytes_per + 2 * batch * 32 * cfg.vocab_size * 4
    return dict(total=weights + taps + block, weights=weights, taps=taps, activations=block)

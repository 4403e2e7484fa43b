"""Attacks on an unlearned model: relearning, ablation, quantisation, few-shot, soft prompts, logit lens, pruning."""

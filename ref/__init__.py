"""ref: reference implementation of goal-dependent LLM unlearning (arXiv 2605.26454)."""

from ref.io.checkpoint import load_model
from ref.io.tokenizer import load_tokenizer

__all__ = ["load_model", "load_tokenizer"]

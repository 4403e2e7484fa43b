"""Input and output: checkpoints, tokenizers, placement, the model registry, data, run folders, checks, errors."""

from __future__ import annotations

import pytest
import torch

from ref.io.checkpoint import load_model
from ref.io.tokenizer import load_tokenizer
from tests.tiny_models import CONFIGS, make_tiny_model

FAMILIES = list(CONFIGS)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> folder of a tiny random transformers checkpoint (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f) for f in FAMILIES}


# Module scope: the model is freed after each test module (test_unlearn counts the Transformers alive).
@pytest.fixture(scope="module")
def tiny_llama(tiny_dirs):
    """(folder, fp32 CPU model, tokenizer) of the tiny llama checkpoint; a test that changes the model restores it."""
    folder = tiny_dirs["llama"]
    return folder, load_model(folder, dtype=torch.float32, device="cpu"), load_tokenizer(folder)

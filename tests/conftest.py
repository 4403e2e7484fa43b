from __future__ import annotations

import pytest

from tests.tiny_models import CONFIGS, make_tiny_model

FAMILIES = list(CONFIGS)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> folder of a tiny random transformers checkpoint (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f) for f in FAMILIES}

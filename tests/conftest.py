"""Shared fixtures: tiny models built once per test session in a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Offline before transformers is imported (it reads these at import time): a hub id that is not
# cached must fail at once, not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import tiny_models

SHARED_DATA = Path(
    os.environ.get("ALIGNER_DATA_DIR", Path(__file__).parents[2] / "shared" / "data")
)


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_seqcls_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_sequence_classifier(tmp_path_factory.mktemp("tiny-seqcls"))


@pytest.fixture(scope="session")
def tiny_guard_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_guard_model(tmp_path_factory.mktemp("tiny-guard"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public safety data beside the checkout; tests that need it skip on a fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set ALIGNER_DATA_DIR); CI has it")
    return SHARED_DATA

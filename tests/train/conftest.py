"""Fixtures of the trainer tests (helpers live in train_helpers.py)."""
import pytest
from train_helpers import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))

"""Shared test set-up: quiet TensorFlow logs, deterministic seeds, repo paths."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same Python, NumPy and TensorFlow seeds."""
    import keras

    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO_ROOT

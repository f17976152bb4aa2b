"""Shared test set-up: quiet TensorFlow logs, deterministic seeds, repo paths."""

import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Text encoders and caches (atl_keras.home): the checkout's built use-m3 (`make setup`), as
# `make test` sets it, so a test never builds the encoder again in ~/.cache/atl-keras.
os.environ.setdefault("ATL_HOME", str(REPO_ROOT / "saved_models"))


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same Python, NumPy and TensorFlow seeds."""
    import keras

    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO_ROOT


# ------------------------------------------------------------------ parallel runs (make test)
#: Files that take longest, longest first (`--durations`, one file at a time, 2026-12-01
#: 18:00-18:30 UTC, load 1-3.5): faults ~330 s, readme_cli 130-340 s, weak_label ~175 s,
#: distribute ~160 s, losses_jax ~105 s, export ~90 s, proxy_losses ~80 s, losses_xla ~70 s,
#: train ~60 s, losses ~55 s, replication ~50 s, then 25 s and less. `make test` runs the
#: suite on 2 pytest-xdist workers with `--dist loadfile --no-loadscope-reorder`: each file
#: stays on one worker (its module fixtures are built once) and files are handed out in
#: collection order, so the long ones start first and the short ones fill in at the end
#: (longest-processing-time first). Files not listed keep their alphabetical order after these.
LONGEST_FIRST = (
    "test_faults.py",
    "test_readme_cli.py",
    "test_weak_label.py",
    "test_distribute.py",
    "test_losses_jax.py",
    "test_pair_losses_jax.py",
    "test_export.py",
    "test_proxy_losses.py",
    "test_losses_xla.py",
    "test_train.py",
    "test_losses.py",
    "test_replication.py",
    "test_serving.py",
    "test_packaging.py",
    "test_model.py",
    "test_cli.py",
    "test_losses_keras_native.py",
    "test_model_jax.py",
    "test_catalog_index.py",
    "test_readme.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Under xdist, collect the longest files first (see LONGEST_FIRST)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def run_under_jax(script: str, timeout: float) -> dict:
    """Run ``script`` in a fresh Python with ``KERAS_BACKEND=jax``; return the JSON it printed
    last on a ``RESULT:`` line. LLVM -O0: XLA compilations dominate these tiny-batch tests and
    the numerics do not depend on it (no fast-math either way)."""
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_backend_optimization_level=0")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT:")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT:"):])

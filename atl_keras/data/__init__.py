"""Dataset readers and tf.data pipelines: Fashion-MNIST, P x K batch sampling.

Names are imported lazily (PEP 562), so ``import atl_keras.data.<reader>`` does not pull in
TensorFlow unless a tf.data pipeline is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FashionMNIST": "atl_keras.data.fashion_mnist",
    "load_fashion_mnist": "atl_keras.data.fashion_mnist",
    "read_idx": "atl_keras.data.fashion_mnist",
    "pk_dataset": "atl_keras.data.sampler",
    "pk_index_dataset": "atl_keras.data.sampler",
    "steps_per_epoch": "atl_keras.data.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'atl_keras.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

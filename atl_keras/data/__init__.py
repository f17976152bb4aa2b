"""Dataset readers and tf.data pipelines: Fashion-MNIST, catalogs (CSV/JSONL, DeepFashion
In-shop, the synthetic shop), image decoding, P x K batch sampling (in memory, or streamed
from files and TFRecord shards).

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
    "Catalog": "atl_keras.data.catalog",
    "assign_splits": "atl_keras.data.catalog",
    "check_disjoint_splits": "atl_keras.data.catalog",
    "read_catalog": "atl_keras.data.catalog",
    "read_deepfashion_inshop": "atl_keras.data.deepfashion",
    "inshop_query_gallery": "atl_keras.data.deepfashion",
    "ImageDecodeError": "atl_keras.data.images",
    "decode_images": "atl_keras.data.images",
    "find_invalid_images": "atl_keras.data.images",
    "image_dataset": "atl_keras.data.images",
    "make_synthetic_shop": "atl_keras.data.synthetic_shop",
    "FileImages": "atl_keras.data.sources",
    "read_shards": "atl_keras.data.shards",
    "write_shards": "atl_keras.data.shards",
    "ShardImages": "atl_keras.data.sources",
    "SourceImages": "atl_keras.data.source_images",
    "readable_rows": "atl_keras.data.source_images",
    "SkippedRows": "atl_keras.data.streaming",
    "SkippedRowsWarning": "atl_keras.data.streaming",
    "decode_source": "atl_keras.data.streaming",
    "pk_stream_dataset": "atl_keras.data.streaming",
    "stream_images": "atl_keras.data.streaming",
    "contact_sheet": "atl_keras.data.synthetic_shop",
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

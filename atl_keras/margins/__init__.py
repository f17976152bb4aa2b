"""The weak-label margin: how a text distance becomes a per-pair margin.

- `atl_keras.margins.checks`: argument checks (margin range, semantic threshold,
  missing-text margin).
- `atl_keras.margins.mapping`: text distances and the mappings (``linear``, ``paper``,
  ``catalog``), `class_margin_matrix`. Numpy and `keras.ops`.
- `atl_keras.margins.batch`: per-batch ``[B, B]`` margin matrices and the semantic mask, in
  `keras.ops` (`batch_margin_matrices`, `adaptive_margins`).
- `atl_keras.margins.sources`: the ``[M, M]`` margin table of a catalog from a source
  (text and its controls: shuffled, permuted, fixed, oracle; random, which needs no text).
- `atl_keras.margins.report`: the inspect-margins report (`atl inspect-margins`).
- `atl_keras.margins.weak_label`: `WeakLabelMargins`, the weak label of the pair losses
  (contrastive, multi-similarity, circle): text or table margins as a relaxation of each
  loss' negative term.
- `atl_keras.margins.class_margins`: `ClassMargins`, the per-class margins of the proxy
  losses (adaptive proxy, ArcFace).

Every loss with a weak-label margin reads it from here; nothing here imports a loss.
The numpy parts import without Keras; `batch` names load Keras on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from atl_keras.margins.checks import (
    validate_adaptive_margins,
    validate_margin,
    validate_margin_range,
    validate_missing_text_margin,
    validate_semantic_threshold,
)
from atl_keras.margins.mapping import (
    MAPPINGS,
    class_margin_matrix,
    linear_margins,
    map_distances,
    text_distance_table,
    text_distances,
    unit_text_rows,
)
from atl_keras.margins.sources import (
    SOURCES,
    attribute_disagreement,
    derangement,
    margin_spread,
    margin_table,
    random_margin_table,
)

_BATCH = ("adaptive_margins", "batch_margin_matrices", "missing_rows")
#: keras.ops code in other modules, imported on first use like `_BATCH`.
_LAZY = {"WeakLabelMargins": "atl_keras.margins.weak_label",
         "weak_label_from_config": "atl_keras.margins.weak_label",
         "ClassMargins": "atl_keras.margins.class_margins"}

__all__ = [
    "MAPPINGS",
    "SOURCES",
    "attribute_disagreement",
    "class_margin_matrix",
    "derangement",
    "linear_margins",
    "map_distances",
    "margin_spread",
    "margin_table",
    "random_margin_table",
    "text_distance_table",
    "text_distances",
    "unit_text_rows",
    "validate_adaptive_margins",
    "validate_margin",
    "validate_margin_range",
    "validate_missing_text_margin",
    "validate_semantic_threshold",
    *_BATCH,
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _BATCH:  # keras.ops code: imported on first use
        return getattr(importlib.import_module("atl_keras.margins.batch"), name)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'atl_keras.margins' has no attribute {name!r}")

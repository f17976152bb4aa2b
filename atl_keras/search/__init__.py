"""Gallery search: one `Searcher` seam (exact, ScaNN), `RetrievalIndex`, calibration and pictures.

    from atl_keras.search import RetrievalIndex
    index = RetrievalIndex.from_embeddings(gallery, ids)          # or RetrievalIndex(model).add(images, ids)
    ids, scores = index.lookup(queries, k=10)
    index.calibrate(queries, expected_ids, target_precision=0.95)
    index.match(queries)                                           # id or None per query

Modules: `base` (the `Searcher` protocol and registry), `exact` (the one exact top-k),
`scann` (the tuned ScaNN index), `retrieval_index`, `store` (the on-disk index the export
shares), `calibration`, `pictures`.
"""

from __future__ import annotations

import importlib
from typing import Any

from atl_keras.search.base import SEARCHERS, Searcher, build_searcher, searcher_class
from atl_keras.search.exact import DISTANCES, Distance, ExactSearcher, exact_search

__all__ = [
    "DISTANCES", "Distance", "ExactSearcher", "SEARCHERS", "Searcher", "build_searcher", "exact_search",
    "searcher_class", "RetrievalIndex", "Calibration", "calibrate_threshold", "neighbour_grid",
    "plot_precision_recall",
]

_LAZY = {
    "RetrievalIndex": "atl_keras.search.retrieval_index",
    "Calibration": "atl_keras.search.calibration",
    "calibrate_threshold": "atl_keras.search.calibration",
    "neighbour_grid": "atl_keras.search.pictures",
    "plot_precision_recall": "atl_keras.search.pictures",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'atl_keras.search' has no attribute {name!r}")

"""The search seam: what a gallery searcher provides, and the searchers the package knows.

A `Searcher` is built from gallery embeddings ``[N, D]`` (unit rows; score = dot product,
higher is closer), searches batches of queries in Python, writes its index into a
SavedModel (``to_state``: a ``tf.Module`` of variables) and searches it there in graph mode
(``state_top_k``, what the exported ``retrieve`` signature runs), and is rebuilt from a
loaded state (``from_state``). The export, `atl index`, the ScaNN recall gate and
`atl_keras.search.RetrievalIndex` use searchers only through this protocol.

Two implementations: ``"exact"`` (`atl_keras.search.exact.ExactSearcher`, pure TensorFlow,
ties by gallery position) and ``"scann"`` (`atl_keras.search.scann.ScannSearcher`, the
tuned ScaNN index with its recall gate). A third backend is one module with a class
implementing the protocol, registered in `SEARCHERS`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["SEARCHERS", "Searcher", "build_searcher", "searcher_class"]

#: Searcher kind -> ``"module:Class"`` (imported on use: ScaNN is an optional extra).
SEARCHERS: dict[str, str] = {
    "exact": "atl_keras.search.exact:ExactSearcher",
    "scann": "atl_keras.search.scann:ScannSearcher",
}


@runtime_checkable
class Searcher(Protocol):
    """A top-k index over fixed gallery embeddings ``[N, D]`` (dot-product scores)."""

    kind: str
    num_items: int

    @classmethod
    def build(cls, embeddings: np.ndarray, **options: Any) -> "Searcher":
        """The index over ``embeddings [N, D]``; options are the backend's knobs."""

    @property
    def embeddings(self) -> np.ndarray:
        """The gallery rows ``[N, D]`` the index was built from."""

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [Q, k] int64, scores [Q, k] float32)`` for ``queries [Q, D]``, best first
        (-1 / -inf pad a query with fewer than ``k`` results)."""

    def to_state(self, rows_from: Any = None) -> Any:
        """The index as a ``tf.Module`` of variables, saved inside a SavedModel."""

    def state_top_k(self, state: Any, queries: Any, k: Any) -> tuple[Any, Any]:
        """Graph-mode search of a (saved or restored) state: ``(indices [B, k], scores [B, k])``."""

    def config(self) -> dict[str, Any]:
        """JSON-able description (``{"kind": ..., ...}``) written into the manifest."""

    @classmethod
    def from_state(cls, state: Any, embeddings: np.ndarray, config: dict[str, Any]) -> "Searcher":
        """The searcher of a state restored by ``tf.saved_model.load`` (no rebuild)."""


def searcher_class(kind: str) -> type:
    """The class registered for ``kind`` (``"exact"``, ``"scann"``, ...)."""
    if kind not in SEARCHERS:
        raise ValueError(f"Unknown searcher {kind!r}; expected one of {sorted(SEARCHERS)}.")
    module, name = SEARCHERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build_searcher(kind: str, embeddings: np.ndarray, **options: Any) -> Searcher:
    """``searcher_class(kind).build(embeddings, **options)``."""
    return searcher_class(kind).build(embeddings, **options)

"""The ScaNN `Searcher`: `atl_keras.index`'s tuned tree, gated on set recall against exact search.

    searcher = ScannSearcher.build(gallery, k=10, min_recall=0.95)   # tuned, or RecallGateError
    indices, scores = searcher.top_k(queries, 10)
    searcher.config()["recall"]["set_recall"]

Building tunes the index (`atl_keras.index.tune_index`: tree size, leaves searched, scoring,
adaptive leaf search) to the fastest configuration whose set recall@k on held-out queries
reaches ``min_recall``, and refuses an index below it (`RecallGateError`); ``scann_config=``
builds one fixed configuration instead (measured and gated the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from atl_keras.index import (
    ScannConfig,
    TunedIndex,
    fixed_index,
    held_out_queries,
    release_searcher,
    scann_ops,
    searcher_from_tensors,
    searcher_to_state,
    tune_index,
)

__all__ = ["IndexOptions", "RecallGateError", "ScannSearcher"]

#: The `ScannState` variables, in `scann_ops.scann_to_tensors` order.
STATE_VARIABLES = (
    "scann_config", "serialized_partitioner", "datapoint_to_token", "ah_codebook", "hashed_dataset",
    "int8_dataset", "int8_multipliers", "dp_norms", "dataset",
)


def _state_tensors(state: Any) -> list[Any]:
    """The index tensors of a `ScannState` (made here or restored by ``tf.saved_model.load``)."""
    return [getattr(state, name).read_value() for name in STATE_VARIABLES]


class RecallGateError(ValueError):
    """The index's set recall against exact search is below the target; nothing was built."""


@dataclass(frozen=True)
class IndexOptions:
    """Knobs the user fixes; ``None`` = tuned (see `atl_keras.index.tune_index`).

    ``quantize``: True = asymmetric hashing + exact re-rank in the searched leaves, False =
    exact scoring in the leaves. ``num_leaves=0`` scores the whole gallery exactly.
    """

    num_leaves: int | None = None
    leaves_to_search: int | None = None
    reorder: int | None = None
    quantize: bool | None = None
    num_queries: int = 1000


class ScannSearcher:
    """A tuned ScaNN index over gallery embeddings ``[N, D]`` (dot-product scores)."""

    kind = "scann"

    def __init__(self, tuned: TunedIndex, embeddings: np.ndarray, min_recall: float = 0.0) -> None:
        self.tuned = tuned
        self.scann_config: ScannConfig = tuned.config
        self.min_recall = float(min_recall)
        self._embeddings = embeddings
        self.num_items = int(len(embeddings))
        self._searcher: Any = tuned.searcher
        self._state: Any = None

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        *,
        k: int = 10,
        min_recall: float = 0.95,
        query_embeddings: np.ndarray | None = None,
        scann_config: ScannConfig | None = None,
        options: IndexOptions | None = None,
        seed: int = 0,
    ) -> "ScannSearcher":
        """Tune (or build `scann_config`) and gate: set recall@k below `min_recall` raises
        `RecallGateError`. ``query_embeddings``: real held-out queries (default: gallery items
        excluding themselves)."""
        options = options or IndexOptions()
        gallery = embeddings
        queries = held_out_queries(gallery, query_embeddings, count=options.num_queries, seed=seed)
        if scann_config is not None:
            tuned = fixed_index(gallery, scann_config, k, queries)
        else:
            tuned = tune_index(
                gallery, k, min_recall, queries, num_leaves=options.num_leaves,
                leaves_to_search=options.leaves_to_search, reorder=options.reorder,
                quantize=options.quantize, seed=seed,
            )
        chosen = tuned.report["chosen"]
        recall_k = tuned.report.get("k", min(k, len(gallery)))
        if chosen["set_recall"] < min_recall:
            release_searcher(tuned.searcher)
            raise RecallGateError(
                f"Index set recall@{recall_k} against exact search is {chosen['set_recall']:.4f} "
                f"(tie-aware {chosen['tie_aware_recall']:.4f}) on {len(queries.embeddings)} held-out "
                f"queries, below min_recall={min_recall}. Search more leaves (--leaves-to-search), "
                "score exactly in the leaves (--no-quantize), or lower min_recall (--min-recall) to "
                "accept it. Nothing was written."
            )
        return cls(tuned, gallery, min_recall)

    @property
    def embeddings(self) -> np.ndarray:
        return self._embeddings

    def _live(self) -> Any:
        if self._searcher is None:  # the index was moved into a state: search a searcher made from it
            self._searcher = searcher_from_tensors(_state_tensors(self._state), self.scann_config)
        return self._searcher

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        indices, scores = self._live().search_batched_parallel(
            queries, final_num_neighbors=int(k), **self.scann_config.search_kwargs)
        indices = np.asarray(indices, np.int64)
        scores = np.where(indices >= 0, np.asarray(scores, np.float32), -np.inf).astype(np.float32)
        if indices.shape[1] < k:  # fewer than k found: pad
            pad = k - indices.shape[1]
            indices = np.pad(indices, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return indices, scores

    def to_state(self, rows_from: Any = None) -> Any:
        """The index as a `scann_ops.ScannState` (the searcher is freed: the state holds the index)."""
        if self._state is None:
            self._state = searcher_to_state(self._live())
            self._searcher = None
        return self._state

    def holds_rows(self, state: Any) -> bool:
        """Whether `state` keeps the float gallery rows (exact search can share them)."""
        return tuple(state.dataset.shape) == tuple(self._embeddings.shape)

    def state_top_k(self, state: Any, queries: Any, k: Any) -> tuple[Any, Any]:
        searcher = scann_ops.searcher_from_module(state)
        return searcher.search_batched_parallel(queries, final_num_neighbors=k, **self.scann_config.search_kwargs)

    def config(self) -> dict[str, Any]:
        chosen = self.tuned.report["chosen"]
        k = self.tuned.report.get("k", self.scann_config.default_k)
        return {
            "kind": self.kind,
            "index": "scann",
            "scann_config": self.scann_config.to_dict(),
            f"scann_recall_at_{k}": chosen["set_recall"],
            "recall": {
                "k": k,
                "set_recall": chosen["set_recall"],
                "tie_aware_recall": chosen["tie_aware_recall"],
                "queries": self.tuned.report.get("queries"),
                "definition": "plain set recall |ANN top-k ∩ exact top-k| / k; tie-aware counts "
                "results within 1e-3 of the exact k-th score (reported, not gated)",
            },
            "index_tuning": {key: value for key, value in self.tuned.report.items() if key != "queries"},
            "min_recall": self.min_recall,
        }

    @classmethod
    def from_state(cls, state: Any, embeddings: np.ndarray, config: dict[str, Any]) -> "ScannSearcher":
        scann_config = ScannConfig.from_dict(config["scann_config"])
        searcher = searcher_from_tensors(_state_tensors(state), scann_config)
        recall = config.get("recall", {})
        report = {"k": recall.get("k", scann_config.default_k), "queries": recall.get("queries"),
                  "chosen": {"set_recall": recall.get("set_recall", float("nan")),
                             "tie_aware_recall": recall.get("tie_aware_recall", float("nan"))},
                  **config.get("index_tuning", {})}
        report["chosen"] = config.get("index_tuning", {}).get("chosen", report["chosen"])
        return cls(TunedIndex(searcher, scann_config, report), embeddings, config.get("min_recall", 0.0))

    def release(self) -> None:
        """Free the searcher now (its resource holds a copy of the gallery)."""
        if self._searcher is not None:
            release_searcher(self._searcher)
            self._searcher = None

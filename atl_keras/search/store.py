"""The searchable gallery as SavedModel state: what an export version and `RetrievalIndex.save` hold.

`IndexModule` keeps a searcher's state (``searcher_state``: the ScaNN index), the exact
search's rows (``exact_state``: shared with the ScaNN state when it keeps the float rows),
the gallery ids, per-row assets (image ids, metadata) and an optional match threshold. The
export's `RetrievalModule` is an `IndexModule` with a model in front, so a saved index and
an export version have the same variables and assets, and `RetrievalIndex.load` reads both.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from atl_keras.search.exact import ExactState, loaded_exact_rows

__all__ = ["IndexModule", "line_table", "loaded_rows"]


def line_table(asset: tf.saved_model.Asset) -> tf.lookup.StaticHashTable:
    """Line number (int64) -> line text of an asset file."""
    initializer = tf.lookup.TextFileInitializer(
        asset, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE
    )
    return tf.lookup.StaticHashTable(initializer, default_value="")


class IndexModule(tf.Module):
    """A gallery index as a ``tf.Module``: search it in graph mode with `search`.

    Args:
        searcher: a `Searcher` (its state is saved) or None (exact search only).
        embeddings: the gallery rows ``[N, D]`` (default ``searcher.embeddings``).
        gallery_ids: ``N`` item ids (the ``ids`` output).
        row_assets: output name -> a text file with one line per row (``image_ids``, ``metadata``).
        match_threshold: results scoring at least this are flagged in a ``match`` output.
    """

    def __init__(
        self,
        searcher: Any,
        gallery_ids: Sequence[str],
        *,
        embeddings: np.ndarray | None = None,
        row_assets: dict[str, str] | None = None,
        match_threshold: float | None = None,
        name: str = "atl_index",
    ) -> None:
        super().__init__(name=name)
        embeddings = searcher.embeddings if embeddings is None else embeddings
        self.embedding_dim = int(embeddings.shape[1])
        self._searcher = searcher if searcher is not None and searcher.kind != "exact" else None
        rows_from = None
        if self._searcher is not None:
            self.searcher_state = self._searcher.to_state()
            holds_rows = getattr(self._searcher, "holds_rows", None)
            rows_from = self.searcher_state if holds_rows is not None and holds_rows(self.searcher_state) else None
        self.exact_state = ExactState(embeddings, rows_from)
        self.gallery_ids = tf.Variable(tf.constant(list(gallery_ids), dtype=tf.string), trainable=False,
                                       name="gallery_ids")
        self.row_tables = {
            output: line_table(tf.saved_model.Asset(path)) for output, path in (row_assets or {}).items()
        }
        self.has_threshold = match_threshold is not None
        if match_threshold is not None:
            self.match_threshold = tf.Variable(float(match_threshold), dtype=tf.float32, trainable=False,
                                               name="match_threshold")

    @property
    def has_searcher(self) -> bool:
        return self._searcher is not None

    def search(self, embeddings: tf.Tensor, k: tf.Tensor, exact: bool = False) -> dict[str, tf.Tensor]:
        """Graph search: ``embeddings [B, D]``, ``k`` -> ``ids``, ``scores``, ``indices`` ``[B, k]``
        (+ the row outputs, + ``match`` bool ``[B, k]`` with a threshold)."""
        if exact or self._searcher is None:
            indices, scores = self.exact_state.top_k(embeddings, k)
        else:
            indices, scores = self._searcher.state_top_k(self.searcher_state, embeddings, k)
        indices = tf.cast(indices, tf.int32)
        safe = tf.maximum(indices, 0)  # ScaNN pads with -1 when it finds fewer than k
        scores = tf.cast(scores, tf.float32)
        out = {
            "ids": tf.where(indices >= 0, tf.gather(self.gallery_ids, safe), ""),
            "scores": scores,
            "indices": indices,
        }
        for output, table in self.row_tables.items():
            out[output] = table.lookup(tf.cast(indices, tf.int64))
        if self.has_threshold:
            out["match"] = tf.logical_and(indices >= 0, scores >= self.match_threshold)
        return out

    def lookup_signatures(self) -> dict[str, Any]:
        """``lookup`` (``embeddings [B, D]``, ``k``) and, with a searcher, ``lookup_exact``."""
        spec = [tf.TensorSpec([None, self.embedding_dim], tf.float32, name="embeddings"),
                tf.TensorSpec([], tf.int32, name="k")]

        @tf.function(input_signature=spec)
        def lookup(embeddings, k):
            return self.search(embeddings, k)

        @tf.function(input_signature=spec)
        def lookup_exact(embeddings, k):
            return self.search(embeddings, k, exact=True)

        self.lookup, self.lookup_exact = lookup, lookup_exact
        return {"lookup": lookup, **({"lookup_exact": lookup_exact} if self._searcher is not None else {})}


def loaded_rows(loaded: Any) -> np.ndarray:
    """The gallery rows ``[N, D]`` of an `IndexModule` (or export) restored by ``tf.saved_model.load``."""
    return loaded_exact_rows(loaded.exact_state)

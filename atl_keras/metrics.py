"""Retrieval metrics (Recall@K, Precision@1, R-Precision, MAP@R), NMI/AMI, and a Keras callback.

Definitions follow Musgrave, Belongie & Lim, "A Metric Learning Reality Check"
(ECCV 2020). For a query with label ``y``:

- ``R`` = number of gallery items labelled ``y`` (the query itself excluded in
  leave-one-out). Queries with ``R == 0`` are left out of every mean and counted in
  ``num_queries_without_match``.
- ``recall_at_k``: 1 if any of the ``k`` nearest gallery items has label ``y`` (the
  metric-learning "Recall@K", not the IR recall), averaged over queries.
- ``precision_at_1``: 1 if the nearest item has label ``y``.
- ``r_precision``: (relevant items among the top ``R``) / ``R``.
- ``map_at_r``: ``(1/R) * sum_{i=1..R} P(i) * rel(i)``, ``P(i)`` the precision of the
  top ``i``.

Beside them, as PML's ``AccuracyCalculator``: ``nmi`` and ``ami`` of k-means on the query
embeddings (as many clusters as distinct query labels) against the query labels
(:mod:`atl_keras.clustering`; ``clustering=False`` skips them).

Neighbours are ranked by :mod:`atl_keras.search` (exact, ties to the lower gallery
index), in query chunks, keeping only the top ``max(R, k)`` of each chunk: memory is
``O(chunk_size * N)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from atl_keras.clustering import clustering_metrics
from atl_keras.distances import RANKING_DISTANCES, resolve_distance
from atl_keras.search import Distance, ExactSearcher

__all__ = ["RetrievalEvaluation", "format_metrics_table", "retrieval_metrics"]

_COUNT_KEYS = ("num_queries", "num_queries_without_match")


def _ranking_distance(distance: str) -> str:
    """Canonical ranking distance for the searcher; ``"l2"`` ranks as ``"squared_l2"``."""
    distance = resolve_distance(distance, RANKING_DISTANCES)
    return "squared_l2" if distance == "l2" else distance


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"`ks` must be a non-empty sequence of positive integers; got {ks!r}.")
    return tuple(sorted({int(k) for k in ks}))


def _as_labels(labels: Any, name: str) -> np.ndarray:
    """Labels as a 1-D array ``[n]`` (``[n, 1]`` is squeezed)."""
    if isinstance(labels, tf.Tensor):
        labels = labels.numpy()
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D [num_items] (one label per row); got shape {arr.shape}.")
    return arr


def _num_rows(x: Any) -> int:
    return int(np.shape(x)[0])


def _match_counts(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """``[Q]`` int64: how many gallery labels equal each query label."""
    unique, counts = np.unique(gallery_labels, return_counts=True)
    if unique.shape[0] == 0:
        return np.zeros(query_labels.shape[0], np.int64)
    try:
        pos = np.searchsorted(unique, query_labels)
    except TypeError as err:  # e.g. int vs str labels
        raise ValueError(
            f"Query labels ({query_labels.dtype}) and gallery labels ({gallery_labels.dtype}) "
            "cannot be compared; use the same label type for both."
        ) from err
    pos = np.minimum(pos, unique.shape[0] - 1)
    found = unique[pos] == query_labels
    return np.where(found, counts[pos], 0).astype(np.int64)


def retrieval_metrics(
    query_embeddings: Any,
    query_labels: Any,
    gallery_embeddings: Any = None,
    gallery_labels: Any = None,
    ks: Sequence[int] = (1, 10, 20),
    distance: Distance = "squared_l2",
    chunk_size: int = 1024,
    clustering: bool = True,
) -> dict[str, float]:
    """Recall@K, Precision@1, R-Precision and MAP@R of an embedding (and NMI / AMI).

    Two settings:

    - ``gallery_embeddings is None``: leave-one-out inside the query set (each query
      is searched among all *other* queries).
    - otherwise: queries against a separate gallery (e.g. street photos -> catalog).

    Args:
        query_embeddings: ``[Q, D]``.
        query_labels: ``[Q]`` (ints or strings; items with the same label match).
        gallery_embeddings: ``[N, D]`` or ``None`` (leave-one-out).
        gallery_labels: ``[N]``; required iff ``gallery_embeddings`` is given.
        ks: the ``k`` values of ``recall_at_k``; each must be ``<= N`` (``<= Q - 1``
            in leave-one-out).
        distance: ``"squared_l2"``, ``"l2"``, ``"cosine"`` or ``"dot"`` (the package's one
            vocabulary, aliases allowed: see :mod:`atl_keras.distances`); ``"l2"`` ranks
            exactly as ``"squared_l2"``.
        chunk_size: queries ranked per step (memory ``O(chunk_size * N)``).
        clustering: also ``nmi`` / ``ami`` of k-means on the query embeddings (seeded).

    Returns:
        ``{"recall_at_<k>": ..., "precision_at_1", "r_precision", "map_at_r",
        "num_queries", "num_queries_without_match"[, "nmi", "ami"]}`` as Python floats.
        ``num_queries`` counts the queries that enter the means (``R > 0``); the total
        is ``num_queries + num_queries_without_match``. Means are NaN when no query
        has a match.

    Example:
        >>> m = retrieval_metrics(street_emb, street_ids, catalog_emb, catalog_ids)
        >>> m["recall_at_1"], m["map_at_r"]
    """
    ks = _check_ks(ks)
    distance = _ranking_distance(distance)
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError(
            "Pass both `gallery_embeddings` and `gallery_labels` (query -> gallery "
            "retrieval) or neither (leave-one-out inside the query set)."
        )
    leave_one_out = gallery_embeddings is None
    query_labels = _as_labels(query_labels, "query_labels")
    if leave_one_out:
        gallery_embeddings, gallery_labels = query_embeddings, query_labels
    else:
        gallery_labels = _as_labels(gallery_labels, "gallery_labels")
    if _num_rows(query_embeddings) != query_labels.shape[0]:
        raise ValueError(
            f"query_embeddings has {_num_rows(query_embeddings)} rows but query_labels has "
            f"{query_labels.shape[0]} entries; they must match."
        )
    if _num_rows(gallery_embeddings) != gallery_labels.shape[0]:
        raise ValueError(
            f"gallery_embeddings has {_num_rows(gallery_embeddings)} rows but gallery_labels "
            f"has {gallery_labels.shape[0]} entries; they must match."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer; got {chunk_size!r}.")

    num_gallery = gallery_labels.shape[0]
    num_candidates = num_gallery - 1 if leave_one_out else num_gallery
    if ks[-1] > num_candidates:
        where = "other queries (leave-one-out)" if leave_one_out else "gallery items"
        raise ValueError(
            f"recall_at_{ks[-1]} needs at least {ks[-1]} {where}, but there are only "
            f"{num_candidates}. Use smaller `ks` or a larger evaluation set."
        )

    searcher = ExactSearcher(gallery_embeddings, distance=distance)
    matches = _match_counts(query_labels, gallery_labels)
    if leave_one_out:
        matches -= 1
    num_queries = query_labels.shape[0]
    query_matrix = np.asarray(query_embeddings, dtype=np.float32)

    hits = {k: 0.0 for k in ks}
    p_at_1 = r_prec = map_r = 0.0
    for start in range(0, num_queries, int(chunk_size)):
        stop = min(start + int(chunk_size), num_queries)
        r = matches[start:stop]  # [c]
        valid = r > 0
        if not np.any(valid):
            continue
        depth = int(min(max(ks[-1], int(r.max())), num_candidates))
        exclude = np.arange(start, stop) if leave_one_out else None
        indices, _ = searcher.search(query_matrix[start:stop], depth, chunk_size=stop - start, exclude=exclude)
        rel = gallery_labels[indices] == query_labels[start:stop, None]  # [c, depth] bool
        rel, r = rel[valid], r[valid]
        for k in ks:
            hits[k] += float(np.sum(np.any(rel[:, :k], axis=1)))
        p_at_1 += float(np.sum(rel[:, 0]))
        in_top_r = rel & (np.arange(depth)[None, :] < r[:, None])  # rel(i) for i <= R
        relevant_in_r = np.sum(in_top_r, axis=1, dtype=np.float64)
        r_prec += float(np.sum(relevant_in_r / r))
        precision_at_i = np.cumsum(in_top_r, axis=1, dtype=np.float64) / np.arange(1, depth + 1)[None, :]
        map_r += float(np.sum(np.sum(precision_at_i * in_top_r, axis=1) / r))

    evaluated = int(np.count_nonzero(matches > 0))

    def mean(total: float) -> float:
        return total / evaluated if evaluated else math.nan

    result = {f"recall_at_{k}": mean(hits[k]) for k in ks}
    result.update(
        precision_at_1=mean(p_at_1),
        r_precision=mean(r_prec),
        map_at_r=mean(map_r),
        num_queries=float(evaluated),
        num_queries_without_match=float(num_queries - evaluated),
    )
    if clustering and num_queries > 0:
        result.update(clustering_metrics(query_matrix, query_labels))
    return result


def format_metrics_table(metrics: dict[str, float], precision: int = 4) -> str:
    """A two-column text table of a metrics dict (for CLIs and tools; never prints).

    Example:
        >>> print(format_metrics_table(retrieval_metrics(x, y)))
    """
    if not metrics:
        return "(no metrics)"
    width = max(len("metric"), *(len(name) for name in metrics))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * (precision + 2)}"]
    for name, value in metrics.items():
        is_count = name.startswith("num_") or name.endswith(_COUNT_KEYS)
        if is_count and float(value).is_integer():
            text = f"{int(value)}"
        else:
            text = f"{float(value):.{precision}f}"
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


class RetrievalEvaluation(keras.callbacks.Callback):
    """Computes :func:`retrieval_metrics` at the end of epochs and writes them to ``logs``.

    Every ``every_n_epochs`` epochs (and on the last epoch of ``fit``) the model embeds
    the query (and gallery) images with ``model.predict`` and the metrics are written
    into ``logs`` as ``f"{prefix}{name}"`` (``val_recall_at_1``, ``val_map_at_r``, ...),
    so ``History``, ``EarlyStopping``, ``ModelCheckpoint`` and ``TensorBoard`` see them;
    the query counts (``num_queries``, ...) are not metrics and stay in ``last_metrics``.

    **Order matters**: put this callback *before* the callbacks that read its keys in
    ``callbacks=[...]`` (Keras calls them in list order; ``History`` and the progress
    bar are added last by Keras and always see them). Keras cannot infer the direction
    of these metrics, so monitor them with ``mode="max"``::

        eval_cb = RetrievalEvaluation(val_images, val_labels)
        stop = keras.callbacks.EarlyStopping(monitor="val_recall_at_1", mode="max")
        model.fit(train_ds, epochs=20, callbacks=[eval_cb, stop])

    Args:
        query_images: ``[Q, ...]`` numpy array, or a ``tf.data.Dataset`` yielding
            *batches* of images (deterministic order; no shuffling).
        query_labels: ``[Q]`` labels.
        gallery_images, gallery_labels: a separate gallery (``[N, ...]`` / ``[N]``),
            or ``None`` for leave-one-out inside the query set.
        ks, distance: as in :func:`retrieval_metrics`.
        every_n_epochs: evaluate when ``(epoch + 1) % every_n_epochs == 0``.
        batch_size: ``predict`` batch size for numpy inputs.
        prefix: prepended to every key written to ``logs``.
        output_key: if the model returns a dict or list, the key/index of the embedding
            output (``[batch, D]``).
        chunk_size: queries ranked per step (memory ``O(chunk_size * N)``).
        clustering: also write ``nmi`` / ``ami`` (k-means on the query embeddings).

    Attributes:
        last_metrics: the unprefixed metrics dict of the last evaluation (or ``None``).
        last_epoch: the 0-based epoch of the last evaluation (or ``None``).
    """

    def __init__(
        self,
        query_images: Any,
        query_labels: Any,
        gallery_images: Any = None,
        gallery_labels: Any = None,
        ks: Sequence[int] = (1, 10, 20),
        every_n_epochs: int = 1,
        batch_size: int = 256,
        prefix: str = "val_",
        distance: Distance = "squared_l2",
        output_key: str | int | None = None,
        chunk_size: int = 1024,
        clustering: bool = True,
    ) -> None:
        super().__init__()
        if (gallery_images is None) != (gallery_labels is None):
            raise ValueError(
                "Pass both `gallery_images` and `gallery_labels`, or neither "
                "(leave-one-out inside the query set)."
            )
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be a positive integer; got {every_n_epochs!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
        distance = resolve_distance(distance, RANKING_DISTANCES)
        self.ks = _check_ks(ks)
        self.query_images = query_images
        self.query_labels = _as_labels(query_labels, "query_labels")
        self.gallery_images = gallery_images
        self.gallery_labels = None if gallery_labels is None else _as_labels(gallery_labels, "gallery_labels")
        for images, labels, name in (
            (query_images, self.query_labels, "query"),
            (gallery_images, self.gallery_labels, "gallery"),
        ):
            if images is not None and not isinstance(images, tf.data.Dataset):
                if _num_rows(images) != labels.shape[0]:
                    raise ValueError(
                        f"{name}_images has {_num_rows(images)} rows but {name}_labels has "
                        f"{labels.shape[0]}; they must match."
                    )
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.prefix = prefix
        self.distance = distance
        self.output_key = output_key
        self.chunk_size = chunk_size
        self.clustering = clustering
        self.last_metrics: dict[str, float] | None = None
        self.last_epoch: int | None = None

    def _forward(self) -> Any:
        """``pixels -> embeddings`` of ``self.model`` (its ``output_key`` output), traced once per model."""
        if getattr(self, "_traced", (None, None))[0] is not self.model:
            model, key = self.model, self.output_key

            def forward(pixels):
                outputs = model(pixels, training=False)
                if isinstance(outputs, (dict, list, tuple)):
                    if key is None:
                        keys = list(outputs.keys()) if isinstance(outputs, dict) else list(range(len(outputs)))
                        raise ValueError(
                            f"The model returns several outputs ({keys}); pass "
                            "`output_key=` to RetrievalEvaluation to pick the embedding output."
                        )
                    outputs = outputs[key]
                return outputs

            self._traced = (model, tf.function(forward, reduce_retracing=True))
        return self._traced[1]

    def _embed(self, images: Any, expected_rows: int, name: str) -> np.ndarray:
        """Embeds ``images`` (pixels, image files or a dataset; `atl_keras.embedding`) -> ``[n, D]`` float32."""
        from atl_keras.embedding import embed_images
        from atl_keras.preprocessing import Preprocessing

        try:
            preprocessing = Preprocessing.for_model(self.model)
        except (AttributeError, TypeError, ValueError):
            preprocessing = None  # a model without a fixed input size: pixels are passed as they are
        embeddings = embed_images(self._forward(), images, preprocessing=preprocessing,
                                  batch_size=self.batch_size, strict=True).vectors
        if embeddings.ndim != 2:
            raise ValueError(
                f"Expected {name} embeddings of shape [num_images, dim] from the model; got "
                f"shape {embeddings.shape}. The evaluated model must output flat embeddings."
            )
        if embeddings.shape[0] != expected_rows:
            raise ValueError(
                f"The model produced {embeddings.shape[0]} {name} embeddings but there are "
                f"{expected_rows} {name} labels. A tf.data input must yield every image once, "
                "in a fixed order, batched without drop_remainder."
            )
        return embeddings

    def evaluate(self) -> dict[str, float]:
        """Embeds the evaluation images with the current model and returns the metrics."""
        if self.model is None:
            raise ValueError("RetrievalEvaluation has no model; use it in `fit` or call `set_model` first.")
        queries = self._embed(self.query_images, self.query_labels.shape[0], "query")
        gallery = None
        if self.gallery_images is not None:
            gallery = self._embed(self.gallery_images, self.gallery_labels.shape[0], "gallery")
        return retrieval_metrics(
            queries,
            self.query_labels,
            gallery,
            self.gallery_labels,
            ks=self.ks,
            distance=self.distance,
            chunk_size=self.chunk_size,
            clustering=self.clustering,
        )

    def _should_evaluate(self, epoch: int) -> bool:
        total = (self.params or {}).get("epochs")
        is_last = total is not None and epoch + 1 == total
        return is_last or (epoch + 1) % self.every_n_epochs == 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self._should_evaluate(epoch):
            return
        metrics = self.evaluate()
        self.last_metrics = metrics
        self.last_epoch = epoch
        if logs is not None:  # metrics only: the query counts stay in `last_metrics`
            logs.update({f"{self.prefix}{name}": value for name, value in metrics.items()
                         if name not in _COUNT_KEYS})

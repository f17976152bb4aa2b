"""Exact (brute-force) k-nearest-neighbour search, processed in query chunks.

The reference search of the package: the ScaNN exporter uses it as the exact fallback
and as ground truth for ScaNN recall, and :mod:`atl_keras.metrics` ranks with it.

Memory is ``O(chunk_size * N)``: queries are processed ``chunk_size`` rows at a time,
each chunk's distances to the whole gallery are computed with one matmul and reduced
with ``tf.math.top_k`` in a ``tf.function`` traced once per process and reused across
chunks (and across calls).

Ordering contract
-----------------
Results are sorted by increasing distance; **ties are broken by the lower gallery
index first** (``tf.math.top_k`` keeps the lower index first among equal values).
Exact duplicate gallery rows are guaranteed to be *exactly* tied: the gallery is
de-duplicated before the matmul and each distance is computed once per distinct row,
so BLAS kernel choices can never split a tie by one ulp.

Distances (``distance=``)
-------------------------
- ``"squared_l2"``: ``|q|^2 + |g|^2 - 2 q.g`` (evaluated as ``-min(2 q.g - |g|^2 - |q|^2, 0)``,
  the same float operations for every pair), clamped at 0.
- ``"cosine"``: ``1 - q_hat.g_hat`` on L2-normalised rows (zero rows stay zero, so a
  zero vector is at distance 1 from everything), clamped to ``[0, 2]``.
- ``"dot"``: the *negative* inner product ``-q.g`` (so that smaller is closer, as for
  the other distances; the maximum-inner-product neighbours come first).

All computation is float32. A query's distances can differ in the last ulp between
chunk sizes (BLAS picks other kernels for other matrix shapes); exact ties never split.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import tensorflow as tf

Distance = Literal["squared_l2", "cosine", "dot"]
DISTANCES: tuple[str, ...] = ("squared_l2", "cosine", "dot")

__all__ = ["DISTANCES", "Distance", "ExactSearcher", "exact_search"]


def _check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(
            f"Unknown distance {distance!r}; expected one of {DISTANCES}."
        )
    return distance


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """Converts ``x`` to a C-contiguous float32 array ``[n, dim]`` and validates it."""
    if isinstance(x, tf.Tensor):
        x = x.numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D array [num_rows, dim]; got shape {arr.shape}. "
            "Reshape single vectors to [1, dim]."
        )
    if arr.shape[1] == 0:
        raise ValueError(f"`{name}` has embedding dimension 0; expected dim >= 1.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr).all(axis=1)))
        raise ValueError(
            f"`{name}` contains NaN or Inf in {bad} row(s); exact search needs "
            "finite embeddings (check the model for diverging training)."
        )
    # -0.0 -> +0.0 so that byte-level de-duplication sees numerically equal rows.
    return arr + np.float32(0.0)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation ``[n, dim] -> [n, dim]``; zero rows stay zero."""
    norms = np.sqrt(np.sum(x * x, axis=1, keepdims=True, dtype=np.float32))
    return (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Distinct rows of ``x`` and the inverse map (``None`` when all rows are distinct).

    Returns ``(unique [u, dim], inverse [n] int32)`` with ``x == unique[inverse]``.
    """
    if x.shape[0] < 2:
        return x, None
    # Fast exact pre-check: equal rows have equal integer hashes (wrap-around uint64
    # arithmetic on the float bits), so distinct hashes prove distinct rows.
    weights = np.random.default_rng(0).integers(1, 2**63, size=x.shape[1], dtype=np.uint64) | np.uint64(1)
    bits = x.view(np.uint32)
    hashes = np.empty(x.shape[0], np.uint64)
    for start in range(0, x.shape[0], 4096):
        block = bits[start : start + 4096].astype(np.uint64)
        hashes[start : start + 4096] = np.sum(block * weights, axis=1, dtype=np.uint64)
    if np.unique(hashes).shape[0] == x.shape[0]:
        return x, None
    rows = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1])))
    _, first, inverse = np.unique(rows.ravel(), return_index=True, return_inverse=True)
    if first.shape[0] == x.shape[0]:
        return x, None
    return x[first], inverse.reshape(-1).astype(np.int32)


_CHUNK_FNS: dict[tuple[str, bool, bool], Any] = {}


def _chunk_top_k_fn(distance: str, deduplicated: bool, with_exclude: bool):
    """A ``tf.function`` ranking one query chunk against the gallery (cached per process).

    Arguments of the returned function: ``queries [c, dim]`` (already normalised for
    cosine), ``gallery [u, dim]`` (distinct rows), ``gallery_sq_norms [u]``,
    ``k`` (int32 scalar), ``inverse [n]`` int32 (gallery row -> distinct row),
    ``exclude [c]`` int32 (gallery index removed per query, -1 for none).
    Returns ``(indices [c, k] int64, distances [c, k] float32)``.
    """
    key = (distance, deduplicated, with_exclude)
    if key in _CHUNK_FNS:
        return _CHUNK_FNS[key]

    spec = [
        tf.TensorSpec([None, None], tf.float32),
        tf.TensorSpec([None, None], tf.float32),
        tf.TensorSpec([None], tf.float32),
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None], tf.int32),
    ]

    @tf.function(input_signature=spec)
    def chunk_top_k(queries, gallery, gallery_sq_norms, k, inverse, exclude):
        # Scores are negated distances, built with as few [c, u] passes as possible.
        products = tf.matmul(queries, gallery, transpose_b=True)  # [c, u]
        if distance == "squared_l2":
            # `gallery` holds 2 * g (exact in float32): products = 2 q.g.
            query_sq = tf.reduce_sum(tf.square(queries), axis=1, keepdims=True)
            scores = tf.minimum(products - gallery_sq_norms[tf.newaxis, :] - query_sq, 0.0)
        elif distance == "cosine":
            scores = tf.clip_by_value(products - 1.0, -2.0, 0.0)
        else:  # dot
            scores = products
        if deduplicated:
            scores = tf.gather(scores, inverse, axis=1)  # [c, n]
        if with_exclude:
            rows = tf.where(exclude >= 0)[:, 0]
            cols = tf.cast(tf.gather(exclude, rows), tf.int64)
            fill = tf.fill(tf.shape(rows), tf.constant(-np.inf, tf.float32))
            scores = tf.tensor_scatter_nd_update(scores, tf.stack([rows, cols], axis=1), fill)
        # top_k: among equal scores the lower index comes first (documented TF contract).
        values, indices = tf.math.top_k(scores, k=k, sorted=True)
        return tf.cast(indices, tf.int64), 0.0 - values  # 0.0 - x: never -0.0

    _CHUNK_FNS[key] = chunk_top_k
    return chunk_top_k


class ExactSearcher:
    """Brute-force nearest-neighbour index over a fixed gallery.

    Holds the prepared gallery (float32, normalised for cosine, de-duplicated, squared
    norms) so that repeated searches do not redo that work.

    Args:
        gallery: ``[N, D]`` embeddings (numpy, tensor or nested lists).
        distance: ``"squared_l2"`` (default), ``"cosine"`` or ``"dot"`` (negative inner
            product); see the module docstring.

    Example:
        >>> searcher = ExactSearcher(gallery_embeddings, distance="cosine")
        >>> indices, distances = searcher.search(query_embeddings, k=10)
    """

    def __init__(self, gallery: Any, distance: Distance = "squared_l2") -> None:
        self.distance = _check_distance(distance)
        gallery = _as_matrix(gallery, "gallery")
        if self.distance == "cosine":
            gallery = _l2_normalize(gallery)
        self.num_items, self.dim = gallery.shape
        unique, inverse = _unique_rows(gallery)
        self.num_distinct = int(unique.shape[0])
        # squared_l2 multiplies 2 * g once here instead of 2 * (q.g) per chunk.
        self._gallery = tf.constant(unique * np.float32(2.0) if self.distance == "squared_l2" else unique)
        self._sq_norms = tf.constant(np.sum(unique * unique, axis=1, dtype=np.float32))
        self._inverse = None if inverse is None else tf.constant(inverse)

    def search(
        self,
        queries: Any,
        k: int,
        chunk_size: int = 1024,
        exclude: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest gallery items of every query.

        Args:
            queries: ``[Q, D]`` embeddings.
            k: neighbours per query, ``1 <= k <= N`` (``k <= N - 1`` when ``exclude``
                removes an item).
            chunk_size: queries ranked per step; peak memory is about
                ``chunk_size * N * 12`` bytes.
            exclude: optional ``[Q]`` int gallery index to drop from each query's
                results (``-1``: drop nothing), e.g. ``arange(Q)`` for leave-one-out.

        Returns:
            ``(indices [Q, k] int64, distances [Q, k] float32)`` sorted by increasing
            distance, ties by increasing gallery index.
        """
        queries = _as_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"Dimension mismatch: queries have dim {queries.shape[1]} but the "
                f"gallery has dim {self.dim}. Embed both with the same model."
            )
        num_queries = queries.shape[0]
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive integer; got {chunk_size!r}.")
        exclude_arr = None
        if exclude is not None:
            exclude_arr = np.asarray(exclude)
            if exclude_arr.shape != (num_queries,) or not np.issubdtype(exclude_arr.dtype, np.integer):
                raise ValueError(
                    f"`exclude` must be an integer array of shape [{num_queries}] (one "
                    f"gallery index per query, -1 for none); got shape {exclude_arr.shape} "
                    f"and dtype {exclude_arr.dtype}."
                )
            if np.any((exclude_arr < -1) | (exclude_arr >= self.num_items)):
                raise ValueError(
                    f"`exclude` values must be in [-1, {self.num_items - 1}] (gallery "
                    "indices, -1 for none)."
                )
            exclude_arr = exclude_arr.astype(np.int32)
        excludes_something = exclude_arr is not None and bool(np.any(exclude_arr >= 0))
        limit = self.num_items - 1 if excludes_something else self.num_items
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`k` must be a positive integer; got {k!r}.")
        if k > limit:
            detail = " after excluding each query's own item (leave-one-out)" if excludes_something else ""
            raise ValueError(
                f"k={k} is larger than the {limit} gallery items available{detail}. "
                f"Use k <= {limit} or a larger gallery."
            )
        k = int(k)
        if num_queries == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if self.distance == "cosine":
            queries = _l2_normalize(queries)

        fn = _chunk_top_k_fn(self.distance, self._inverse is not None, excludes_something)
        inverse = self._inverse if self._inverse is not None else tf.zeros([0], tf.int32)
        no_exclude = tf.zeros([0], tf.int32)
        k_t = tf.constant(k, tf.int32)
        indices = np.empty((num_queries, k), np.int64)
        distances = np.empty((num_queries, k), np.float32)
        for start in range(0, num_queries, int(chunk_size)):
            stop = min(start + int(chunk_size), num_queries)
            chunk_exclude = tf.constant(exclude_arr[start:stop]) if excludes_something else no_exclude
            idx, dist = fn(
                tf.constant(queries[start:stop]),
                self._gallery,
                self._sq_norms,
                k_t,
                inverse,
                chunk_exclude,
            )
            indices[start:stop] = idx.numpy()
            distances[start:stop] = dist.numpy()
        return indices, distances


def exact_search(
    queries: Any,
    gallery: Any,
    k: int,
    distance: Distance = "squared_l2",
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-nearest-neighbour search of ``queries`` in ``gallery``.

    Args:
        queries: ``[Q, D]`` embeddings.
        gallery: ``[N, D]`` embeddings.
        k: neighbours per query, ``1 <= k <= N`` (``<= N - 1`` with ``exclude_self``).
        distance: ``"squared_l2"``, ``"cosine"`` or ``"dot"`` (negative inner product).
        chunk_size: queries per step; memory is ``O(chunk_size * N)``, never ``Q * N``.
        exclude_self: leave-one-out; requires ``queries`` and ``gallery`` to be the same
            set (same object or equal arrays). Query ``i``'s own gallery item ``i`` is
            removed from its results; *other* exact duplicates of it stay.

    Returns:
        ``(indices [Q, k] int64, distances [Q, k] float32)``, increasing distance, ties
        broken by the lower gallery index first.

    Example:
        >>> idx, dist = exact_search(x, x, k=5, exclude_self=True)
    """
    searcher = ExactSearcher(gallery, distance=distance)
    exclude = None
    if exclude_self:
        if queries is not gallery:
            q = _as_matrix(queries, "queries")
            g = _as_matrix(gallery, "gallery")
            if q.shape != g.shape or not np.array_equal(q, g):
                raise ValueError(
                    "exclude_self=True means leave-one-out inside one set: pass the same "
                    f"array as `queries` and `gallery` (got shapes {q.shape} and {g.shape}"
                    " with different contents)."
                )
        exclude = np.arange(searcher.num_items, dtype=np.int64)
    return searcher.search(queries, k, chunk_size=chunk_size, exclude=exclude)

"""Exact (brute-force) k-nearest-neighbour search: the package's one exact top-k.

Every exact search of the package is this one: :mod:`atl_keras.metrics` ranks with it,
the ScaNN tuning measures recall against it (`atl_keras.index.exact_neighbors`), and the
export's ``retrieve_exact`` signature runs the same TensorFlow function
(`score_top_k`) on the same gallery rows, so Python and serving agree.

Memory is ``O(chunk_size * N)``: queries are processed ``chunk_size`` rows at a time,
each chunk's distances to the whole gallery are computed with one matmul and reduced
with ``tf.math.top_k`` in a ``tf.function`` traced once per process and reused across
chunks (and across calls).

Ordering contract
-----------------
Results are sorted by decreasing score (increasing distance); **ties are broken by the
lower gallery position first** (``tf.math.top_k`` keeps the lower index first among equal
values). Exact duplicate gallery rows are guaranteed to be *exactly* tied: each row takes
the score of its first copy (``representative``), so BLAS kernel choices can never split
a tie by one ulp.

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

__all__ = ["DISTANCES", "Distance", "ExactSearcher", "ExactState", "exact_search", "representative_rows", "score_top_k"]


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


def representative_rows(x: np.ndarray) -> np.ndarray | None:
    """``[n]`` int32: the first row equal to each row of ``x`` (``None`` when all rows differ).

    Scoring every row as its representative makes exact duplicates exactly tied.
    """
    if x.shape[0] < 2:
        return None
    # Fast exact pre-check: equal rows have equal integer hashes (wrap-around uint64
    # arithmetic on the float bits), so distinct hashes prove distinct rows.
    weights = np.random.default_rng(0).integers(1, 2**63, size=x.shape[1], dtype=np.uint64) | np.uint64(1)
    bits = np.ascontiguousarray(x).view(np.uint32)
    hashes = np.empty(x.shape[0], np.uint64)
    for start in range(0, x.shape[0], 4096):
        block = bits[start : start + 4096].astype(np.uint64)
        hashes[start : start + 4096] = np.sum(block * weights, axis=1, dtype=np.uint64)
    if np.unique(hashes).shape[0] == x.shape[0]:
        return None
    rows = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1])))
    _, first, inverse = np.unique(rows.ravel(), return_index=True, return_inverse=True)
    if first.shape[0] == x.shape[0]:
        return None
    return first[inverse.reshape(-1)].astype(np.int32)


def score_top_k(
    queries: tf.Tensor,
    rows: tf.Tensor,
    k: tf.Tensor,
    distance: str = "dot",
    sq_norms: tf.Tensor | None = None,
    representative: tf.Tensor | None = None,
    exclude: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The exact top-k as TensorFlow ops (eager, in a ``tf.function`` or a SavedModel signature).

    Args:
        queries: ``[c, D]`` float32 (L2-normalised for cosine).
        rows: ``[N, D]`` the prepared gallery (``2 * g`` for squared_l2, unit rows for cosine).
        k: int32 scalar.
        sq_norms: ``[N]`` ``|g|^2`` (squared_l2 only).
        representative: ``[N]`` int32 first copy of each row, or None (no duplicates).
        exclude: ``[c]`` int32 gallery row removed per query (-1: none), or None.

    Returns:
        ``(indices [c, k] int64, scores [c, k] float32)``, best first, ties by lower row;
        ``score = -distance`` (``dot``: the inner product).
    """
    products = tf.matmul(queries, rows, transpose_b=True)  # [c, N]
    if distance == "squared_l2":
        # `rows` holds 2 * g (exact in float32): products = 2 q.g.
        query_sq = tf.reduce_sum(tf.square(queries), axis=1, keepdims=True)
        scores = tf.minimum(products - sq_norms[tf.newaxis, :] - query_sq, 0.0)
    elif distance == "cosine":
        scores = tf.clip_by_value(products - 1.0, -2.0, 0.0)
    else:  # dot
        scores = products
    if representative is not None:
        scores = tf.gather(scores, representative, axis=1)
    if exclude is not None:
        picked = tf.where(exclude >= 0)[:, 0]
        cols = tf.cast(tf.gather(exclude, picked), tf.int64)
        fill = tf.fill(tf.shape(picked), tf.constant(-np.inf, tf.float32))
        scores = tf.tensor_scatter_nd_update(scores, tf.stack([picked, cols], axis=1), fill)
    # top_k: among equal scores the lower index comes first (documented TF contract).
    values, indices = tf.math.top_k(scores, k=k, sorted=True)
    return tf.cast(indices, tf.int64), values


_CHUNK_FNS: dict[tuple[str, bool, bool], Any] = {}


def _chunk_top_k_fn(distance: str, deduplicated: bool, with_exclude: bool):
    """`score_top_k` as a ``tf.function`` for one query chunk (traced once per process).

    Arguments: ``queries [c, dim]``, ``rows [n, dim]``, ``sq_norms [n]``, ``k`` (int32
    scalar), ``representative [n]`` int32, ``exclude [c]`` int32.
    Returns ``(indices [c, k] int64, scores [c, k] float32)``.
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
    def chunk_top_k(queries, rows, sq_norms, k, representative, exclude):
        return score_top_k(
            queries, rows, k, distance, sq_norms,
            representative if deduplicated else None, exclude if with_exclude else None,
        )

    _CHUNK_FNS[key] = chunk_top_k
    return chunk_top_k


class ExactState(tf.Module):
    """An exact searcher's gallery as SavedModel state: ``rows`` [N, D] and ``representative``.

    ``rows_from`` (a module with a ``dataset`` variable ``[N, D]``, e.g. a ScaNN state that
    keeps the float rows) shares those rows instead of storing a second copy.
    """

    def __init__(self, gallery: np.ndarray, rows_from: tf.Module | None = None) -> None:
        super().__init__(name="exact_state")
        self.dim = int(gallery.shape[1])
        if rows_from is not None:
            self.rows_from = rows_from
        else:
            self.gallery = tf.Variable(np.asarray(gallery, np.float32), trainable=False, name="gallery")
        representative = representative_rows(np.asarray(gallery, np.float32))
        self.has_representative = representative is not None
        if representative is not None:
            self.representative = tf.Variable(representative, trainable=False, name="representative")

    def rows(self) -> tf.Tensor:
        if hasattr(self, "rows_from"):
            return tf.reshape(self.rows_from.dataset, [-1, self.dim])
        return self.gallery

    def top_k(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Graph search: ``queries [B, D]``, ``k`` -> ``(indices [B, k] int64, scores [B, k])``."""
        representative = self.representative if self.has_representative else None
        return score_top_k(queries, self.rows(), k, "dot", representative=representative)


def loaded_exact_rows(state: Any) -> np.ndarray:
    """The gallery rows ``[N, D]`` of an `ExactState` restored by ``tf.saved_model.load``."""
    if hasattr(state, "rows_from"):
        rows = state.rows_from.dataset.numpy()
    else:
        rows = state.gallery.numpy()
    return np.asarray(rows, np.float32)


class ExactSearcher:
    """Brute-force nearest-neighbour index over a fixed gallery (the exact `Searcher`).

    Holds the prepared gallery (float32, normalised for cosine, squared norms, the first
    copy of each duplicate row) so that repeated searches do not redo that work.

    Args:
        gallery: ``[N, D]`` embeddings (numpy, tensor or nested lists).
        distance: ``"squared_l2"`` (default), ``"cosine"`` or ``"dot"`` (negative inner
            product); see the module docstring. The `Searcher` methods (`top_k`,
            `to_state`) score by dot product, as the export does.

    Example:
        >>> searcher = ExactSearcher(gallery_embeddings, distance="cosine")
        >>> indices, distances = searcher.search(query_embeddings, k=10)
        >>> indices, scores = ExactSearcher.build(gallery_embeddings).top_k(query_embeddings, 10)
    """

    kind = "exact"

    def __init__(self, gallery: Any, distance: Distance = "squared_l2") -> None:
        self.distance = _check_distance(distance)
        gallery = _as_matrix(gallery, "gallery")
        if self.distance == "cosine":
            gallery = _l2_normalize(gallery)
        self.num_items, self.dim = gallery.shape
        representative = representative_rows(gallery)
        self.num_distinct = self.num_items if representative is None else int(np.unique(representative).shape[0])
        self._embeddings = gallery
        # squared_l2 multiplies 2 * g once here instead of 2 * (q.g) per chunk.
        self._rows = tf.constant(gallery * np.float32(2.0) if self.distance == "squared_l2" else gallery)
        self._sq_norms = tf.constant(np.sum(gallery * gallery, axis=1, dtype=np.float32))
        self._representative = None if representative is None else tf.constant(representative)

    # ------------------------------------------------------------------ Searcher protocol
    @classmethod
    def build(cls, embeddings: Any, **options: Any) -> "ExactSearcher":
        """The exact searcher over ``embeddings [N, D]`` scored by dot product."""
        if options:
            raise ValueError(f"The exact searcher takes no options; got {sorted(options)}.")
        return cls(embeddings, distance="dot")

    @property
    def embeddings(self) -> np.ndarray:
        """The gallery rows ``[N, D]`` (normalised for cosine)."""
        return self._embeddings

    def top_k(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [Q, k] int64, scores [Q, k] float32)``, best first (score = -distance)."""
        indices, distances = self.search(queries, k)
        return indices, np.float32(0.0) - distances

    def to_state(self, rows_from: tf.Module | None = None) -> ExactState:
        return ExactState(self._embeddings, rows_from)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def state_top_k(self, state: Any, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return state.top_k(queries, k)

    @classmethod
    def from_state(cls, state: Any, embeddings: np.ndarray, config: dict[str, Any]) -> "ExactSearcher":
        return cls.build(embeddings)

    # ------------------------------------------------------------------ distances
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

        fn = _chunk_top_k_fn(self.distance, self._representative is not None, excludes_something)
        representative = self._representative if self._representative is not None else tf.zeros([0], tf.int32)
        no_exclude = tf.zeros([0], tf.int32)
        k_t = tf.constant(k, tf.int32)
        indices = np.empty((num_queries, k), np.int64)
        distances = np.empty((num_queries, k), np.float32)
        for start in range(0, num_queries, int(chunk_size)):
            stop = min(start + int(chunk_size), num_queries)
            chunk_exclude = tf.constant(exclude_arr[start:stop]) if excludes_something else no_exclude
            idx, scores = fn(
                tf.constant(queries[start:stop]),
                self._rows,
                self._sq_norms,
                k_t,
                representative,
                chunk_exclude,
            )
            indices[start:stop] = idx.numpy()
            distances[start:stop] = 0.0 - scores.numpy()  # 0.0 - x: never -0.0
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

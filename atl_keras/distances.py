"""Pairwise distances between embeddings, written with `keras.ops` only.

One vocabulary of distance names serves the whole package (losses, metrics,
search); `resolve_distance` maps aliases to it and rejects unknown names:

- ``"squared_l2"``: ``||u - v||^2`` (in ``[0, 4]`` for unit vectors),
- ``"l2"``: ``||u - v||`` (in ``[0, 2]``),
- ``"cosine"``: ``1 - cos(u, v)`` (in ``[0, 2]``; inputs are normalised inside),
- ``"dot"``: ``-u.v``, for ranking only (retrieval metrics and search): it is
  unbounded and not zero at ``u = v``, so the losses refuse it (on unit
  vectors ``"cosine"`` = ``1 + dot`` orders pairs identically).

`pairwise_distances` and the losses accept the first three (`DISTANCES`), the
retrieval metrics all four (`RANKING_DISTANCES`).

All of them use the Gram-matrix form (one ``[B, D] x [D, B2]`` matmul), are
clamped to be non-negative and, for a distance matrix of a batch with itself,
have an exact zero diagonal. ``"l2"`` is gradient safe at zero distance: the
square root is only taken where the squared distance is positive, so
duplicated embeddings give finite (zero) gradients instead of NaN/Inf.

Example:

>>> import numpy as np
>>> x = np.eye(3, dtype="float32")
>>> pairwise_distances(x, distance="squared_l2")  # 2.0 off the diagonal
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

DISTANCES: tuple[str, ...] = ("squared_l2", "l2", "cosine")
"""Distances of `pairwise_distances` and the losses (bounded on the unit sphere)."""

RANKING_DISTANCES: tuple[str, ...] = ("squared_l2", "l2", "cosine", "dot")
"""Distances the retrieval metrics and search rank by (``"dot"``: ``-u.v``)."""

DISTANCE_ALIASES: dict[str, str] = {
    "sqeuclidean": "squared_l2",
    "squared_euclidean": "squared_l2",
    "l2_squared": "squared_l2",
    "euclidean": "l2",
    "cosine_distance": "cosine",
    "dot_product": "dot",
    "inner_product": "dot",
}

_MAX_DISTANCE: dict[str, float] = {"squared_l2": 4.0, "l2": 2.0, "cosine": 2.0}

# Below this squared distance, `l2` returns exactly 0 with a zero gradient.
_SQRT_EPSILON = 1e-16
# Norms below sqrt(this) are treated as zero vectors by `l2_normalize`.
_NORM_EPSILON = 1e-12


def resolve_distance(distance: str, allowed: tuple[str, ...] = DISTANCES) -> str:
    """The canonical name of ``distance`` (aliases resolved) if it is in ``allowed``.

    Args:
        distance: a name of `RANKING_DISTANCES` or an alias (``"euclidean"``,
            ``"sqeuclidean"``, ``"cosine_distance"``, ``"dot_product"``, ...;
            case-insensitive).
        allowed: the names the caller supports.

    Raises:
        ValueError: unknown name (listing the valid ones), or ``"dot"`` where
            only true distances are allowed (saying what to use instead).
    """
    name = distance.strip().lower() if isinstance(distance, str) else distance
    name = DISTANCE_ALIASES.get(name, name)
    if name in allowed:
        return name
    valid = ", ".join(repr(d) for d in allowed)
    if name in RANKING_DISTANCES:  # "dot" where only distances are allowed
        raise ValueError(
            f"distance={distance!r} ranks neighbours but is not a distance the losses "
            f"can use (unbounded, not 0 at u == v). Valid distances here are: {valid}; "
            "on unit embeddings 'cosine' (= 1 + dot) orders pairs identically."
        )
    aliases = ", ".join(f"{a!r} -> {c!r}" for a, c in DISTANCE_ALIASES.items() if c in allowed)
    raise ValueError(
        f"Unknown distance {distance!r}. Valid distances are: {valid}"
        + (f" (aliases: {aliases})." if aliases else ".")
    )


def validate_distance(distance: str) -> str:
    """The canonical name of a distance of `DISTANCES` (see `resolve_distance`), else raise.

    Raises:
        ValueError: naming the valid choices.
    """
    return resolve_distance(distance, DISTANCES)


def max_distance(distance: str) -> float:
    """Largest value of ``distance`` between two unit vectors.

    4 for ``"squared_l2"``, 2 for ``"l2"`` and 2 for ``"cosine"``.
    """
    return _MAX_DISTANCE[validate_distance(distance)]


def compute_dtype(x: Any) -> str:
    """Float dtype the distance math runs in: float64 stays, anything else -> float32.

    Half precision (float16 / bfloat16, e.g. under a ``mixed_float16`` policy)
    is promoted to float32 because the Gram-matrix form cancels catastrophically
    in low precision.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return "float32"
    try:  # str(tf.float64) is "<dtype: 'float64'>": standardise, don't parse
        name = keras.backend.standardize_dtype(dtype)
    except ValueError:
        return "float32"
    return "float64" if name == "float64" else "float32"


def l2_normalize(x: Any, axis: int = -1) -> Any:
    """``x / ||x||`` along ``axis``; all-zero rows stay zero (no NaN).

    Args:
        x: ``[..., D]`` float tensor.

    Returns:
        Tensor of the same shape and dtype.
    """
    x = ops.convert_to_tensor(x)
    squared_norm = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared_norm, _NORM_EPSILON))


def _safe_sqrt(squared: Any) -> Any:
    """sqrt with a zero value *and zero gradient* where ``squared`` is ~0."""
    positive = ops.greater(squared, _SQRT_EPSILON)
    safe = ops.where(positive, squared, ops.ones_like(squared))
    return ops.where(positive, ops.sqrt(safe), ops.zeros_like(squared))


def pairwise_distances(x: Any, y: Any | None = None, distance: str = "squared_l2") -> Any:
    """Distances between every row of ``x`` and every row of ``y``.

    Args:
        x: ``[B, D]`` float tensor.
        y: ``[B2, D]`` float tensor, or ``None`` for ``y = x`` (then the
            diagonal is exactly zero).
        distance: ``"squared_l2"``, ``"l2"`` or ``"cosine"`` (or an alias).

    Returns:
        ``[B, B2]`` non-negative distances, float32 (float64 if ``x`` is
        float64; half-precision inputs are promoted to float32).

    Raises:
        ValueError: unknown ``distance`` or inputs that are not rank 2.
    """
    distance = validate_distance(distance)
    dtype = compute_dtype(x)
    x = ops.cast(ops.convert_to_tensor(x), dtype)
    same = y is None
    y = x if same else ops.cast(ops.convert_to_tensor(y), dtype)
    for name, t in (("x", x), ("y", y)):
        if len(t.shape) != 2:
            raise ValueError(
                f"pairwise_distances expects {name} of shape [batch, dim]; "
                f"got shape {tuple(t.shape)}. Reshape to 2-D first."
            )

    if distance == "cosine":
        x = l2_normalize(x)
        y = x if same else l2_normalize(y)
        gram = ops.matmul(x, ops.transpose(y))
        dist = ops.clip(1.0 - gram, 0.0, 2.0)
    else:
        gram = ops.matmul(x, ops.transpose(y))
        if same:
            # Norms from the Gram diagonal itself: exactly duplicated rows then
            # give exactly 0 (same summation order), not float32 round-off.
            sq_x = ops.diagonal(gram)
            sq_y = sq_x
        else:
            sq_x = ops.sum(ops.square(x), axis=1)
            sq_y = ops.sum(ops.square(y), axis=1)
        dist = ops.expand_dims(sq_x, 1) + ops.expand_dims(sq_y, 0) - 2.0 * gram
        dist = ops.maximum(dist, 0.0)

    if same:
        index = ops.arange(ops.shape(x)[0])
        diagonal = ops.equal(ops.expand_dims(index, 1), ops.expand_dims(index, 0))
        dist = ops.where(diagonal, ops.zeros_like(dist), dist)

    if distance == "l2":
        dist = _safe_sqrt(dist)
    return dist

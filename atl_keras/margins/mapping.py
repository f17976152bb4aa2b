"""The weak-label margin mapping: text distance -> margin, and the text distances themselves.

One implementation of each piece, used by every loss, margin source and report:

- `text_distances`: the distance between L2-normalised text embeddings from their cosine
  (``squared_l2``: ``2 - 2 cos``, ``l2``: its root, ``cosine``: ``1 - cos``), on numpy
  arrays or `keras.ops` tensors; `text_distance_table` is the ``[M, M]`` numpy table of a
  catalog (missing, all-zero texts give NaN).
- Mappings (`MAPPINGS`) from a text distance ``d`` to a margin:

  - ``linear`` (ATL's): ``m = min + (max - min) * d / d_max``, `linear_margins`; works on
    numpy arrays and tensors alike. ``min == max`` gives the constant margin exactly.
  - ``paper``: ``m = beta + d / (4 - beta)`` with ``beta = min_margin``, the seed paper's
    margin as a third-party re-implementation writes it. UNVERIFIED: the paper's method
    section is not available to us.
  - ``catalog``: the catalog's own distance quantiles ``[q_lo, q_hi]`` (default 1st-99th
    percentile of the training item pairs) stretched linearly onto ``[min, max]`` and
    clipped, so any encoder's margins spread over the whole range.

- `class_margin_matrix`: the ``linear`` mapping between all classes of a catalog (``[C, C]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from atl_keras.distances import max_distance, validate_distance
from atl_keras.margins.checks import validate_margin_range, validate_missing_text_margin

__all__ = [
    "MAPPINGS",
    "class_margin_matrix",
    "linear_margins",
    "map_distances",
    "text_distance_table",
    "text_distances",
    "unit_text_rows",
]

MAPPINGS = ("linear", "paper", "catalog")


def linear_margins(distances: Any, min_margin: float, max_margin: float, distance: str) -> Any:
    """ATL's mapping ``min + (max - min) * d / d_max`` (``d_max = max_distance(distance)``).

    Args:
        distances: text distances, any shape: a numpy array or a tensor (arithmetic only,
            so the result keeps the input's type and dtype).
        min_margin, max_margin: the validated range.
        distance: the text distance's name (gives ``d_max``).
    """
    scale = (float(max_margin) - float(min_margin)) / max_distance(distance)
    return float(min_margin) + scale * distances


def text_distances(cosine: Any, distance: str) -> Any:
    """Distance between unit vectors from their cosine: numpy array or `keras.ops` tensor."""
    if distance == "cosine":
        return 1.0 - cosine
    if isinstance(cosine, np.ndarray):
        squared = np.maximum(2.0 - 2.0 * cosine, 0.0)
        return np.sqrt(squared) if distance == "l2" else squared
    from keras import ops

    squared = ops.maximum(2.0 - 2.0 * cosine, 0.0)
    return ops.sqrt(squared) if distance == "l2" else squared


def unit_text_rows(text_embeddings: Any, name: str = "text_embeddings") -> tuple[np.ndarray, np.ndarray]:
    """``[M, T]`` -> (float64 unit rows, all-zero rows stay zero; bool ``[M]`` missing)."""
    g = np.asarray(text_embeddings, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape [items, text_dim], got {g.shape}; row i is the text "
            "embedding of item (class) i."
        )
    if not np.all(np.isfinite(g)):
        raise ValueError(f"{name} contains NaN or Inf; fix the text cache.")
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    return g / np.where(norms == 0, 1.0, norms), norms[:, 0] == 0


def text_distance_table(text_embeddings: Any, distance: str = "squared_l2") -> np.ndarray:
    """``[M, T]`` text embeddings -> ``[M, M]`` float64 distances of their L2-normalised rows.

    The definition the adaptive losses use; rows and columns of missing (all-zero) text are
    NaN, the diagonal is 0.
    """
    distance = validate_distance(distance)
    g, missing = unit_text_rows(text_embeddings)
    d = text_distances(np.clip(g @ g.T, -1.0, 1.0), distance)
    d[missing, :] = np.nan
    d[:, missing] = np.nan
    np.fill_diagonal(d, 0.0)
    return d


def map_distances(
    distances: np.ndarray,
    mapping: str = "linear",
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    distance: str = "squared_l2",
    reference: np.ndarray | None = None,
    quantiles: tuple[float, float] = (0.01, 0.99),
) -> np.ndarray:
    """Text distances (any shape) -> float64 margins of the same shape (see the module docstring).

    Args:
        distances: float array of text distances.
        mapping: ``"linear"``, ``"paper"`` or ``"catalog"``.
        min_margin, max_margin: the margin range (``paper`` uses ``min_margin`` as beta).
        distance: the text distance's name (gives ``d_max`` for ``linear``).
        reference: distances whose `quantiles` anchor the ``catalog`` mapping (the training
            catalog's item pairs); required for ``catalog``.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"Unknown margin mapping {mapping!r}; choose one of {', '.join(MAPPINGS)}.")
    min_margin, max_margin = validate_margin_range(min_margin, max_margin)
    d = np.asarray(distances, np.float64)
    if mapping == "linear":
        return linear_margins(d, min_margin, max_margin, distance)
    if mapping == "paper":
        if distance != "squared_l2":
            raise ValueError("The paper mapping is defined for squared_l2 text distances (range [0, 4]).")
        return min_margin + d / (4.0 - min_margin)
    if reference is None or np.size(reference) < 2:
        raise ValueError("The catalog mapping needs the catalog's pairwise distances (reference=, >= 2 values).")
    lo, hi = np.quantile(np.asarray(reference, np.float64), quantiles)
    if hi <= lo:
        return np.full_like(d, (min_margin + max_margin) / 2)
    return min_margin + (max_margin - min_margin) * np.clip((d - lo) / (hi - lo), 0.0, 1.0)


def class_margin_matrix(
    class_text_embeddings: Any,
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    distance: str = "squared_l2",
    missing_text_margin: float | None = None,
) -> np.ndarray:
    """ATL's margin mapping between all classes, as a float32 numpy ``[C, C]`` matrix.

    ``M[y, c] = min_margin + (max_margin - min_margin) * d(g_y, g_c) / d_max`` for the
    L2-normalised class text embeddings ``g`` (``[C, T]``, row c = class c); pairs where
    either row is all-zero (missing description) get ``missing_text_margin`` (None = midpoint).
    The diagonal is ``min_margin`` (never read by the proxy losses). ``C^2`` floats: for
    large C let `AdaptiveProxyLoss` compute the rows a batch needs instead.
    """
    distance = validate_distance(distance)
    min_margin, max_margin = validate_margin_range(min_margin, max_margin)
    missing_margin = validate_missing_text_margin(missing_text_margin, min_margin, max_margin)
    d = text_distance_table(np.asarray(class_text_embeddings), distance)
    margins = linear_margins(d, min_margin, max_margin, distance)
    return np.where(np.isnan(d), missing_margin, margins).astype(np.float32)

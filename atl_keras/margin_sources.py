"""Where ATL's per-pair margins come from: margin mappings and margin sources.

ATL's triplet margin between an anchor item ``a`` and a negative item ``n`` is a function of
how different their descriptions are. This module makes the two halves of that explicit:

*Mappings* turn a text distance ``d = d(g_a, g_n)`` into a margin:

- ``linear`` (`AdaptiveTripletLoss`'s): ``m = min + (max - min) * d / d_max``. With the
  Universal Sentence Encoder, distances between products fall in ~0.5-1.7 of the 0-4
  squared-L2 range, so margins hardly vary (sd ~0.02 at [0.05, 0.4]).
- ``paper``: ``m = beta + d / (4 - beta)`` with ``beta = min_margin``, the seed paper's
  margin as a third-party re-implementation writes it (with ``g`` the L2-normalised sum of
  word vectors). UNVERIFIED: the paper's method section is not available to us.
- ``catalog``: the catalog's own distance quantiles ``[q_lo, q_hi]`` (default 1st-99th
  percentile of the training item pairs) are stretched linearly onto ``[min, max]`` and
  clipped, so any encoder's margins spread over the whole range.

*Sources* give the ``[M, M]`` margin table of a catalog's ``M`` items; every experimental
condition differs from the others only in this table (`MarginTableTripletLoss` reads it):

- ``text``: the mapping applied to the items' description distances (ATL).
- ``shuffled_text``: the ``text`` table with descriptions re-assigned across items by a
  derangement (``table[pi(a), pi(n)]``): real text structure, detached from the images.
- ``permuted``: the ``text`` table's values permuted i.i.d. across item pairs (kept
  symmetric): the same value distribution, no structure at all.
- ``fixed``: every pair gets the mean of the ``text`` margins (a classic triplet loss).
- ``oracle``: the items' true attribute disagreement (1 - shared-attribute fraction, see
  `attribute_disagreement`), affinely matched to the ``text`` margins' mean and sd.

Statistics (quantiles, mean, permutation pool) come from pairs of *training* items only, so
nothing about test items leaks into training. Rows/columns of other items hold the mean.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import keras
import numpy as np
from keras import ops

from atl_keras.distances import max_distance, pairwise_distances, validate_distance
from atl_keras.losses import _TripletLossBase, margin_triplet_loss

__all__ = [
    "MAPPINGS",
    "MarginTableTripletLoss",
    "SOURCES",
    "attribute_disagreement",
    "derangement",
    "margin_spread",
    "map_distances",
    "margin_table",
    "text_distance_table",
]

MAPPINGS = ("linear", "paper", "catalog")
SOURCES = ("text", "shuffled_text", "permuted", "fixed", "oracle")
#: Attribute keys that name a listing, not a property of the product.
NON_ATTRIBUTE_KEYS = ("design", "listing")


def text_distance_table(text_embeddings: np.ndarray, distance: str = "squared_l2") -> np.ndarray:
    """``[M, T]`` text embeddings -> ``[M, M]`` float64 distances of their L2-normalised rows.

    The definition `AdaptiveTripletLoss` uses; rows of missing (all-zero) text are NaN.
    """
    from atl_keras.margins import pairwise_text_distances

    return pairwise_text_distances(text_embeddings, validate_distance(distance))


def _off_diagonal(table: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Finite upper-triangle values of ``table[items][:, items]``: ``[P]``."""
    sub = table[np.ix_(items, items)]
    values = sub[np.triu_indices(len(items), k=1)]
    return values[np.isfinite(values)]


def map_distances(
    distances: np.ndarray,
    mapping: str = "linear",
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    distance: str = "squared_l2",
    reference: np.ndarray | None = None,
    quantiles: tuple[float, float] = (0.01, 0.99),
) -> np.ndarray:
    """Text distances (any shape) -> margins of the same shape (see the module docstring).

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
    if not 0 <= min_margin <= max_margin:
        raise ValueError(f"Need 0 <= min_margin <= max_margin, got {min_margin} and {max_margin}.")
    d = np.asarray(distances, np.float64)
    if mapping == "linear":
        return min_margin + (max_margin - min_margin) * d / max_distance(distance)
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


def attribute_disagreement(
    attributes: Sequence[Mapping[str, Any]], ignore_keys: Sequence[str] = NON_ATTRIBUTE_KEYS
) -> np.ndarray:
    """``[M, M]`` float64: 1 - the share of attributes two items share.

    Over the union of both items' keys (minus `ignore_keys`), the share of keys present in
    both with equal values; a key only one item has counts as a disagreement.
    """
    items = [{k: v for k, v in a.items() if k not in set(ignore_keys)} for a in attributes]
    m = len(items)
    out = np.zeros((m, m), np.float64)
    for i in range(m):
        for j in range(i + 1, m):
            keys = items[i].keys() | items[j].keys()
            shared = sum(1 for k in keys if k in items[i] and k in items[j] and items[i][k] == items[j][k])
            out[i, j] = out[j, i] = 1.0 - shared / max(1, len(keys))
    return out


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation of ``range(n)`` without fixed points (n >= 2): ``[n]`` int64."""
    if n < 2:
        raise ValueError(f"A derangement needs n >= 2 items, got {n}.")
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, np.int64)
    out[order] = np.roll(order, -1)  # each item points to the next one in a random cycle
    return out


def _fill(values_for_items: np.ndarray, items: np.ndarray, m: int, fill: float) -> np.ndarray:
    table = np.full((m, m), fill, np.float64)
    table[np.ix_(items, items)] = values_for_items
    np.fill_diagonal(table, fill)
    return table


def margin_table(
    source: str,
    *,
    text_embeddings: np.ndarray | None = None,
    item_attributes: Sequence[Mapping[str, Any]] | None = None,
    train_items: Sequence[int] | None = None,
    mapping: str = "linear",
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    distance: str = "squared_l2",
    missing_text_margin: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The ``[M, M]`` float32 margin table of a catalog's items from one margin source.

    Args:
        source: one of `SOURCES` (see the module docstring).
        text_embeddings: ``[M, T]`` item description embeddings (every source: the others
            are matched to the ``text`` margins' statistics).
        item_attributes: ``[M]`` attribute dicts (``oracle`` only).
        train_items: item indices the statistics come from (default: all items).
        mapping, min_margin, max_margin, distance: the text-to-margin mapping.
        missing_text_margin: margin of pairs with a missing description (default: midpoint).
        seed: the derangement / permutation of ``shuffled_text`` and ``permuted``.
    Returns:
        float32 ``[M, M]``, symmetric; ``table[a, n]`` is the margin of anchor item ``a``
        against negative item ``n``.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown margin source {source!r}; choose one of {', '.join(SOURCES)}.")
    if text_embeddings is None:
        raise ValueError("margin_table needs text_embeddings [M, T] (every source is matched to the text margins).")
    distances = text_distance_table(text_embeddings, distance)
    m = len(distances)
    items = np.arange(m) if train_items is None else np.unique(np.asarray(train_items, np.int64))
    if len(items) < 2 or items.min() < 0 or items.max() >= m:
        raise ValueError(f"train_items must name >= 2 distinct items in [0, {m}), got {len(items)}.")
    reference = _off_diagonal(distances, items)
    if reference.size == 0:
        raise ValueError("Fewer than two training items have a description: no text margins to build.")
    missing = (min_margin + max_margin) / 2 if missing_text_margin is None else float(missing_text_margin)
    text = map_distances(distances, mapping, min_margin, max_margin, distance, reference=reference)
    text = np.where(np.isfinite(text), text, missing)
    sub = text[np.ix_(items, items)]
    pool = sub[np.triu_indices(len(items), k=1)]
    mean, sd = float(pool.mean()), float(pool.std())
    rng = np.random.default_rng(seed)
    if source == "text":
        values = sub
    elif source == "fixed":
        values = np.full_like(sub, mean)
    elif source == "shuffled_text":
        partner = derangement(len(items), seed)
        values = sub[np.ix_(partner, partner)]
    elif source == "permuted":
        values = np.zeros_like(sub)
        upper = np.triu_indices(len(items), k=1)
        values[upper] = rng.permutation(pool)
        values = values + values.T
    else:  # oracle
        if item_attributes is None or len(item_attributes) != m:
            raise ValueError("The oracle source needs item_attributes, one dict per item "
                             "(the synthetic shop has them; most catalogs do not).")
        disagreement = attribute_disagreement([item_attributes[i] for i in items])
        raw = disagreement[np.triu_indices(len(items), k=1)]
        scale = sd / raw.std() if raw.std() > 0 else 0.0
        values = np.clip(mean + (disagreement - raw.mean()) * scale, 0.0, None)
    return _fill(values, items, m, mean).astype(np.float32)


def margin_spread(table: np.ndarray, items: Sequence[int] | None = None) -> dict[str, float]:
    """Mean, sd and coefficient of variation (sd / mean) of a table's off-diagonal values."""
    items = np.arange(len(table)) if items is None else np.unique(np.asarray(items, np.int64))
    values = _off_diagonal(np.asarray(table, np.float64), items)
    mean, sd = float(values.mean()), float(values.std())
    return {"mean": mean, "sd": sd, "cv": sd / mean if mean > 0 else float("nan"),
            "min": float(values.min()), "max": float(values.max())}


@keras.saving.register_keras_serializable(package="atl_keras")
class MarginTableTripletLoss(_TripletLossBase):
    """Triplet loss whose margin of anchor item ``a`` and negative item ``n`` is ``table[a, n]``.

    The experiments' one code path: ATL with text margins, its controls and a fixed-margin
    triplet loss differ only in `table` (see `margin_table`). With the ``linear`` mapping and
    the ``text`` source it equals `AdaptiveTripletLoss` on the same items.

    Args:
        table: ``[M, M]`` margins; labels are item indices in ``[0, M)``.
        mining: ``"batch_all"`` | ``"batch_hard"`` | ``"semi_hard"``.
        distance: image embedding distance.
        negative_table: optional ``[M, M]`` bool; ``False`` marks pairs that are not
            negatives (ATL's semantic threshold, precomputed).
        soft_margin: softplus instead of the hinge.

    ``y_true``: labels ``[B]`` or a dict with ``"label"``; ``y_pred``: ``[B, D]`` embeddings.
    """

    def __init__(
        self,
        table: Any,
        mining: str = "batch_hard",
        distance: str = "squared_l2",
        negative_table: Any | None = None,
        soft_margin: bool = False,
        name: str = "margin_table_triplet_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype: Any = "float32",
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        table = np.asarray(table, np.float32)
        if table.ndim != 2 or table.shape[0] != table.shape[1] or not np.all(np.isfinite(table)) or table.min() < 0:
            raise ValueError(f"table must be a finite, non-negative [M, M] matrix, got shape {table.shape}.")
        self.table = table
        self.negative_table = None if negative_table is None else np.asarray(negative_table, bool)
        if self.negative_table is not None and self.negative_table.shape != table.shape:
            raise ValueError(f"negative_table must have the table's shape {table.shape}.")
        self.mining = mining
        self.distance = validate_distance(distance)
        self.soft_margin = bool(soft_margin)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels = y_true["label"] if isinstance(y_true, Mapping) else y_true
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        embeddings = ops.cast(y_pred, "float32")
        distances = pairwise_distances(embeddings, distance=self.distance)
        rows = ops.take(ops.convert_to_tensor(self.table), labels, axis=0)
        margins = ops.take(rows, labels, axis=1)
        negative_mask = None
        if self.negative_table is not None:
            mask_rows = ops.take(ops.convert_to_tensor(self.negative_table), labels, axis=0)
            negative_mask = ops.take(mask_rows, labels, axis=1)
        return margin_triplet_loss(labels, distances, margins, mining=self.mining,
                                   soft_margin=self.soft_margin, negative_mask=negative_mask)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "table": self.table.tolist(), "mining": self.mining, "distance": self.distance,
            "negative_table": None if self.negative_table is None else self.negative_table.tolist(),
            "soft_margin": self.soft_margin,
        }

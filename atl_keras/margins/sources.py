"""Margin sources and their controls: the ``[M, M]`` margin table of a catalog's items.

The text-to-margin mappings (``linear``, ``paper``, ``catalog``) live in
`atl_keras.margins.mapping`; a source decides *which* distances they map.

*Sources* give the ``[M, M]`` margin table of a catalog's ``M`` items; every experimental
condition differs from the others only in this table (`atl_keras.losses.MarginTableTripletLoss` reads it):

- ``text``: the mapping applied to the items' description distances (ATL).
- ``shuffled_text``: the ``text`` table with descriptions re-assigned across items by a
  derangement (``table[pi(a), pi(n)]``): real text structure, detached from the images.
- ``permuted``: the ``text`` table's values permuted i.i.d. across item pairs (kept
  symmetric): the same value distribution, no structure at all.
- ``fixed``: every pair gets the mean of the ``text`` margins (a classic triplet loss).
- ``oracle``: the items' true attribute disagreement (1 - shared-attribute fraction, see
  `attribute_disagreement`), affinely matched to the ``text`` margins' mean and sd.
- ``random``: i.i.d. uniform margins in ``[min_margin, max_margin]``, one per unordered item
  pair (symmetric), drawn from `seed`; needs no descriptions at all (see `random_margin_table`).

Statistics (quantiles, mean, permutation pool) come from pairs of *training* items only, so
nothing about test items leaks into training. Rows/columns of other items hold the mean
(``random``: the midpoint of the range).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from atl_keras.margins.checks import validate_margin_range, validate_missing_text_margin
from atl_keras.margins.mapping import MAPPINGS, map_distances, text_distance_table

__all__ = [
    "MAPPINGS",
    "SOURCES",
    "attribute_disagreement",
    "derangement",
    "margin_spread",
    "map_distances",
    "margin_table",
    "random_margin_table",
    "text_distance_table",
]

SOURCES = ("text", "shuffled_text", "permuted", "fixed", "oracle", "random")
#: Sources whose table needs no text embeddings.
TEXT_FREE_SOURCES = ("random",)
#: Attribute keys that name a listing, not a property of the product.
NON_ATTRIBUTE_KEYS = ("design", "listing")


def _off_diagonal(table: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Finite upper-triangle values of ``table[items][:, items]``: ``[P]``."""
    sub = table[np.ix_(items, items)]
    values = sub[np.triu_indices(len(items), k=1)]
    return values[np.isfinite(values)]


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


def _train_items(train_items: Sequence[int] | None, m: int) -> np.ndarray:
    items = np.arange(m) if train_items is None else np.unique(np.asarray(train_items, np.int64))
    if len(items) < 2 or items.min() < 0 or items.max() >= m:
        raise ValueError(f"train_items must name >= 2 distinct items in [0, {m}), got {len(items)}.")
    return items


def random_margin_table(
    num_items: int,
    train_items: Sequence[int] | None = None,
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    seed: int = 0,
) -> np.ndarray:
    """``[M, M]`` float32 i.i.d. uniform margins in ``[min_margin, max_margin]``, symmetric.

    One draw per unordered pair of training items (``numpy.random.default_rng(seed)``), so
    ``table[a, n] == table[n, a]``; the diagonal and rows/columns of other items hold the
    midpoint. What it is: a margin *spread* with no information about the items, a regulariser
    of batch-hard mining that changes which negative is "hardest" (it needs no descriptions).
    What it is not: a weak label: it says nothing about which products are alike, so any gain it
    gives is not evidence that a text (or any) similarity is used.
    """
    min_margin, max_margin = validate_margin_range(min_margin, max_margin)
    items = _train_items(train_items, int(num_items))
    upper = np.triu_indices(len(items), k=1)
    values = np.zeros((len(items), len(items)), np.float64)
    values[upper] = np.random.default_rng(seed).uniform(min_margin, max_margin, size=len(upper[0]))
    values = values + values.T
    return _fill(values, items, int(num_items), (min_margin + max_margin) / 2).astype(np.float32)


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
    num_items: int | None = None,
) -> np.ndarray:
    """The ``[M, M]`` float32 margin table of a catalog's items from one margin source.

    Args:
        source: one of `SOURCES` (see the module docstring).
        text_embeddings: ``[M, T]`` item description embeddings (every source but ``random``:
            the others are matched to the ``text`` margins' statistics).
        item_attributes: ``[M]`` attribute dicts (``oracle`` only).
        train_items: item indices the statistics come from (default: all items).
        mapping, min_margin, max_margin, distance: the text-to-margin mapping.
        missing_text_margin: margin of pairs with a missing description (default: midpoint).
        seed: the derangement / permutation of ``shuffled_text`` and ``permuted``; the draw of
            ``random``.
        num_items: ``M`` for ``random`` without `text_embeddings` (else ``len(text_embeddings)``).
    Returns:
        float32 ``[M, M]``, symmetric; ``table[a, n]`` is the margin of anchor item ``a``
        against negative item ``n``.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown margin source {source!r}; choose one of {', '.join(SOURCES)}.")
    if source == "random":
        if num_items is None and text_embeddings is None:
            raise ValueError("The random source needs num_items (or text_embeddings [M, T] to count the items).")
        m = int(num_items) if num_items is not None else len(text_embeddings)
        return random_margin_table(m, train_items, min_margin, max_margin, seed)
    if text_embeddings is None:
        raise ValueError(f"The {source!r} source needs text_embeddings [M, T] (it is matched to the text margins); "
                         "without descriptions use margin_source='random'.")
    distances = text_distance_table(text_embeddings, distance)
    m = len(distances)
    items = _train_items(train_items, m)
    reference = _off_diagonal(distances, items)
    if reference.size == 0:
        raise ValueError("Fewer than two training items have a description: no text margins to build.")
    missing = validate_missing_text_margin(missing_text_margin, min_margin, max_margin)
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

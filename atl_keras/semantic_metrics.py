"""Semantic retrieval metrics: attribute agreement@K and variant-aware Recall@K.

Exact-item metrics (:func:`atl_keras.metrics.retrieval_metrics`) call a neighbour
correct only if it is the query's own item. The metrics here see *how wrong* the wrong
neighbours are, and whether the right *design* was found (issue 11).

Labels are item indices ``0 .. M-1``: label ``i`` has attributes ``item_attributes[i]``
(a mapping ``key -> value``) and design group ``design_ids[i]`` (variant listings of one
design share a design id). For a query of item ``q``:

- ``attribute_agreement_at_<k>``: take the gallery rows whose label differs from ``q``
  ("other items"; all rows of ``q`` itself are removed), keep the ``k`` nearest, and
  average over them ``agreement(q, item_of_row)``; then average over queries.
  ``agreement(a, b)`` = |keys present in both with equal values| / |keys of a UNION keys
  of b| (a category-specific key that only one item has counts as a disagreement).
- ``attribute_agreement_chance``: the same average over *all* other-item gallery rows,
  i.e. the expected ``attribute_agreement_at_k`` of a uniformly random ranking (the
  baseline to compare against).
- ``variant_recall_at_<k>``: 1 if any of the ``k`` nearest gallery rows (own item
  included) has the design id of ``q``, averaged over the queries whose design has at
  least one gallery row (the others are counted in ``num_queries_without_variant_match``).
  With one item per design it equals ``recall_at_<k>`` of ``retrieval_metrics``.

Short lists (documented choice): every ``k`` must be ``<= N`` (gallery rows; a
``ValueError`` otherwise, as in ``retrieval_metrics``). When a query has fewer than ``k``
other-item rows, ``attribute_agreement_at_<k>`` averages over the rows that exist; a query
with no other-item row at all raises ``ValueError``.

Neighbours come from :class:`atl_keras.search.ExactSearcher` (same distances and the same
tie rule as ``retrieval_metrics``: lower gallery index first), in query chunks, searching
only ``max(k) + (rows of the query's own item)`` deep: memory ``O(chunk_size * N)``.
The gallery is a separate set (e.g. street photos -> catalog); there is no leave-one-out.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from atl_keras.search import DISTANCES, Distance, ExactSearcher

__all__ = ["attribute_agreement_at_k", "semantic_retrieval_metrics", "variant_recall_at_k"]

# Elements of the [chunk, distinct gallery items] block of the chance level.
_CHANCE_BLOCK = 1 << 22


def _check_ks(ks: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
        ks = (int(ks),)
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"`ks` must be a non-empty sequence of positive integers; got {ks!r}.")
    return tuple(sorted({int(k) for k in ks}))


def _as_matrix(x: Any, name: str) -> np.ndarray:
    if isinstance(x, tf.Tensor):
        x = x.numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array [num_rows, dim]; got shape {arr.shape}.")
    return arr


def _as_item_labels(labels: Any, name: str, num_items: int, table: str) -> np.ndarray:
    """Labels as int64 ``[n]`` item indices in ``[0, num_items)``."""
    if isinstance(labels, tf.Tensor):
        labels = labels.numpy()
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D [num_rows] (one label per row); got shape {arr.shape}.")
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"`{name}` must hold integer item indices (label i -> {table}[i]); got dtype "
            f"{arr.dtype}. Map string ids to indices first."
        )
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= num_items)]
    if bad.size:
        raise ValueError(
            f"`{name}` has {bad.size} label(s) outside [0, {num_items}) (e.g. {int(bad[0])}), but "
            f"`{table}` has {num_items} entries (label i -> {table}[i]). Pass one entry per item."
        )
    return arr


def _check_rows(embeddings: np.ndarray, labels: np.ndarray, name: str) -> None:
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}_embeddings has {embeddings.shape[0]} rows but {name}_labels has "
            f"{labels.shape[0]} entries; they must match."
        )


def _check_common(distance: str, chunk_size: int) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"Unknown distance {distance!r}; expected one of {DISTANCES}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer; got {chunk_size!r}.")


def _encode_attributes(
    item_attributes: Sequence[Mapping[str, Any]], ignore_keys: Collection[str]
) -> np.ndarray:
    """Attributes as codes ``[M, num_keys]`` int64: per key a value id, ``-1`` if absent."""
    if isinstance(item_attributes, (str, bytes, Mapping)) or not isinstance(item_attributes, Sequence):
        raise ValueError(
            "`item_attributes` must be a sequence of mappings indexed by label "
            f"(item_attributes[i] = attributes of item i); got {type(item_attributes).__name__}."
        )
    ignore = {ignore_keys} if isinstance(ignore_keys, str) else set(ignore_keys)
    key_ids: dict[Any, int] = {}
    value_ids: list[dict[Any, int]] = []
    rows: list[list[tuple[int, int]]] = []
    for i, attrs in enumerate(item_attributes):
        if not isinstance(attrs, Mapping):
            raise ValueError(
                f"item_attributes[{i}] must be a mapping key -> value; got {type(attrs).__name__}."
            )
        row = []
        for key, value in attrs.items():
            if key in ignore:
                continue
            if key not in key_ids:
                key_ids[key] = len(key_ids)
                value_ids.append({})
            table = value_ids[key_ids[key]]
            try:
                code = table.setdefault(value, len(table))
            except TypeError as err:
                raise ValueError(
                    f"item_attributes[{i}][{key!r}] = {value!r} is not hashable; attribute "
                    "values must be strings, numbers or tuples."
                ) from err
            row.append((key_ids[key], code))
        rows.append(row)
    codes = np.full((len(rows), len(key_ids)), -1, np.int64)
    for i, row in enumerate(rows):
        for key, code in row:
            codes[i, key] = code
    return codes


def _check_has_attributes(codes: np.ndarray, labels: np.ndarray) -> None:
    used = np.unique(labels)
    empty = used[~np.any(codes[used] >= 0, axis=1)] if codes.shape[1] else used
    if empty.size:
        raise ValueError(
            f"{empty.size} item(s) used as query or gallery labels have no attributes "
            f"(after ignore_keys), e.g. label {int(empty[0])}; attribute agreement is "
            "undefined for them. Give every evaluated item at least one attribute."
        )


def _agreement(codes_a: np.ndarray, codes_b: np.ndarray) -> np.ndarray:
    """Shared-attribute fraction of broadcast code arrays ``[..., num_keys] -> [...]``."""
    shape = np.broadcast_shapes(codes_a.shape[:-1], codes_b.shape[:-1])
    shared = np.zeros(shape, np.int32)
    union = np.zeros(shape, np.int32)
    for key in range(codes_a.shape[-1]):  # one 2-D pass per key: no [..., num_keys] temporaries
        a, b = codes_a[..., key], codes_b[..., key]
        present_a = a >= 0
        shared += (a == b) & present_a
        union += present_a | (b >= 0)
    return shared / union


def _chance_level(query_labels: np.ndarray, gallery_labels: np.ndarray, codes: np.ndarray) -> float:
    """Mean over queries of the mean agreement with every other-item gallery row."""
    if query_labels.shape[0] == 0:
        return math.nan
    unique_q, q_inverse = np.unique(query_labels, return_inverse=True)
    unique_g, g_counts = np.unique(gallery_labels, return_counts=True)
    per_label = np.empty(unique_q.shape[0], np.float64)
    step = max(1, _CHANCE_BLOCK // unique_g.shape[0])
    gallery_codes = codes[unique_g][None, :, :]
    for start in range(0, unique_q.shape[0], step):
        labels = unique_q[start : start + step]
        agree = _agreement(codes[labels][:, None, :], gallery_codes)  # [c, Ug]
        weights = np.where(unique_g[None, :] == labels[:, None], 0, g_counts[None, :])
        per_label[start : start + step] = np.sum(agree * weights, axis=1) / np.sum(weights, axis=1)
    return float(np.mean(per_label[q_inverse.reshape(-1)]))


def _encode_designs(design_ids: Any) -> np.ndarray:
    """Design ids ``[M]`` (any comparable type) as int64 group codes ``[M]``."""
    if isinstance(design_ids, tf.Tensor):
        design_ids = design_ids.numpy()
    arr = np.asarray(design_ids)
    if arr.ndim != 1:
        raise ValueError(
            f"`design_ids` must be 1-D [num_items] (design_ids[i] = design of item i); got shape {arr.shape}."
        )
    try:
        _, inverse = np.unique(arr, return_inverse=True)
    except TypeError as err:
        raise ValueError("`design_ids` mixes types that cannot be compared; use one id type.") from err
    return inverse.reshape(-1).astype(np.int64)


def _semantic_pass(
    query_embeddings: Any,
    query_labels: Any,
    gallery_embeddings: Any,
    gallery_labels: Any,
    item_attributes: Sequence[Mapping[str, Any]] | None,
    design_ids: Any,
    ks: tuple[int, ...],
    attribute_ks: tuple[int, ...],
    distance: str,
    chunk_size: int,
    ignore_keys: Collection[str],
) -> dict[str, float]:
    """One exact search feeding both metrics (either may be skipped with ``None``)."""
    _check_common(distance, chunk_size)
    codes = None if item_attributes is None else _encode_attributes(item_attributes, ignore_keys)
    designs = None if design_ids is None else _encode_designs(design_ids)
    if codes is not None and designs is not None and codes.shape[0] != designs.shape[0]:
        raise ValueError(
            f"`item_attributes` has {codes.shape[0]} entries but `design_ids` has "
            f"{designs.shape[0]}; both are indexed by label and need one entry per item."
        )
    num_items, table = (codes.shape[0], "item_attributes") if codes is not None else (designs.shape[0], "design_ids")
    queries = _as_matrix(query_embeddings, "query_embeddings")
    gallery = _as_matrix(gallery_embeddings, "gallery_embeddings")
    q_labels = _as_item_labels(query_labels, "query_labels", num_items, table)
    g_labels = _as_item_labels(gallery_labels, "gallery_labels", num_items, table)
    _check_rows(queries, q_labels, "query")
    _check_rows(gallery, g_labels, "gallery")
    num_gallery, num_queries = g_labels.shape[0], q_labels.shape[0]
    max_k = max(ks + attribute_ks)
    if max_k > num_gallery:
        raise ValueError(
            f"k={max_k} needs at least {max_k} gallery rows, but there are only {num_gallery}. "
            "Use smaller `ks` or a larger gallery."
        )

    own_rows = np.bincount(g_labels, minlength=num_items)[q_labels]  # [Q]
    if codes is not None:
        _check_has_attributes(codes, np.concatenate([q_labels, g_labels]))
        no_other = np.flatnonzero(own_rows == num_gallery)
        if no_other.size:
            raise ValueError(
                f"{no_other.size} query(ies) (e.g. query {int(no_other[0])}, label "
                f"{int(q_labels[no_other[0]])}) have no gallery row of another item, so "
                "attribute agreement is undefined. The gallery needs rows of other items."
            )
    if designs is not None:
        q_designs, g_designs = designs[q_labels], designs[g_labels]
        has_match = np.bincount(g_designs, minlength=int(designs.max()) + 1)[q_designs] > 0

    agreement_sums = {k: 0.0 for k in attribute_ks}
    hits = {k: 0.0 for k in ks}
    searcher = ExactSearcher(gallery, distance=distance)
    for start in range(0, num_queries, int(chunk_size)):
        stop = min(start + int(chunk_size), num_queries)
        depth = max(ks) if designs is not None else 1
        if codes is not None:
            depth = max(depth, max(attribute_ks) + int(own_rows[start:stop].max()))
        depth = min(depth, num_gallery)
        indices, _ = searcher.search(queries[start:stop], depth, chunk_size=stop - start)
        labels = q_labels[start:stop]
        if codes is not None:
            # Other-item rows in ranking order; the first k of them are the top-k others.
            other = g_labels[indices] != labels[:, None]  # [c, depth]
            rank = np.cumsum(other, axis=1)
            agree = _agreement(codes[labels][:, None, :], codes[g_labels[indices]])  # [c, depth]
            for k in attribute_ks:
                chosen = other & (rank <= k)
                agreement_sums[k] += float(np.sum(np.sum(agree * chosen, axis=1) / np.sum(chosen, axis=1)))
        if designs is not None:
            same_design = g_designs[indices] == q_designs[start:stop, None]  # [c, depth]
            valid = has_match[start:stop]
            for k in ks:
                hits[k] += float(np.sum(np.any(same_design[:, :k], axis=1) & valid))

    result: dict[str, float] = {}
    if codes is not None:
        for k in attribute_ks:
            result[f"attribute_agreement_at_{k}"] = agreement_sums[k] / num_queries if num_queries else math.nan
        result["attribute_agreement_chance"] = _chance_level(q_labels, g_labels, codes)
    if designs is not None:
        evaluated = int(np.count_nonzero(has_match))
        for k in ks:
            result[f"variant_recall_at_{k}"] = hits[k] / evaluated if evaluated else math.nan
        result["num_variant_queries"] = float(evaluated)
        result["num_queries_without_variant_match"] = float(num_queries - evaluated)
    return result


def attribute_agreement_at_k(
    query_embeddings: Any,
    query_labels: Any,
    gallery_embeddings: Any,
    gallery_labels: Any,
    item_attributes: Sequence[Mapping[str, Any]],
    ks: int | Sequence[int] = (10,),
    distance: Distance = "squared_l2",
    ignore_keys: Collection[str] = (),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Mean shared-attribute fraction between each query item and its top-K *other* items.

    Args:
        query_embeddings: ``[Q, D]``.
        query_labels: ``[Q]`` int item indices.
        gallery_embeddings: ``[N, D]``.
        gallery_labels: ``[N]`` int item indices.
        item_attributes: ``[M]`` mappings, ``item_attributes[label]`` = that item's
            attributes (e.g. ``{"category": "shirt", "colour": "red", "sleeve": "long"}``).
        ks: the K values, each ``<= N``; a query with fewer than K other-item rows is
            averaged over the ones it has.
        distance: ``"squared_l2"``, ``"cosine"`` or ``"dot"`` (see :mod:`atl_keras.search`).
        ignore_keys: attribute keys left out of the comparison (ids, free text, ...).
        chunk_size: queries ranked per step (memory ``O(chunk_size * N)``).

    Returns:
        ``{"attribute_agreement_at_<k>": ..., "attribute_agreement_chance": ...}`` (floats
        in ``[0, 1]``; the chance level is the mean over every other-item row).

    Example:
        >>> m = attribute_agreement_at_k(street, street_ids, catalog, catalog_ids, attrs, ks=(10,))
        >>> m["attribute_agreement_at_10"] - m["attribute_agreement_chance"]
    """
    return _semantic_pass(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels,
        item_attributes, None, (), _check_ks(ks), distance, chunk_size, ignore_keys,
    )


def variant_recall_at_k(
    query_embeddings: Any,
    query_labels: Any,
    gallery_embeddings: Any,
    gallery_labels: Any,
    design_ids: Any,
    ks: int | Sequence[int] = (1, 10),
    distance: Distance = "squared_l2",
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K where any listing of the query's design (its item or a variant) is correct.

    Args:
        query_embeddings, query_labels, gallery_embeddings, gallery_labels: as in
            :func:`attribute_agreement_at_k` (int item indices).
        design_ids: ``[M]`` design id per item (ints or strings); items sharing an id are
            variant listings of one design.
        ks: the K values, each ``<= N``.
        distance, chunk_size: as in :func:`attribute_agreement_at_k`.

    Returns:
        ``{"variant_recall_at_<k>": ..., "num_variant_queries",
        "num_queries_without_variant_match"}``; queries whose design has no gallery row
        are left out of the means (NaN when none is left).

    Example:
        >>> variant_recall_at_k(street, street_ids, catalog, catalog_ids, design_of_item)["variant_recall_at_1"]
    """
    return _semantic_pass(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels,
        None, design_ids, _check_ks(ks), (), distance, chunk_size, (),
    )


def semantic_retrieval_metrics(
    query_embeddings: Any,
    query_labels: Any,
    gallery_embeddings: Any,
    gallery_labels: Any,
    item_attributes: Sequence[Mapping[str, Any]] | None = None,
    design_ids: Any = None,
    ks: int | Sequence[int] = (1, 10),
    distance: Distance = "squared_l2",
    ignore_keys: Collection[str] = (),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Attribute agreement@K and/or variant Recall@K from one exact search.

    Computes what is given (``item_attributes`` -> the attribute keys, ``design_ids`` ->
    the variant keys), with the same ``ks`` for both; the result is the union of
    :func:`attribute_agreement_at_k` and :func:`variant_recall_at_k`. Raises if neither
    is given.

    Example:
        >>> m = retrieval_metrics(street, ids, catalog, catalog_ids)
        >>> m.update(semantic_retrieval_metrics(street, ids, catalog, catalog_ids, attrs, designs))
    """
    if item_attributes is None and design_ids is None:
        raise ValueError(
            "semantic_retrieval_metrics needs `item_attributes` (attribute agreement) and/or "
            "`design_ids` (variant recall); neither was given."
        )
    ks = _check_ks(ks)
    return _semantic_pass(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels,
        item_attributes, design_ids, ks if design_ids is not None else (),
        ks if item_attributes is not None else (), distance, chunk_size, ignore_keys,
    )

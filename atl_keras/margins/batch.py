"""Per-batch weak-label margin matrices and the semantic (threshold) mask, in `keras.ops`.

For a batch of ``B`` rows with text embeddings ``[B, T]`` (all-zero row = missing
description) these give the ``[B, B]`` margins of ATL's `linear_margins` mapping, the
margin ``missing_text_margin`` for pairs where either text is missing, and optionally the
semantic mask (a pair whose text distance is below tau is not a negative; pairs with a
missing text are never masked).

The text is a property of the label (item), so the text distances and margins are
computed on the ``U`` distinct labels, held in ``C`` slots (``[C, T] x [T, C]`` instead of
``[B, T] x [T, B]``; ``C`` the smallest of ``B/8, B/4, B/2`` that holds ``U``; U = P in a
P x K batch) and expanded to ``[B, B]`` by gathers. A cheap bitwise check (``O(B T)``) that
every row's text equals its label's first row guards this: if any label carries two
different texts (or ``U > B/2``), the full ``[B, B]`` computation runs instead, so the
result always follows the definition. Every choice is made at run time among branches of
static shapes (XLA / JAX compile once per batch size).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.distances import l2_normalize, pairwise_distances, validate_distance
from atl_keras.losses.base import prepare_embeddings, prepare_labels
from atl_keras.margins.checks import validate_missing_text_margin
from atl_keras.margins.mapping import linear_margins

__all__ = ["adaptive_margins", "batch_margin_matrices", "missing_rows"]

def _label_groups(labels: Any) -> tuple[Any, Any] | None:
    """Label groups of a ``[B]`` batch, with static shapes: (``first``, ``is_first``).

    ``first[i]`` (int32 ``[B]``) is the first row holding row ``i``'s label and
    ``is_first[i]`` (bool ``[B]``) marks the first row of each distinct label,
    so ``U = sum(is_first)`` labels are distinct. One ``[B, B]`` comparison:
    no data-dependent shape (``tf.unique`` has one, and ``keras.ops.unique``
    needs a static ``size`` under JAX), so XLA compiles it once per batch size.
    """
    count = ops.shape(labels)[0]
    index = ops.arange(count, dtype="int32")
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    later = ops.zeros_like(index) + ops.cast(count, "int32")
    first = ops.min(ops.where(same, ops.expand_dims(index, 0), ops.expand_dims(later, 0)), axis=1)
    first = ops.cast(first, "int32")
    return first, ops.equal(first, index)


def missing_rows(text: Any) -> Any:
    """``[N, T]`` -> ``[N]`` bool: True where the text embedding is all-zero (missing).

    ``max |x| == 0`` (NaN rows are not missing): a float reduction, several
    times cheaper on CPU than ``all(x == 0)`` on a ``[N, T]`` bool tensor.
    """
    return ops.equal(ops.max(ops.abs(text), axis=1), 0.0)


def _bit_words(x: Any) -> Any:
    """``[N, T]`` float -> integer tensor holding the same bits, for exact equality tests.

    On TensorFlow, float32 rows of (statically known) even width are viewed as ``T / 2``
    int64 words (half as many comparisons), otherwise as one int32 / int64 word per
    element. On TensorFlow this is `tf.bitcast`, which also works when the shape is only known at run
    time (e.g. after a cross-replica all-gather), where `ops.view` cannot trace.
    """
    dtype = keras.backend.standardize_dtype(x.dtype)
    same_size = "int64" if dtype == "float64" else "int32"
    width = x.shape[-1]
    paired = dtype == "float32" and width is not None and width % 2 == 0
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if paired:
            return tf.bitcast(tf.reshape(x, [-1, width // 2, 2]), tf.int64)
        return tf.bitcast(x, same_size)
    return ops.view(x, same_size)  # JAX has no int64 unless jax_enable_x64


def _expand_pairs(x: Any, index: Any) -> Any:
    """``[U, U]`` per-label matrix -> ``[B, B]`` with ``out[i, j] = x[index[i], index[j]]``.

    Two row gathers and two transposes: a gather along axis 1 copies single
    elements and costs more than the whole ``[U, T] x [T, U]`` text product.
    """
    columns = ops.take(ops.transpose(x), index, axis=0)  # [B, U]: x[u, index[j]] at [j, u]
    return ops.take(ops.transpose(columns), index, axis=0)


# Per-label text branches hold the U distinct labels in C = B // d slots (d below,
# largest C last): the smallest C >= U is used. Static shapes: XLA compiles every
# branch once per batch size and runs one.
_TEXT_GROUP_DIVISORS: tuple[int, ...] = (8, 4, 2)


def _group_capacities(count: Any) -> list[Any]:
    """Slot counts ``C < B`` of the per-label branches, ascending (ints if B is static)."""
    if isinstance(count, int):
        return sorted({count // d for d in _TEXT_GROUP_DIVISORS if 1 <= count // d < count})
    return [ops.maximum(count // d, 1) for d in _TEXT_GROUP_DIVISORS]


def _text_pair_matrices(
    text: Any, labels: Any | None, distance: str, pair_fn: Any
) -> tuple[Any, ...]:
    """``pair_fn(text_distances [N, N], missing [N] bool)`` -> tuple of ``[N, N]``, for N = B.

    ``text_distances = pairwise_distances(l2_normalize(text))`` (an all-zero
    row stays zero) and ``missing`` flags all-zero rows. ``pair_fn`` must be
    elementwise in the pair (``out[i, j]`` depends on row ``i`` and ``j`` only).

    The text is a property of the label, so when ``labels`` is given and every
    row's text is bitwise identical to the text of its label's first row,
    ``pair_fn`` runs on the ``U`` distinct labels, held in ``C`` slots
    (``[C, T] x [T, C]`` instead of ``[B, T] x [T, B]``; ``C`` the smallest of
    ``B/8, B/4, B/2`` that holds ``U``), and each output is expanded to
    ``[B, B]`` by gathers: identical inputs, identical per-pair values.
    Otherwise (a label with two texts, even if they differ only in the sign of
    a zero; more than ``B/2`` labels; or ``_label_groups`` returning None) it
    runs on all ``B`` rows. ``ops.switch`` picks the branch at run time, so
    the result always follows the definition, and every branch has static
    shapes (one XLA compilation). The branches evaluate the same formula;
    values may differ in the last bits (matrix products of different shapes),
    and pairs within one label are exactly 0 on the per-label branches (the
    losses never read them: not negatives).

    Args:
        text: ``[B, T]`` float32/float64 text embeddings, not normalised.
        labels: ``[B]`` labels or None.
        distance: a validated distance name.
    """

    def on_rows(rows: Any) -> tuple[Any, ...]:
        distances = pairwise_distances(l2_normalize(rows), distance=distance)
        return tuple(pair_fn(distances, missing_rows(rows)))

    groups = None if labels is None else _label_groups(labels)
    capacities = [] if groups is None else _group_capacities(ops.shape(text)[0])
    if not capacities:
        return on_rows(text)
    first, is_first = groups
    distinct = ops.sum(ops.cast(is_first, "int32"))
    words = _bit_words(text)  # compared bitwise: exact, and cheaper than float ==
    shared = ops.all(ops.equal(words, ops.take(words, first, axis=0)))

    def per_label(capacity: Any) -> Any:
        def branch() -> tuple[Any, ...]:
            # The first rows of the U labels come first (value 1), in C >= U slots.
            _, rows = ops.top_k(ops.cast(is_first, "float32"), capacity)
            rows = ops.cast(rows, "int32")
            slot = ops.argmax(  # the one slot holding row i's first row
                ops.cast(ops.equal(ops.expand_dims(first, 1), ops.expand_dims(rows, 0)), "int32"),
                axis=1,
            )
            return tuple(_expand_pairs(x, slot) for x in on_rows(ops.take(text, rows, axis=0)))

        return branch

    branches = [per_label(c) for c in capacities] + [lambda: on_rows(text)]
    too_many = sum(ops.cast(ops.greater(distinct, c), "int32") for c in capacities)
    index = ops.where(shared, too_many, len(capacities))
    if len(branches) == 2:
        return ops.cond(ops.equal(index, 0), branches[0], branches[1])
    return ops.switch(index, branches)


def batch_margin_matrices(
    text_embeddings: Any,
    labels: Any | None,
    min_margin: float,
    max_margin: float,
    distance: str,
    missing_text_margin: float,
    semantic_threshold: float | None = None,
    return_distances: bool = False,
) -> tuple[Any, Any | None, Any | None]:
    """``(margins [B, B], negative_mask [B, B] bool or None, text_distances [B, B] or None)``.

    Arguments are validated by the caller. ``negative_mask`` (semantic
    masking) is None without ``semantic_threshold``; ``text_distances`` only
    with ``return_distances``. All are computed per distinct label when
    possible (see `_text_pair_matrices`).
    """
    text = ops.stop_gradient(prepare_embeddings(text_embeddings, "text_embeddings"))

    def pair_fn(distances: Any, missing: Any) -> list[Any]:
        missing_pair = ops.logical_or(ops.expand_dims(missing, 1), ops.expand_dims(missing, 0))
        margins = ops.where(
            missing_pair,
            ops.full_like(distances, float(missing_text_margin)),
            linear_margins(distances, min_margin, max_margin, distance),
        )
        out = [margins]
        if semantic_threshold is not None:  # missing texts are never masked
            out.append(ops.logical_or(ops.greater_equal(distances, semantic_threshold), missing_pair))
        if return_distances:
            out.append(distances)
        return out

    out = list(_text_pair_matrices(text, labels, distance, pair_fn))
    margins = out.pop(0)
    negative_mask = out.pop(0) if semantic_threshold is not None else None
    text_distances = out.pop(0) if return_distances else None
    return margins, negative_mask, text_distances


def adaptive_margins(
    text_embeddings: Any,
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    distance: str = "squared_l2",
    missing_text_margin: float | None = None,
    labels: Any | None = None,
) -> tuple[Any, Any]:
    """ATL margins from text embeddings (treated as constants).

    Args:
        text_embeddings: ``[B, T]`` float; L2-normalised here. An all-zero row
            means "description missing".
        min_margin, max_margin: the margin range.
        distance: ``"squared_l2"`` | ``"l2"`` | ``"cosine"``.
        missing_text_margin: margin of every pair where either text is
            all-zero; None means ``(min_margin + max_margin) / 2``. Must lie in
            ``[0, inf)``.
        labels: optional ``[B]`` item ids. If given (and every row of a label
            carries the same text), text distances are computed once per
            distinct label: same values, less work.

    Returns:
        ``(margins, text_distances)``, both ``[B, B]`` float32, with
        ``margins = min_margin + (max_margin - min_margin) * text_distances / d_max``
        except ``margins = missing_text_margin`` where either text is missing.
        ``text_distances`` are the distances of the normalised rows (an
        all-zero row stays zero), also for missing pairs. With ``labels``,
        pairs within one label may read 0 instead of a ~1e-7 round-off value.
    """
    distance = validate_distance(distance)
    missing_text_margin = validate_missing_text_margin(missing_text_margin, min_margin, max_margin)
    text = prepare_embeddings(text_embeddings, "text_embeddings")
    if labels is not None:
        labels = prepare_labels(labels, text.shape[0])
    margins, _, text_distances = batch_margin_matrices(
        text, labels, min_margin, max_margin, distance, missing_text_margin, return_distances=True
    )
    return margins, text_distances

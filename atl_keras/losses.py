"""Triplet losses with in-batch mining: the baseline and the adaptive triplet loss (ATL).

Everything here is a pure function of tensors written with `keras.ops` (so it
runs on the TensorFlow, JAX and PyTorch backends), plus two thin
`keras.losses.Loss` subclasses that hold the configuration.

Definitions (``B`` = batch size, ``d`` = the chosen distance):

- A valid triplet ``(a, p, n)`` has ``a != p``, ``label[a] == label[p]`` and
  ``label[a] != label[n]``. With ATL's ``semantic_threshold`` tau, an ``n`` whose
  text distance ``d(g_a, g_n) < tau`` is *not* a negative of ``a``.
- ``x_apn = d_ap - d_an + m_an``; the loss of a triplet is ``hinge(x) = max(0, x)``
  or, with ``soft_margin=True``, ``softplus(x)``.
- Triplet baseline: ``m_an = margin``. ATL:
  ``m_an = min_margin + (max_margin - min_margin) * d(g_a, g_n) / d_max`` where
  ``g`` are L2-normalised text embeddings (constants) and ``d_max`` is
  `atl_keras.distances.max_distance`. ``min_margin == max_margin == m`` gives
  exactly the baseline with ``margin=m``.
- Missing descriptions: `atl_keras.text` gives an item without a description
  an *all-zero* text embedding ("unknown text"). Any anchor-negative pair where
  either text embedding is all-zero gets ``m_an = missing_text_margin``
  (default: the midpoint ``(min_margin + max_margin) / 2``) and is never
  removed by ``semantic_threshold``. So a batch whose texts are all missing is
  exactly the baseline with ``margin=missing_text_margin``.

Mining (``c_an = m_an - d_an``, so ``x_apn = d_ap + c_an``):

- ``"batch_all"``: mean of the hinge over the *violating* triplets (``x > 0``);
  with ``soft_margin`` the mean of softplus over all valid triplets.
- ``"batch_hard"``: per anchor with a positive and a negative,
  ``hinge(max_p d_ap + max_n c_an)`` (hardest positive, hardest negative *under
  its own margin*), mean over such anchors. With a constant margin this is
  tfa's ``triplet_hard_loss``; tfa's ``soft=True`` variant is ours with
  ``soft_margin=True, margin=0``.
- ``"semi_hard"``: per positive pair ``(a, p)``, the negative maximising
  ``c_an`` among those with ``d_an > d_ap`` (constant margin: the closest
  negative farther than the positive), or, if there is none, the negative
  minimising ``c_an`` (constant margin: the farthest negative, as tfa). Mean
  over all positive pairs whose anchor has a negative (zero losses included),
  which is tfa's ``triplet_semihard_loss`` for a constant margin.

Cost (no mode builds ``[B, B, B]`` unless noted):

- ``batch_hard``: ``O(B^2)``, masked row maxima of the ``[B, B]`` matrices.
- ``batch_all`` and ``semi_hard`` have two exact algorithms. When every
  anchor has at most ``Q`` positives, as in P x K batches (``K - 1``), each
  anchor's positives are gathered into ``Q`` slots and the work is
  ``O(B^2 Q)`` on ``[B, Q, B]`` tensors with no sort; ``Q`` is the smallest
  of 3, 7, 15 that fits (or ``K - 1`` with ``max_images_per_label=K``).
  Otherwise one row-wise sort per anchor, a row-wise ``searchsorted`` and
  suffix sums / a suffix max give ``O(B^2 log B)`` time and ``O(B^2)`` memory.
- ``batch_all`` with ``soft_margin=True`` on the sort path: softplus has no
  prefix-sum shortcut, so it materialises ``[B, B, B]`` float32 values
  (B=256: 64 MiB, B=1024: 4 GiB plus as much again for the gradient). With few
  positives per anchor it is ``[B, Q, B]`` like the rest.
- ATL's margins: the text is a property of the label (item), so the text
  distances and margins are computed on the ``U`` distinct labels, held in
  ``C`` slots (``[C, T] x [T, C]`` instead of ``[B, T] x [T, B]``; ``C`` the
  smallest of ``B/8, B/4, B/2`` that holds ``U``; U = P in a P x K batch)
  and expanded to ``[B, B]`` by gathers. A cheap bitwise check (``O(B T)``)
  that every row's text equals its label's first row guards this: if any
  label carries two different texts (or ``U > B/2``), the full ``[B, B]``
  computation runs instead, so the result always follows the definition.

XLA and JAX: every choice above is made at run time among branches of
*static* shapes (``ops.cond`` / ``ops.switch``; no shape depends on tensor
values), so ``tf.function(jit_compile=True)``, Keras' ``jit_compile`` and
``jax.jit`` compile once per input shape, for any label batch. Under XLA the
row-wise ``searchsorted`` is a binary search in ``keras.ops``
(``_binary_search_right``).

Keras ``compile``/``fit``: the loss classes work in any Keras model with
dict targets; see `install_keras_target_support`.

A batch without a valid triplet (B=1, one label only, singletons only) gives a
loss of exactly 0.0 with finite (zero) gradients.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
from keras import ops

from atl_keras.distances import (
    compute_dtype,
    l2_normalize,
    max_distance,
    pairwise_distances,
    validate_distance,
)

MINING_MODES: tuple[str, ...] = ("batch_all", "batch_hard", "semi_hard")

__all__ = [
    "MINING_MODES",
    "AdaptiveTripletLoss",
    "TripletLoss",
    "adaptive_margins",
    "adaptive_triplet_loss",
    "install_keras_target_support",
    "margin_triplet_loss",
    "triplet_loss",
    "triplet_statistics",
]


# --------------------------------------------------------------------------
# Argument validation (plain Python, shared by functions and classes).
# --------------------------------------------------------------------------


def _validate_mining(mining: str) -> str:
    if not isinstance(mining, str) or mining not in MINING_MODES:
        raise ValueError(
            f"Unknown mining {mining!r}. Valid mining modes are: "
            f"{', '.join(repr(m) for m in MINING_MODES)}."
        )
    return mining


def _validate_margin(value: float, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0; got {value!r}.") from None
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0; got {value}. Use a non-negative margin.")
    return value


def _validate_adaptive(
    min_margin: float, max_margin: float, distance: str, semantic_threshold: float | None
) -> tuple[float, float, float | None]:
    min_margin = _validate_margin(min_margin, "min_margin")
    max_margin = _validate_margin(max_margin, "max_margin")
    if min_margin > max_margin:
        raise ValueError(
            f"min_margin ({min_margin}) must be <= max_margin ({max_margin}); "
            "swap them, or set them equal for the plain triplet loss."
        )
    if semantic_threshold is not None:
        d_max = max_distance(distance)
        try:
            semantic_threshold = float(semantic_threshold)
        except (TypeError, ValueError):
            raise ValueError(
                f"semantic_threshold must be None or a number; got {semantic_threshold!r}."
            ) from None
        if not 0.0 <= semantic_threshold <= d_max:
            raise ValueError(
                f"semantic_threshold={semantic_threshold} is outside [0, {d_max}], the "
                f"range of the {distance!r} distance between unit text embeddings. "
                "Pass None to disable semantic masking."
            )
    return min_margin, max_margin, semantic_threshold


def _validate_missing_text_margin(
    missing_text_margin: float | None, min_margin: float, max_margin: float
) -> float:
    """``None`` -> ``(min_margin + max_margin) / 2``; else a finite number ``>= 0``."""
    if missing_text_margin is None:
        return (float(min_margin) + float(max_margin)) / 2.0
    if isinstance(missing_text_margin, bool):
        raise ValueError(f"missing_text_margin must be None or a number; got {missing_text_margin!r}.")
    try:
        value = float(missing_text_margin)
    except (TypeError, ValueError):
        raise ValueError(
            f"missing_text_margin must be None or a number; got {missing_text_margin!r}."
        ) from None
    if not 0.0 <= value < float("inf"):  # also rejects NaN
        raise ValueError(
            f"missing_text_margin must lie in [0, inf); got {value}. Pass a finite "
            "non-negative margin, or None for (min_margin + max_margin) / 2."
        )
    return value


def _validate_soft_margin(soft_margin: bool) -> bool:
    if not isinstance(soft_margin, bool):
        raise ValueError(f"soft_margin must be True or False; got {soft_margin!r}.")
    return soft_margin


def _validate_max_images(max_images_per_label: int | None) -> int | None:
    if max_images_per_label is None:
        return None
    if isinstance(max_images_per_label, bool) or not isinstance(max_images_per_label, numbers.Integral) \
            or max_images_per_label < 1:
        raise ValueError(
            "max_images_per_label must be None or an integer >= 1 (K of a P x K batch); "
            f"got {max_images_per_label!r}."
        )
    return int(max_images_per_label)


# --------------------------------------------------------------------------
# Small tensor helpers.
# --------------------------------------------------------------------------


def _prepare_labels(labels: Any, batch_size: int | None) -> Any:
    """Labels ``[B]`` or ``[B, 1]`` -> ``[B]``, dtype untouched."""
    labels = ops.convert_to_tensor(labels)
    if len(labels.shape) == 2 and labels.shape[1] == 1:
        labels = ops.reshape(labels, (-1,))
    if len(labels.shape) != 1:
        raise ValueError(
            f"labels must have shape [batch] or [batch, 1]; got {tuple(labels.shape)}."
        )
    if batch_size is not None and labels.shape[0] is not None and labels.shape[0] != batch_size:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but embeddings has {batch_size} rows; "
            "pass one label per embedding."
        )
    return labels


def _prepare_embeddings(embeddings: Any, name: str = "embeddings") -> Any:
    embeddings = ops.convert_to_tensor(embeddings)
    if len(embeddings.shape) != 2:
        raise ValueError(
            f"{name} must have shape [batch, dim]; got {tuple(embeddings.shape)}."
        )
    return ops.cast(embeddings, compute_dtype(embeddings))


def _pair_masks(labels: Any) -> tuple[Any, Any]:
    """``[B]`` labels -> (positive mask, negative mask), both ``[B, B]`` bool."""
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    index = ops.arange(ops.shape(labels)[0])
    diagonal = ops.equal(ops.expand_dims(index, 1), ops.expand_dims(index, 0))
    positive = ops.logical_and(same, ops.logical_not(diagonal))
    return positive, ops.logical_not(same)


def _masked_max(x: Any, mask: Any, axis: int = 1) -> tuple[Any, Any]:
    """Row max of ``x`` over ``mask``; returns (max, any) with max=0 where empty.

    Masked-out entries are replaced by a finite constant below every value, so
    no infinities enter the graph (their gradients would turn into NaN).
    """
    floor = ops.stop_gradient(ops.min(x)) - 1.0
    best = ops.max(ops.where(mask, x, floor), axis=axis)
    present = ops.any(mask, axis=axis)
    return ops.where(present, best, ops.zeros_like(best)), present


def _masked_min(x: Any, mask: Any, axis: int = 1) -> tuple[Any, Any]:
    best, present = _masked_max(-x, mask, axis=axis)
    return -best, present


def _reverse_cumsum(x: Any) -> Any:
    """``[R, K]`` -> ``[R, K + 1]`` with ``out[:, j] = sum(x[:, j:])`` (``out[:, K] = 0``).

    Summing from the end keeps small suffix sums exact-ish (no ``total - prefix``).
    """
    suffix = ops.flip(ops.cumsum(ops.flip(x, axis=1), axis=1), axis=1)
    return ops.pad(suffix, [[0, 0], [0, 1]])


def _xla_active() -> bool:
    """Whether the code being traced will be compiled by XLA (JAX always is).

    On TensorFlow: inside ``tf.function(jit_compile=True)`` (``fit`` with
    ``jit_compile=True``, the Keras default on a GPU). If TensorFlow's
    internal context lookup is unavailable, XLA is assumed: the XLA-safe
    code is exact everywhere, only slower without XLA.
    """
    if keras.backend.backend() != "tensorflow":
        return keras.backend.backend() == "jax"
    import tensorflow as tf

    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # noqa: BLE001 - private API moved: take the portable path
        return True


def _binary_search_right(sorted_rows: Any, values: Any) -> Any:
    """Row-wise ``searchsorted(side="right")`` by ``ceil(log2(K + 1))`` gather steps.

    Pure `keras.ops`, static shapes, ``O(R Q log K)``: the XLA / JAX path
    (TensorFlow's XLA lowering of ``searchsorted`` compares every value with
    every entry, ``O(R Q K)``).
    """
    width = sorted_rows.shape[1]
    count = ops.shape(sorted_rows)[1]
    lo = ops.zeros_like(values, dtype="int32")
    hi = lo + ops.cast(count, "int32")
    last = hi - 1

    def step(lo: Any, hi: Any) -> tuple[Any, Any]:
        open_ = ops.less(lo, hi)
        mid = ops.floor_divide(lo + hi, 2)
        probe = ops.take_along_axis(sorted_rows, ops.minimum(mid, last), axis=1)
        right = ops.logical_and(open_, ops.less_equal(probe, values))
        left = ops.logical_and(open_, ops.logical_not(right))
        return ops.where(right, mid + 1, lo), ops.where(left, mid, hi)

    if width is not None:  # static width: unrolled
        for _ in range(max(int(width).bit_length(), 1)):
            lo, hi = step(lo, hi)
        return lo
    return ops.while_loop(lambda lo, hi: ops.any(ops.less(lo, hi)), step, (lo, hi))[0]


def _searchsorted_right(sorted_rows: Any, values: Any) -> Any:
    """Row-wise ``searchsorted(..., side="right")``: ``[R, K]``, ``[R, Q]`` -> int ``[R, Q]``.

    ``out[r, q]`` is the number of entries of row ``r`` that are ``<= values[r, q]``,
    i.e. the first position holding a value strictly greater.
    `keras.ops.searchsorted` is 1-D only: TensorFlow without XLA calls the
    batched ``tf.searchsorted`` kernel; under XLA and on other backends a
    binary search in `keras.ops` runs (`_binary_search_right`).
    """
    sorted_rows = ops.stop_gradient(sorted_rows)
    values = ops.stop_gradient(values)
    if keras.backend.backend() == "tensorflow" and not _xla_active():
        import tensorflow as tf

        return tf.searchsorted(sorted_rows, values, side="right", out_type=tf.int32)
    return _binary_search_right(sorted_rows, values)


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


def _missing_rows(text: Any) -> Any:
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
        return tuple(pair_fn(distances, _missing_rows(rows)))

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


def _safe_mean(total: Any, count: Any) -> Any:
    """``total / count``, or 0 when ``count == 0`` (with zero gradients)."""
    return ops.where(count > 0, total / ops.maximum(count, 1.0), ops.zeros_like(total))


def _hinge(x: Any, soft_margin: bool) -> Any:
    return ops.softplus(x) if soft_margin else ops.relu(x)


# --------------------------------------------------------------------------
# Mining strategies on a distance matrix and a margin matrix.
#
# batch_all and semi_hard choose among algorithms at run time (few positives per
# anchor -> [B, Q, B] tensors, else an O(B^2 log B) sort). Differentiating
# through that run-time choice is what XLA executes badly: the gradient of a
# conditional makes the forward branch export every intermediate of *both*
# branches, unfused. So the branches are not differentiated: each one runs on
# stop-gradient inputs and returns the loss value and its exact gradient
# weights (``w_pos = dL/d d_ap`` and ``w_neg = dL/d c_an`` as [B, B] tensors);
# `_attach_gradient` turns them back into a differentiable loss outside the
# branch. Same value, same gradient, one algorithm executed.
# --------------------------------------------------------------------------


# Positive-slot counts Q of the few-positives algorithm, ascending: a batch whose
# anchors have at most Q positives runs on [B, Q, B] tensors with the smallest such
# Q (P x K batches: K - 1 positives); more positives than the last Q -> the sort
# algorithm. Every branch has static shapes: XLA compiles each once per batch size
# and runs one. `max_images_per_label=K` replaces this ladder by Q = K - 1.
_COMPACT_SLOTS: tuple[int, ...] = (3, 7, 15)


def _slot_ladder(max_images_per_label: int | None) -> tuple[int, ...]:
    if max_images_per_label is None:
        return tuple(_COMPACT_SLOTS)
    return (max(max_images_per_label - 1, 1),)


def _hinge_and_slope(x: Any, valid: Any, soft_margin: bool) -> tuple[Any, Any, Any]:
    """Per-triplet loss, its derivative in ``x`` and the count the mean divides by.

    Hinge: the mean runs over violating triplets (``x > 0``; the derivative is 1
    there, 0 elsewhere, as relu's). Softplus: over every valid triplet
    (derivative ``sigmoid(x)``). Returns ``(loss, slope, count)``, loss and slope
    zero outside the counted set, count a scalar.
    """
    zeros = ops.zeros_like(x)
    if soft_margin:
        counted = valid
        loss = ops.where(counted, ops.softplus(x), zeros)
        slope = ops.where(counted, ops.sigmoid(x), zeros)
    else:
        counted = ops.logical_and(valid, x > 0)
        loss = ops.where(counted, x, zeros)
        slope = ops.cast(counted, x.dtype)
    return loss, slope, ops.sum(ops.cast(counted, x.dtype))


def _mean_with_weights(
    total: Any, count: Any, w_pos: Any, w_neg: Any
) -> tuple[Any, Any, Any]:
    """``(total / count, w_pos / count, w_neg / count)``, zeros when ``count == 0``."""
    scale = ops.where(count > 0, 1.0 / ops.maximum(count, 1.0), ops.zeros_like(count))
    return total * scale, w_pos * scale, w_neg * scale


def _attach_gradient(value: Any, w_pos: Any, w_neg: Any, dist: Any, c: Any) -> Any:
    """``value`` (a constant) with gradient ``w_pos`` w.r.t. ``dist`` and ``w_neg`` w.r.t. ``c``.

    ``value + (s - stop_gradient(s))`` with ``s = sum(w_pos * dist) + sum(w_neg * c)``:
    the added term is exactly 0 in value and carries the gradient.
    """
    w_pos, w_neg = ops.stop_gradient(w_pos), ops.stop_gradient(w_neg)
    surrogate = ops.sum(w_pos * dist) + ops.sum(w_neg * c)
    return ops.stop_gradient(value) + (surrogate - ops.stop_gradient(surrogate))


def _few_or_sorted(
    compact: Any, sorted_: Any, dist: Any, margins: Any, positive: Any, negative: Any,
    soft_margin: bool, slots: tuple[int, ...],
) -> Any:
    """The loss of ``compact(..., slots=Q)`` with the smallest ``Q`` in ``slots`` that holds
    every anchor's positives, else of ``sorted_``: chosen at run time among static-shape
    branches, which run on stop-gradient inputs and return ``(value, w_pos, w_neg)``."""
    c = margins - dist
    args = (ops.stop_gradient(dist), ops.stop_gradient(c), positive, negative, soft_margin)
    if not slots:
        value, w_pos, w_neg = sorted_(*args)
    else:
        most = ops.max(ops.sum(ops.cast(positive, "int32"), axis=1))
        branches = [lambda q=q: compact(*args, slots=q) for q in slots] + [lambda: sorted_(*args)]
        index = sum(ops.cast(ops.greater(most, q), "int32") for q in slots)
        if len(branches) == 2:
            value, w_pos, w_neg = ops.cond(ops.equal(index, 0), branches[0], branches[1])
        else:
            value, w_pos, w_neg = ops.switch(index, branches)
    return _attach_gradient(value, w_pos, w_neg, dist, c)


def _positive_slots(dist: Any, positive: Any, slots: int) -> tuple[Any, Any, Any]:
    """Each anchor's positives in ``Q = slots`` slots: ``[B, Q]`` d_ap, valid, column.

    The caller guarantees that no anchor has more than ``Q`` positives. ``Q``
    zero columns are appended so ``top_k`` is valid for any ``B`` (static
    ``k``); an empty slot's column points into that padding (>= B).
    """
    posf = ops.pad(ops.cast(positive, dist.dtype), [[0, 0], [0, slots]])
    flags, column = ops.top_k(posf, slots)
    padded = ops.pad(dist, [[0, 0], [0, slots]])
    return ops.take_along_axis(padded, column, axis=1), flags > 0, column


def _scatter_rows(values: Any, columns: Any, width: Any) -> Any:
    """``out[r, columns[r, s]] += values[r, s]``: ``[R, S]`` values -> ``[R, width]`` (duplicates add).

    A scatter of ``R * S`` entries: cheaper than a ``[R, S, width]`` one-hot product.
    """
    rows = ops.zeros_like(columns) + ops.expand_dims(ops.arange(ops.shape(columns)[0], dtype=columns.dtype), 1)
    pairs = ops.stack([ops.reshape(rows, [-1]), ops.reshape(columns, [-1])], axis=1)
    return ops.scatter(pairs, ops.reshape(values, [-1]), (ops.shape(columns)[0], width))


def _slots_to_columns(weights: Any, column: Any, width: Any) -> Any:
    """``[B, Q]`` per-slot values -> ``[B, B]`` at each slot's column (empty slots dropped)."""
    return _scatter_rows(weights, column, width + ops.shape(column)[1])[:, :width]


def _batch_all_compact(
    dist: Any, c: Any, positive: Any, negative: Any, soft_margin: bool, slots: int
) -> tuple[Any, Any, Any]:
    d_ap, slot_valid, column = _positive_slots(dist, positive, slots)
    x = ops.expand_dims(d_ap, 2) + ops.expand_dims(c, 1)  # [B, Q, B]
    valid = ops.logical_and(ops.expand_dims(slot_valid, 2), ops.expand_dims(negative, 1))
    loss, slope, count = _hinge_and_slope(x, valid, soft_margin)
    w_pos = _slots_to_columns(ops.sum(slope, axis=2), column, ops.shape(dist)[1])
    return _mean_with_weights(ops.sum(loss), count, w_pos, ops.sum(slope, axis=1))


def _batch_all_hinge_sums(
    dist: Any, c: Any, positive: Any, negative: Any, margins: Any | None = None
) -> tuple[Any, Any, Any, Any]:
    """Sums over violating triplets without materialising ``[B, B, B]``.

    For anchor ``a`` and positive ``p`` the violating negatives are those with
    ``c_an > -d_ap`` (``c = m - d``), and ``sum_n max(0, d_ap + c_an)`` equals
    ``k * d_ap + (sum of those c_an)``. Sorting each anchor's ``c`` once gives
    both as a suffix count / suffix sum read at ``searchsorted(-d_ap)``:
    ``O(B^2 log B)`` time, ``O(B^2)`` memory.

    Returns:
        (sum of hinges, number of violating triplets, sum of their margins (None
        without ``margins``): float scalars; ``[B, B]`` number of violating
        negatives per positive pair).
    """
    # Non-negatives get a key <= -d_ap for every p, so they are never counted.
    floor = -ops.stop_gradient(ops.max(dist)) - 1.0
    keys = ops.where(negative, c, ops.zeros_like(c) + floor)
    order = ops.argsort(ops.stop_gradient(keys), axis=1)  # ascending

    def sort(values: Any) -> Any:
        return ops.take_along_axis(values, order, axis=1)

    zeros = ops.zeros_like(c)
    sorted_keys = sort(keys)
    c_suffix = _reverse_cumsum(sort(ops.where(negative, c, zeros)))
    first = _searchsorted_right(sorted_keys, -dist)  # [B, B]: first c > -d_ap
    count = ops.where(positive, ops.cast(ops.shape(dist)[1] - first, dist.dtype), zeros)
    c_sum = ops.take_along_axis(c_suffix, first, axis=1)
    hinge_sum = ops.sum(ops.where(positive, count * dist + c_sum, zeros))
    margin_sum = None
    if margins is not None:
        m_suffix = _reverse_cumsum(sort(ops.where(negative, margins, zeros)))
        m_sum = ops.take_along_axis(m_suffix, first, axis=1)
        margin_sum = ops.sum(ops.where(positive, m_sum, zeros))
    return hinge_sum, ops.sum(count), margin_sum, count


def _violating_positives(dist: Any, c: Any, positive: Any, negative: Any) -> Any:
    """``[B, B]``: per anchor-negative pair, the number of positives with ``d_ap > -c_an``.

    One sort of each anchor's positive distances and a ``searchsorted``; non-positives
    get a key below every ``-c_an`` so they are never counted.
    """
    floor = -ops.max(c) - 1.0
    keys = ops.sort(ops.where(positive, dist, ops.zeros_like(dist) + floor), axis=1)
    first = _searchsorted_right(keys, -c)  # first d_ap > -c_an
    count = ops.cast(ops.shape(dist)[1] - first, dist.dtype)
    return ops.where(negative, count, ops.zeros_like(count))


def _batch_all_sorted(
    dist: Any, c: Any, positive: Any, negative: Any, soft_margin: bool
) -> tuple[Any, Any, Any]:
    if not soft_margin:
        hinge_sum, active, _, per_pair = _batch_all_hinge_sums(dist, c, positive, negative)
        w_neg = _violating_positives(dist, c, positive, negative)
        return _mean_with_weights(hinge_sum, active, per_pair, w_neg)
    # softplus: every valid triplet contributes; [B, B, B] is unavoidable.
    x = ops.expand_dims(dist, 2) + ops.expand_dims(c, 1)  # [a, p, n]
    valid = ops.logical_and(ops.expand_dims(positive, 2), ops.expand_dims(negative, 1))
    loss, slope, count = _hinge_and_slope(x, valid, soft_margin)
    return _mean_with_weights(ops.sum(loss), count, ops.sum(slope, axis=2), ops.sum(slope, axis=1))


def _batch_all(
    dist: Any, margins: Any, positive: Any, negative: Any, soft_margin: bool, slots: tuple[int, ...]
) -> Any:
    return _few_or_sorted(_batch_all_compact, _batch_all_sorted, dist, margins, positive,
                          negative, soft_margin, slots)


def _batch_hard(
    dist: Any, margins: Any, positive: Any, negative: Any, soft_margin: bool, slots: tuple[int, ...]
) -> Any:
    del slots  # one O(B^2) algorithm, no run-time choice: differentiated directly
    hardest_positive, has_positive = _masked_max(dist, positive)
    hardest_negative, has_negative = _masked_max(margins - dist, negative)
    valid = ops.logical_and(has_positive, has_negative)
    losses = _hinge(hardest_positive + hardest_negative, soft_margin)
    losses = ops.where(valid, losses, ops.zeros_like(losses))
    return _safe_mean(ops.sum(losses), ops.sum(ops.cast(valid, dist.dtype)))


def _fallback_negative(c: Any, negative: Any) -> tuple[Any, Any]:
    """Per anchor, the negative minimising ``c_an`` (int32 ``[B]``) and whether one exists."""
    ceiling = ops.max(c) + 1.0
    index = ops.argmin(ops.where(negative, c, ops.zeros_like(c) + ceiling), axis=1)
    return ops.cast(index, "int32"), ops.any(negative, axis=1)


def _semi_hard_from_choice(
    d_ap: Any, chosen: Any, valid: Any, c: Any, soft_margin: bool
) -> tuple[Any, Any, Any]:
    """Loss of each positive pair given its chosen negative's column ``chosen`` (int ``[B, S]``).

    Returns ``(sum of losses, count, [B, S] slope)``, zero outside ``valid``; the mean runs
    over every valid pair (zero losses included, unlike batch_all's hinge mean).
    """
    x = d_ap + ops.take_along_axis(c, chosen, axis=1)
    loss, slope, _ = _hinge_and_slope(x, valid, soft_margin)
    return ops.sum(loss), ops.sum(ops.cast(valid, x.dtype)), slope


def _semi_hard_compact(
    dist: Any, c: Any, positive: Any, negative: Any, soft_margin: bool, slots: int
) -> tuple[Any, Any, Any]:
    d_ap, slot_valid, column = _positive_slots(dist, positive, slots)
    farther = ops.logical_and(
        ops.expand_dims(negative, 1), ops.expand_dims(dist, 1) > ops.expand_dims(d_ap, 2)
    )  # [B, Q, B]
    floor = ops.min(c) - 1.0
    c3 = ops.expand_dims(c, 1)
    farther_best = ops.cast(ops.argmax(ops.where(farther, c3, ops.zeros_like(c3) + floor), axis=2), "int32")
    fallback, has_negative = _fallback_negative(c, negative)
    chosen = ops.where(ops.any(farther, axis=2), farther_best, ops.expand_dims(fallback, 1))
    valid = ops.logical_and(slot_valid, ops.expand_dims(has_negative, 1))
    total, count, slope = _semi_hard_from_choice(d_ap, chosen, valid, c, soft_margin)
    width = ops.shape(dist)[1]
    w_pos = _slots_to_columns(slope, column, width)
    return _mean_with_weights(total, count, w_pos, _scatter_rows(slope, chosen, width))


def _reverse_argmax(x: Any) -> tuple[Any, Any]:
    """Suffix maximum along axis 1 of a non-negative ``[R, K]`` tensor, and where it is.

    ``best[:, j] = max(x[:, j:])`` and ``where[:, j]`` (int32) the position of that
    maximum (the first one on ties), by log2(K) doubling steps (each a shift and an
    elementwise comparison). The shift pads with 0, hence the non-negativity requirement.
    """
    index = ops.zeros_like(x, dtype="int32") + ops.expand_dims(
        ops.arange(ops.shape(x)[1], dtype="int32"), 0
    )

    def step(shift: Any, best: Any, where: Any) -> tuple[Any, Any]:
        later = ops.pad(best[:, shift:], [[0, 0], [0, shift]])
        later_where = ops.pad(where[:, shift:], [[0, 0], [0, shift]])
        take = later > best
        return ops.where(take, later, best), ops.where(take, later_where, where)

    width = x.shape[1]
    if width is not None:  # static width: unrolled
        shift = 1
        while shift < width:
            x, index = step(shift, x, index)
            shift *= 2
        return x, index
    width = ops.shape(x)[1]  # dynamic width (TF graph with unknown batch size)

    def body(shift: Any, best: Any, where: Any) -> tuple[Any, Any, Any]:
        later = ops.concatenate([best[:, shift:], ops.zeros_like(best[:, :shift])], axis=1)
        later_where = ops.concatenate([where[:, shift:], ops.zeros_like(where[:, :shift])], axis=1)
        take = later > best
        return shift * 2, ops.where(take, later, best), ops.where(take, later_where, where)

    _, x, index = ops.while_loop(lambda shift, best, where: shift < width, body, (1, x, index))
    return x, index


def _semi_hard_sorted(
    dist: Any, c: Any, positive: Any, negative: Any, soft_margin: bool
) -> tuple[Any, Any, Any]:
    """Semi-hard mining in ``O(B^2 log B)``: one sort per anchor by distance.

    With each anchor's distances sorted ascending, the negatives farther than
    ``p`` occupy the suffix starting at ``searchsorted(d_ap, side="right")``
    (a negative tied with ``d_ap`` is not farther), so a suffix arg-max of ``c``
    over negatives, read there, is the semi-hard choice.
    """
    zeros = ops.zeros_like(c)
    order = ops.cast(ops.argsort(dist, axis=1), "int32")  # ascending

    def sort(values: Any) -> Any:
        return ops.take_along_axis(values, order, axis=1)

    # Shift c so negatives are >= 1 and non-negatives 0 (the suffix max pads with 0).
    lifted = sort(ops.where(negative, c - (ops.min(c) - 1.0), zeros))
    best, where = _reverse_argmax(lifted)
    best = ops.pad(best, [[0, 0], [0, 1]])  # position B: no farther entry (0: not a negative)
    where = ops.pad(where, [[0, 0], [0, 1]])
    first = _searchsorted_right(sort(dist), dist)  # [B, B]: first d > d_ap
    farther = ops.take_along_axis(best, first, axis=1) > 0
    farther_best = ops.take_along_axis(order, ops.minimum(ops.take_along_axis(where, first, axis=1),
                                                          ops.shape(dist)[1] - 1), axis=1)
    fallback, has_negative = _fallback_negative(c, negative)
    chosen = ops.where(farther, farther_best, ops.expand_dims(fallback, 1))
    valid = ops.logical_and(positive, ops.expand_dims(has_negative, 1))
    total, count, slope = _semi_hard_from_choice(dist, chosen, valid, c, soft_margin)
    return _mean_with_weights(total, count, slope, _scatter_rows(slope, chosen, ops.shape(dist)[1]))


def _semi_hard(
    dist: Any, margins: Any, positive: Any, negative: Any, soft_margin: bool, slots: tuple[int, ...]
) -> Any:
    return _few_or_sorted(_semi_hard_compact, _semi_hard_sorted, dist, margins, positive,
                          negative, soft_margin, slots)


_MINERS = {"batch_all": _batch_all, "batch_hard": _batch_hard, "semi_hard": _semi_hard}


def margin_triplet_loss(
    labels: Any,
    distances: Any,
    margins: Any,
    mining: str = "batch_hard",
    soft_margin: bool = False,
    negative_mask: Any | None = None,
    max_images_per_label: int | None = None,
) -> Any:
    """The one triplet-loss core: a distance matrix, a per-pair margin matrix, a miner.

    Both `triplet_loss` and `adaptive_triplet_loss` are this function with a
    constant or an adaptive margin matrix. Use it directly for custom
    distances or margins.

    Args:
        labels: ``[B]`` or ``[B, 1]`` integer class ids (never cast to float).
        distances: ``[B, B]`` float, ``distances[a, j] = d(f_a, f_j)``.
        margins: ``[B, B]`` float, ``margins[a, n] = m_an`` (only read where
            ``n`` is a negative of ``a``).
        mining: ``"batch_all"``, ``"batch_hard"`` or ``"semi_hard"``.
        soft_margin: softplus instead of the hinge.
        negative_mask: optional ``[B, B]`` bool; a pair is a negative only if
            labels differ *and* this is True (ATL's semantic masking).
        max_images_per_label: optional ``K``: batches hold at most ``K`` images
            of one label (P x K sampling). A speed hint, never a change of the
            result: ``batch_all`` / ``semi_hard`` then compile a single
            ``[B, K - 1, B]`` algorithm instead of a ladder of slot counts
            (a batch that breaks the bound takes the exact sort algorithm).

    Returns:
        Float scalar (float32 unless ``distances`` is float64).

    Example:
        >>> d = pairwise_distances(embeddings)                      # [B, B]
        >>> m = 0.1 + 0.4 * text_distances / 4.0                    # any [B, B] margins
        >>> loss = margin_triplet_loss(labels, d, m, mining="semi_hard")
    """
    mining = _validate_mining(mining)
    soft_margin = _validate_soft_margin(soft_margin)
    slots = _slot_ladder(_validate_max_images(max_images_per_label))
    distances = ops.convert_to_tensor(distances)
    distances = ops.cast(distances, compute_dtype(distances))
    margins = ops.cast(ops.convert_to_tensor(margins), distances.dtype)
    labels = _prepare_labels(labels, distances.shape[0])
    positive, negative = _pair_masks(labels)
    if negative_mask is not None:
        negative = ops.logical_and(negative, ops.cast(negative_mask, "bool"))
    return _MINERS[mining](distances, margins, positive, negative, soft_margin, slots)


# --------------------------------------------------------------------------
# The two losses as functions.
# --------------------------------------------------------------------------


def _adaptive_margin_matrices(
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
    text = ops.stop_gradient(_prepare_embeddings(text_embeddings, "text_embeddings"))
    scale = (float(max_margin) - float(min_margin)) / max_distance(distance)

    def pair_fn(distances: Any, missing: Any) -> list[Any]:
        missing_pair = ops.logical_or(ops.expand_dims(missing, 1), ops.expand_dims(missing, 0))
        margins = ops.where(
            missing_pair,
            ops.full_like(distances, float(missing_text_margin)),
            float(min_margin) + scale * distances,
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
    missing_text_margin = _validate_missing_text_margin(missing_text_margin, min_margin, max_margin)
    text = _prepare_embeddings(text_embeddings, "text_embeddings")
    if labels is not None:
        labels = _prepare_labels(labels, text.shape[0])
    margins, _, text_distances = _adaptive_margin_matrices(
        text, labels, min_margin, max_margin, distance, missing_text_margin, return_distances=True
    )
    return margins, text_distances


def triplet_loss(
    labels: Any,
    embeddings: Any,
    margin: float = 0.2,
    mining: str = "batch_hard",
    distance: str = "squared_l2",
    soft_margin: bool = False,
    max_images_per_label: int | None = None,
) -> Any:
    """Triplet loss with a constant margin and in-batch mining.

    Args:
        labels: ``[B]`` or ``[B, 1]`` integer class (item) ids.
        embeddings: ``[B, D]`` float, normally L2-normalised (not normalised
            here; ``"cosine"`` normalises by definition). Half precision is
            computed in float32.
        margin: ``m >= 0``.
        mining: ``"batch_all"`` | ``"batch_hard"`` | ``"semi_hard"``.
        distance: ``"squared_l2"`` | ``"l2"`` | ``"cosine"``.
        soft_margin: ``softplus(x)`` instead of ``max(0, x)``.
        max_images_per_label: optional ``K`` of P x K batches, a speed hint
            (see `margin_triplet_loss`).

    Returns:
        Float32 scalar; 0.0 when the batch has no valid triplet.

    Example:
        >>> loss = triplet_loss([0, 0, 1, 1], keras.ops.eye(4), mining="batch_hard")
    """
    margin = _validate_margin(margin, "margin")
    distance = validate_distance(distance)
    embeddings = _prepare_embeddings(embeddings)
    labels = _prepare_labels(labels, embeddings.shape[0])
    dist = pairwise_distances(embeddings, distance=distance)
    margins = ops.zeros_like(dist) + margin
    return margin_triplet_loss(labels, dist, margins, mining=mining, soft_margin=soft_margin,
                               max_images_per_label=max_images_per_label)


def adaptive_triplet_loss(
    labels: Any,
    embeddings: Any,
    text_embeddings: Any,
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    mining: str = "batch_hard",
    distance: str = "squared_l2",
    semantic_threshold: float | None = None,
    soft_margin: bool = False,
    missing_text_margin: float | None = None,
    max_images_per_label: int | None = None,
) -> Any:
    """Weakly supervised adaptive triplet loss (Zhao et al., arXiv 1909.12939).

    The margin between anchor ``a`` and negative ``n`` grows with the distance
    of their (L2-normalised, constant) text embeddings:
    ``m_an = min_margin + (max_margin - min_margin) * d(g_a, g_n) / d_max``.
    A pair where either text embedding is all-zero (description missing) gets
    ``m_an = missing_text_margin`` instead and is never masked by
    ``semantic_threshold``.

    Args:
        labels: ``[B]`` or ``[B, 1]`` integer item ids.
        embeddings: ``[B, D]`` float image embeddings (see `triplet_loss`).
        text_embeddings: ``[B, T]`` float description embeddings; no gradient
            flows into them. All-zero row = missing description. Normally all
            rows of one label carry the same text; the text distances are then
            computed once per label (exact; a batch that breaks this is
            detected and computed in full).
        min_margin, max_margin: ``0 <= min_margin <= max_margin``; equal values
            (with the default ``missing_text_margin``) give exactly
            `triplet_loss` with that margin.
        mining, distance, soft_margin: as in `triplet_loss`; ``distance`` is
            used for both image and text distances.
        semantic_threshold: optional tau in ``[0, d_max]``: a pair with
            ``d(g_a, g_n) < tau`` is not a negative (same implicit semantic
            class), unless either text is missing.
        missing_text_margin: margin in ``[0, inf)`` of pairs with a missing
            text; None (default) means ``(min_margin + max_margin) / 2``. If
            every text of the batch is missing, the loss is exactly
            `triplet_loss` with ``margin=missing_text_margin``.
        max_images_per_label: optional ``K`` of P x K batches, a speed hint
            (see `margin_triplet_loss`).

    Returns:
        Float32 scalar; 0.0 when the batch has no valid triplet.

    Example:
        >>> text = keras.ops.convert_to_tensor([[1.0, 0.0]] * 2 + [[0.0, 0.0]] * 2)
        >>> loss = adaptive_triplet_loss([0, 0, 1, 1], keras.ops.eye(4), text,
        ...                              missing_text_margin=0.3)  # item 1: no text
    """
    distance = validate_distance(distance)
    min_margin, max_margin, semantic_threshold = _validate_adaptive(
        min_margin, max_margin, distance, semantic_threshold
    )
    missing_text_margin = _validate_missing_text_margin(missing_text_margin, min_margin, max_margin)
    embeddings = _prepare_embeddings(embeddings)
    labels = _prepare_labels(labels, embeddings.shape[0])
    dist = pairwise_distances(embeddings, distance=distance)
    margins, negative_mask, _ = _adaptive_margin_matrices(
        text_embeddings, labels, min_margin, max_margin, distance, missing_text_margin,
        semantic_threshold,
    )
    return margin_triplet_loss(
        labels,
        dist,
        ops.cast(margins, dist.dtype),
        mining=mining,
        soft_margin=soft_margin,
        negative_mask=negative_mask,
        max_images_per_label=max_images_per_label,
    )


def triplet_statistics(
    labels: Any,
    embeddings: Any,
    text_embeddings: Any | None = None,
    margin: float = 0.2,
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    distance: str = "squared_l2",
    semantic_threshold: float | None = None,
    missing_text_margin: float | None = None,
) -> dict[str, Any]:
    """Cheap batch statistics for monitoring (no ``[B, B, B]`` tensors, no gradient).

    Uses the constant ``margin`` when ``text_embeddings`` is None, else the ATL
    margins from ``min_margin``/``max_margin``/``semantic_threshold``/
    ``missing_text_margin`` (as in `adaptive_triplet_loss`).

    Returns:
        Dict of float32 scalars: ``num_valid_triplets``, ``num_active_triplets``
        (hinge > 0), ``fraction_active`` (active / valid, 0 if none),
        ``mean_active_margin`` (mean ``m_an`` over active triplets, 0 if none),
        ``mean_positive_distance``, ``mean_negative_distance``.
    """
    distance = validate_distance(distance)
    embeddings = ops.stop_gradient(_prepare_embeddings(embeddings))
    labels = _prepare_labels(labels, embeddings.shape[0])
    dist = pairwise_distances(embeddings, distance=distance)
    positive, negative = _pair_masks(labels)
    if text_embeddings is None:
        margin = _validate_margin(margin, "margin")
        margins = ops.zeros_like(dist) + margin
    else:
        min_margin, max_margin, semantic_threshold = _validate_adaptive(
            min_margin, max_margin, distance, semantic_threshold
        )
        missing_text_margin = _validate_missing_text_margin(
            missing_text_margin, min_margin, max_margin
        )
        margins, mask, _ = _adaptive_margin_matrices(
            text_embeddings, labels, min_margin, max_margin, distance, missing_text_margin,
            semantic_threshold,
        )
        margins = ops.cast(margins, dist.dtype)
        if mask is not None:
            negative = ops.logical_and(negative, mask)
    _, active, margin_sum, _ = _batch_all_hinge_sums(dist, margins - dist, positive, negative, margins)
    posf = ops.cast(positive, dist.dtype)
    negf = ops.cast(negative, dist.dtype)
    valid = ops.sum(ops.sum(posf, axis=1) * ops.sum(negf, axis=1))
    return {
        "num_valid_triplets": valid,
        "num_active_triplets": active,
        "fraction_active": _safe_mean(active, valid),
        "mean_active_margin": _safe_mean(margin_sum, active),
        "mean_positive_distance": _safe_mean(ops.sum(dist * posf), ops.sum(posf)),
        "mean_negative_distance": _safe_mean(ops.sum(dist * negf), ops.sum(negf)),
    }


# --------------------------------------------------------------------------
# keras.losses.Loss wrappers.
# --------------------------------------------------------------------------

_TARGET_HELP = (
    "y_true must be a dict {'label': int [batch], 'text_embedding': float [batch, T]}"
)


def _split_targets(y_true: Any, need_text: bool, loss_name: str) -> tuple[Any, Any | None]:
    """``y_true`` -> (labels, text embeddings or None)."""
    if isinstance(y_true, dict):
        if "label" not in y_true:
            raise ValueError(
                f"{loss_name}: y_true dict has keys {sorted(y_true)} but no 'label'. "
                f"{_TARGET_HELP}."
            )
        text = y_true.get("text_embedding")
        if need_text and text is None:
            raise ValueError(
                f"{loss_name} needs text embeddings: y_true has no 'text_embedding'. "
                f"{_TARGET_HELP}."
            )
        return y_true["label"], text
    if isinstance(y_true, str):  # Keras' CompileLoss packs a one-key dict into its key
        raise ValueError(
            f"{loss_name} received y_true={y_true!r} (a dict key): Keras' compile() lost the "
            f"target dict. Import atl_keras before compiling, or pass the labels tensor. "
            f"{_TARGET_HELP}."
        )
    if need_text:
        raise ValueError(
            f"{loss_name} needs text embeddings but y_true is a single tensor "
            f"(labels only). {_TARGET_HELP}. Use TripletLoss for labels alone."
        )
    return y_true, None


def _scale_for_distribution(loss: Any) -> Any:
    """Divide by the replica count under tf.distribute, like Keras' own losses.

    Keras sums gradients over replicas, so built-in losses with a mean
    reduction return ``loss / num_replicas`` per replica; Keras' loss tracker
    undoes this for display. The pure functions above return the unscaled mean.
    """
    if keras.backend.backend() != "tensorflow":
        return loss
    import tensorflow as tf  # only for the strategy lookup

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss * (1.0 / replicas) if replicas > 1 else loss


class _TripletLossBase(keras.losses.Loss):
    """Shared ``__call__``: labels keep their integer dtype; output is float32."""

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Loss of a batch.

        Args:
            y_true: labels ``[B]``/``[B, 1]`` (TripletLoss only) or a dict
                ``{"label": [B], "text_embedding": [B, T]}``. Labels are not cast
                to float (item ids may exceed 2**24).
            y_pred: ``[B, D]`` embeddings (any float dtype; math in float32).
            sample_weight: not supported (must be None): the loss is a mean
                over triplets mined across the batch, so a sample's weight has
                no single term to scale (a weighted anchor changes which
                negatives are hardest for the others too).

        Returns:
            Float32 scalar.
        """
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} does not support sample_weight or class_weight: it "
                "averages over triplets mined across the whole batch, not over samples. "
                "Remove sample_weight/class_weight from fit() (balance items in the sampler, "
                "e.g. atl_keras.data.pk_dataset, instead)."
            )
        with keras.name_scope(self.name):
            loss = ops.cast(self.call(y_true, y_pred), self.dtype)
            if self.reduction in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):
                loss = _scale_for_distribution(loss)
            return loss

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="atl_keras")
class TripletLoss(_TripletLossBase):
    """Triplet loss with a constant margin; see `triplet_loss`.

    Args:
        margin: ``m >= 0``.
        mining: ``"batch_all"`` | ``"batch_hard"`` | ``"semi_hard"``.
        distance: ``"squared_l2"`` | ``"l2"`` | ``"cosine"``.
        soft_margin: softplus instead of the hinge.
        max_images_per_label: optional ``K`` of P x K batches (a speed hint,
            see `margin_triplet_loss`).

    ``y_true`` is the labels ``[B]`` (or ``[B, 1]``) or a dict with a
    ``"label"`` entry (other entries are ignored); ``y_pred`` is ``[B, D]``
    embeddings. Works in any Keras model's ``compile``/``fit`` (see
    `AdaptiveTripletLoss` for dict targets).

    Example:
        >>> model.compile(optimizer="adam", loss=TripletLoss(mining="semi_hard"))
        >>> model.fit(images, item_ids, batch_size=64)
    """

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "batch_hard",
        distance: str = "squared_l2",
        soft_margin: bool = False,
        name: str = "triplet_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype: Any = "float32",
        max_images_per_label: int | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.margin = _validate_margin(margin, "margin")
        self.mining = _validate_mining(mining)
        self.distance = validate_distance(distance)
        self.soft_margin = _validate_soft_margin(soft_margin)
        self.max_images_per_label = _validate_max_images(max_images_per_label)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels, _ = _split_targets(y_true, need_text=False, loss_name=type(self).__name__)
        return triplet_loss(
            labels,
            y_pred,
            margin=self.margin,
            mining=self.mining,
            distance=self.distance,
            soft_margin=self.soft_margin,
            max_images_per_label=self.max_images_per_label,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "margin": self.margin,
            "mining": self.mining,
            "distance": self.distance,
            "soft_margin": self.soft_margin,
            "max_images_per_label": self.max_images_per_label,
        }


@keras.saving.register_keras_serializable(package="atl_keras")
class AdaptiveTripletLoss(_TripletLossBase):
    """Weakly supervised adaptive triplet loss; see `adaptive_triplet_loss`.

    Args:
        min_margin, max_margin: ``0 <= min_margin <= max_margin``.
        mining: ``"batch_all"`` | ``"batch_hard"`` | ``"semi_hard"``.
        distance: ``"squared_l2"`` | ``"l2"`` | ``"cosine"`` (image and text).
        semantic_threshold: None or tau in ``[0, max_distance(distance)]``.
        soft_margin: softplus instead of the hinge.
        missing_text_margin: margin of pairs where either text embedding is
            all-zero (missing description), in ``[0, inf)``; None (default)
            means ``(min_margin + max_margin) / 2``. Such pairs are never
            removed by ``semantic_threshold``.
        max_images_per_label: optional ``K`` of P x K batches (a speed hint,
            see `margin_triplet_loss`).

    ``y_true`` must be ``{"label": int [B], "text_embedding": float [B, T]}``;
    ``y_pred`` is ``[B, D]`` embeddings. Works in any Keras model's
    ``compile``/``fit`` with such dict targets (importing `atl_keras` lets
    Keras' ``CompileLoss`` hand the dict to this loss unchanged; see
    `install_keras_target_support`).

    Example:
        >>> inputs = keras.Input((28, 28, 1))
        >>> x = keras.layers.Dense(64)(keras.layers.Flatten()(inputs))
        >>> model = keras.Model(inputs, keras.layers.UnitNormalization()(x))
        >>> model.compile(optimizer="adam", loss=AdaptiveTripletLoss(mining="semi_hard"))
        >>> model.fit(pk_dataset)  # yields (images, {"label": ..., "text_embedding": ...})
    """

    def __init__(
        self,
        min_margin: float = 0.05,
        max_margin: float = 0.4,
        mining: str = "batch_hard",
        distance: str = "squared_l2",
        semantic_threshold: float | None = None,
        soft_margin: bool = False,
        missing_text_margin: float | None = None,
        name: str = "adaptive_triplet_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype: Any = "float32",
        max_images_per_label: int | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.max_images_per_label = _validate_max_images(max_images_per_label)
        self.mining = _validate_mining(mining)
        self.distance = validate_distance(distance)
        self.min_margin, self.max_margin, self.semantic_threshold = _validate_adaptive(
            min_margin, max_margin, self.distance, semantic_threshold
        )
        self.soft_margin = _validate_soft_margin(soft_margin)
        _validate_missing_text_margin(missing_text_margin, self.min_margin, self.max_margin)
        # None is kept (it means "the midpoint", also after a config round trip).
        self.missing_text_margin = (
            None if missing_text_margin is None else float(missing_text_margin)
        )

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels, text = _split_targets(y_true, need_text=True, loss_name=type(self).__name__)
        return adaptive_triplet_loss(
            labels,
            y_pred,
            text,
            min_margin=self.min_margin,
            max_margin=self.max_margin,
            mining=self.mining,
            distance=self.distance,
            semantic_threshold=self.semantic_threshold,
            soft_margin=self.soft_margin,
            missing_text_margin=self.missing_text_margin,
            max_images_per_label=self.max_images_per_label,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "min_margin": self.min_margin,
            "max_margin": self.max_margin,
            "mining": self.mining,
            "distance": self.distance,
            "semantic_threshold": self.semantic_threshold,
            "soft_margin": self.soft_margin,
            "missing_text_margin": self.missing_text_margin,
            "max_images_per_label": self.max_images_per_label,
        }


# --------------------------------------------------------------------------
# Plain Keras compile/fit with dict targets.
# --------------------------------------------------------------------------


def install_keras_target_support() -> bool:
    """Let Keras' ``CompileLoss`` pass dict targets unchanged to the triplet losses.

    Keras 3 (3.15) reconciles ``y_true`` with the *structure* of ``y_pred``
    before any loss runs (``keras/src/trainers/compile_utils.py``,
    ``CompileLoss.call``): a dict target ``{"label", "text_embedding"}`` for a
    single ``[B, D]`` output fails with "y_true and y_pred have different
    structures", and a one-key dict ``{"label": ...}`` is packed into its
    *key*. Losses like ours read several targets of one output, which Keras'
    structure matching cannot express. This wraps ``CompileLoss.call`` once
    (called when `atl_keras` is imported): when the compiled loss is a
    `TripletLoss` / `AdaptiveTripletLoss` instance, ``y_pred`` is a single
    tensor and ``y_true`` a dict, the loss gets the dict as is (times its
    ``loss_weights``); every other case runs Keras' code unchanged.

    Returns:
        True if installed (or already installed), False if this Keras has no
        ``CompileLoss.call`` to wrap (then use an `ATLModel`, whose
        ``compute_loss`` passes targets through on any Keras).
    """
    try:
        from keras.src.trainers import compile_utils
    except ImportError:  # pragma: no cover - other Keras layouts
        return False
    compile_loss = getattr(compile_utils, "CompileLoss", None)
    original = getattr(compile_loss, "call", None)
    if original is None or not hasattr(compile_loss, "build"):
        return False
    if getattr(original, "_atl_dict_targets", False):
        return True

    def call(self: Any, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        loss = getattr(self, "_user_loss", None)
        if not (isinstance(loss, _TripletLossBase) and isinstance(y_true, dict)
                and not keras.tree.is_nested(y_pred)):
            return original(self, y_true, y_pred, sample_weight)
        if not self.built:  # Keras' own bookkeeping, built from one target leaf
            self.build(keras.tree.flatten(y_true)[0], y_pred)
        value = ops.cast(loss(y_true, y_pred, sample_weight), self.dtype)
        weights = [entry.loss_weights for entry in (self._flat_losses or ())]
        if weights and weights[0] is not None:
            value = ops.multiply(value, weights[0])
        return value

    call._atl_dict_targets = True  # type: ignore[attr-defined]
    call.__doc__ = original.__doc__
    compile_loss.call = call
    return True


install_keras_target_support()


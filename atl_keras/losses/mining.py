"""Triplet mining inside a batch: miners as objects, usable by any loss with a hinge.

A miner reads a ``[B, B]`` distance matrix ``d``, a ``[B, B]`` per-pair margin matrix ``m``
and the positive / negative pair masks (`atl_keras.losses.base.pair_masks`, optionally
narrowed by a semantic mask), chooses triplets and returns the mean of their hinge losses
(``c_an = m_an - d_an``, ``x_apn = d_ap + c_an``, ``hinge(x) = max(0, x)`` or
``softplus(x)``):

- `BatchAllMiner` (``"batch_all"``): mean of the hinge over the *violating* triplets
  (``x > 0``); with ``soft_margin`` the mean of softplus over all valid triplets.
- `BatchHardMiner` (``"batch_hard"``): per anchor with a positive and a negative,
  ``hinge(max_p d_ap + max_n c_an)`` (hardest positive, hardest negative *under its own
  margin*), mean over such anchors. With a constant margin this is tfa's
  ``triplet_hard_loss``.
- `SemiHardMiner` (``"semi_hard"``): per positive pair ``(a, p)``, the negative
  maximising ``c_an`` among those with ``d_an > d_ap`` (constant margin: the closest
  negative farther than the positive), or, if there is none, the negative minimising
  ``c_an`` (as tfa). Mean over all positive pairs whose anchor has a negative (zero losses
  included): tfa's ``triplet_semihard_loss`` for a constant margin.

`get_miner` turns a name (`MINING_MODES`) or a miner into a miner; the losses'
``mining="semi_hard"`` argument is sugar for it.

Cost (no mode builds ``[B, B, B]`` unless noted):

- ``batch_hard``: ``O(B^2)``, masked row maxima of the ``[B, B]`` matrices.
- ``batch_all`` and ``semi_hard`` have two exact algorithms. When every anchor has at most
  ``Q`` positives, as in P x K batches (``K - 1``), each anchor's positives are gathered
  into ``Q`` slots and the work is ``O(B^2 Q)`` on ``[B, Q, B]`` tensors with no sort;
  ``Q`` is the smallest of 3, 7, 15 that fits (or ``K - 1`` with
  ``max_images_per_label=K``). Otherwise one row-wise sort per anchor, a row-wise
  ``searchsorted`` and suffix sums / a suffix max give ``O(B^2 log B)`` time and
  ``O(B^2)`` memory.
- ``batch_all`` with ``soft_margin=True`` on the sort path: softplus has no prefix-sum
  shortcut, so it materialises ``[B, B, B]`` float32 values (B=256: 64 MiB, B=1024: 4 GiB
  plus as much again for the gradient). With few positives per anchor it is ``[B, Q, B]``.

XLA and JAX: every choice is made at run time among branches of *static* shapes
(``ops.cond`` / ``ops.switch``), so ``jit_compile`` and ``jax.jit`` compile once per input
shape, for any label batch. Under XLA the row-wise ``searchsorted`` is a binary search in
``keras.ops`` (`_binary_search_right`). A batch without a valid triplet gives exactly 0.0
with finite (zero) gradients.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
from keras import ops

from atl_keras.losses.registry import MINING_MODES

__all__ = [
    "MINING_MODES",
    "BatchAllMiner",
    "BatchHardMiner",
    "Miner",
    "SemiHardMiner",
    "batch_all_hinge_sums",
    "get_miner",
    "miner_config",
    "safe_mean",
    "validate_max_images",
    "validate_mining",
    "validate_soft_margin",
]


def _pair_miners() -> dict[str, type]:
    """The pair miners by name (`atl_keras.losses.pair_miners`, imported on first use)."""
    from atl_keras.losses.pair_miners import PAIR_MINERS

    return PAIR_MINERS


def validate_mining(mining: Any) -> str:
    """A mining name in `MINING_MODES` or of a pair miner (or a `Miner`, whose name is returned)."""
    if isinstance(mining, Miner):
        return mining.name
    if not isinstance(mining, str) or mining not in (*MINING_MODES, *_pair_miners()):
        raise ValueError(
            f"Unknown mining {mining!r}. Valid mining modes are: "
            f"{', '.join(repr(m) for m in (*MINING_MODES, *_pair_miners()))}."
        )
    return mining


def validate_soft_margin(soft_margin: bool) -> bool:
    if not isinstance(soft_margin, bool):
        raise ValueError(f"soft_margin must be True or False; got {soft_margin!r}.")
    return soft_margin


def validate_max_images(max_images_per_label: int | None) -> int | None:
    if max_images_per_label is None:
        return None
    if isinstance(max_images_per_label, bool) or not isinstance(max_images_per_label, numbers.Integral) \
            or max_images_per_label < 1:
        raise ValueError(
            "max_images_per_label must be None or an integer >= 1 (K of a P x K batch); "
            f"got {max_images_per_label!r}."
        )
    return int(max_images_per_label)


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


def safe_mean(total: Any, count: Any) -> Any:
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


def batch_all_hinge_sums(
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
        hinge_sum, active, _, per_pair = batch_all_hinge_sums(dist, c, positive, negative)
        w_neg = _violating_positives(dist, c, positive, negative)
        return _mean_with_weights(hinge_sum, active, per_pair, w_neg)
    # softplus: every valid triplet contributes; [B, B, B] is unavoidable.
    x = ops.expand_dims(dist, 2) + ops.expand_dims(c, 1)  # [a, p, n]
    valid = ops.logical_and(ops.expand_dims(positive, 2), ops.expand_dims(negative, 1))
    loss, slope, count = _hinge_and_slope(x, valid, soft_margin)
    return _mean_with_weights(ops.sum(loss), count, ops.sum(slope, axis=2), ops.sum(slope, axis=1))


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



class Miner:
    """Chooses the triplets of a batch and reduces their hinge losses to a scalar.

    ``miner(distances, margins, positive, negative, soft_margin=False,
    max_images_per_label=None)`` with ``[B, B]`` float distances and margins and
    ``[B, B]`` bool masks returns a float scalar (0 when no triplet is valid).
    ``max_images_per_label=K`` is a speed hint for P x K batches (see
    `atl_keras.losses.margin_triplet_loss`), never a change of the result.
    """

    #: The name ``mining=`` accepts for this miner (one of `MINING_MODES`).
    name = ""

    def __call__(
        self, distances: Any, margins: Any, positive: Any, negative: Any,
        soft_margin: bool = False, max_images_per_label: int | None = None,
    ) -> Any:
        slots = _slot_ladder(validate_max_images(max_images_per_label))
        return self.mine(distances, margins, positive, negative,
                         validate_soft_margin(soft_margin), slots)

    def mine(self, dist: Any, margins: Any, positive: Any, negative: Any,
             soft_margin: bool, slots: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BatchAllMiner(Miner):
    """Every valid triplet; the mean of the hinge over the violating ones."""

    name = "batch_all"

    def mine(self, dist, margins, positive, negative, soft_margin, slots):  # noqa: D102
        return _few_or_sorted(_batch_all_compact, _batch_all_sorted, dist, margins, positive,
                              negative, soft_margin, slots)


class BatchHardMiner(Miner):
    """The hardest positive and the hardest negative under its own margin, per anchor."""

    name = "batch_hard"

    def mine(self, dist, margins, positive, negative, soft_margin, slots):  # noqa: D102
        del slots  # one O(B^2) algorithm, no run-time choice: differentiated directly
        hardest_positive, has_positive = _masked_max(dist, positive)
        hardest_negative, has_negative = _masked_max(margins - dist, negative)
        valid = ops.logical_and(has_positive, has_negative)
        losses = _hinge(hardest_positive + hardest_negative, soft_margin)
        losses = ops.where(valid, losses, ops.zeros_like(losses))
        return safe_mean(ops.sum(losses), ops.sum(ops.cast(valid, dist.dtype)))


class SemiHardMiner(Miner):
    """Per positive pair, the hardest negative farther than the positive (tfa's semi-hard)."""

    name = "semi_hard"

    def mine(self, dist, margins, positive, negative, soft_margin, slots):  # noqa: D102
        return _few_or_sorted(_semi_hard_compact, _semi_hard_sorted, dist, margins, positive,
                              negative, soft_margin, slots)


_MINERS: dict[str, type[Miner]] = {cls.name: cls for cls in (BatchAllMiner, BatchHardMiner, SemiHardMiner)}
assert tuple(sorted(_MINERS)) == tuple(sorted(MINING_MODES)), "registry.MINING_MODES and the miners differ"


def get_miner(mining: str | dict | Miner) -> Miner:
    """``"batch_all"`` | ``"batch_hard"`` | ``"semi_hard"``, a pair miner's name
    (``"multi_similarity"``, ``"distance_weighted"``), a `miner_config` dict or a `Miner`
    -> a `Miner`."""
    if isinstance(mining, Miner):
        return mining
    if isinstance(mining, dict):
        miner = keras.saving.deserialize_keras_object(mining)
        if not isinstance(miner, Miner):
            raise ValueError(f"The mining config {mining!r} does not describe a Miner.")
        return miner
    name = validate_mining(mining)
    return _MINERS[name]() if name in _MINERS else _pair_miners()[name]()


def miner_config(miner: Miner) -> str | dict:
    """What a loss' ``get_config`` stores for its miner: the name of a miner without
    parameters, else its Keras serialization (`get_miner` reads both)."""
    if not miner.get_config():
        return miner.name
    return keras.saving.serialize_keras_object(miner)

"""Shared pieces of the pair losses (contrastive, multi-similarity, circle, SupCon).

A pair loss reads every pair ``(i, j)`` of a batch: a positive pair has ``i != j`` and
``label_i == label_j``, a negative pair ``label_i != label_j``. A *pair miner*
(`atl_keras.losses.pair_miners`) may narrow both sets; a cross-batch memory
(`atl_keras.losses.memory`) may add columns (pairs of a batch row with remembered
embeddings). Everything here is a pure `keras.ops` function on ``[B, N]`` matrices, with
``N = B`` (the batch against itself) or ``B + M`` (with a memory of ``M`` rows).

The reductions are PyTorch Metric Learning's (PML 2.9):

- `mean_of_positive` is PML's ``AvgNonZeroReducer``: the mean of the terms that are
  ``> 0``, 0 when there is none.
- `masked_logsumexp` is PML's ``lmu.logsumexp``: ``log sum_{mask} exp(x)`` per row (with
  ``add_one``, ``log(1 + sum)``), exactly 0 on a row whose mask is empty, finite and with
  zero gradient wherever the mask is False.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from keras import ops

from atl_keras.distances import l2_normalize
from atl_keras.losses.base import MetricLoss, pair_masks, prepare_embeddings, prepare_labels, split_targets
from atl_keras.losses.mining import miner_config

__all__ = [
    "PairBatch",
    "PairLoss",
    "cosine_similarities",
    "masked_logsumexp",
    "mean_of_positive",
    "mined_batch",
    "pair_batch",
    "pair_constants",
    "validate_number",
]


def validate_number(value: Any, name: str, minimum: float | None = None,
                    strict: bool = False) -> float:
    """A finite number (``>= minimum``, or ``> minimum`` with ``strict``); bools refused."""
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number{bound}; got {value!r}.") from None
    ok = abs(number) < float("inf") and (
        minimum is None or (number > minimum if strict else number >= minimum))
    if not ok:  # also NaN
        raise ValueError(f"{name} must be a finite number{bound}; got {number}.")
    return number


def cosine_similarities(x: Any, y: Any | None = None) -> Any:
    """``[B, D] x [N, D] -> [B, N]`` cosine similarities of the L2-normalised rows
    (``y = None``: ``x`` against itself).

    An all-zero row stays zero (its similarities are 0, with finite gradients).
    """
    x = l2_normalize(x)
    y = x if y is None else l2_normalize(y)
    return ops.matmul(x, ops.transpose(y))


def _floor(x: Any) -> float:
    return -1e300 if str(x.dtype).endswith("float64") else -1e30


def masked_logsumexp(x: Any, mask: Any, add_one: bool = False) -> Any:
    """``log(sum_{j: mask_ij} exp(x_ij))`` per row (``log(1 + sum)`` with ``add_one``).

    Args:
        x: ``[B, N]`` float.
        mask: ``[B, N]`` bool.
        add_one: add ``exp(0)`` to every row's sum (PML's ``add_one=True``).

    Returns:
        ``[B]``: 0 on rows whose mask is empty (both with and without ``add_one``).
    """
    masked = ops.where(mask, x, ops.full_like(x, _floor(x)))
    shift = ops.max(masked, axis=1, keepdims=True)
    if add_one:
        shift = ops.maximum(shift, 0.0)
    present = ops.any(mask, axis=1)
    shift = ops.stop_gradient(ops.where(ops.expand_dims(present, 1), shift, ops.zeros_like(shift)))
    total = ops.sum(ops.where(mask, ops.exp(masked - shift), ops.zeros_like(x)), axis=1)
    if add_one:
        total = total + ops.exp(-ops.squeeze(shift, 1))
    total = ops.where(present, total, ops.ones_like(total))
    return ops.where(present, ops.log(total) + ops.squeeze(shift, 1), ops.zeros_like(total))


def mean_of_positive(values: Any, mask: Any | None = None) -> Any:
    """Mean of the ``values > 0`` (within ``mask``), 0 when there is none (PML's AvgNonZero)."""
    keep = ops.greater(values, 0.0)
    if mask is not None:
        keep = ops.logical_and(keep, mask)
    total = ops.sum(ops.where(keep, values, ops.zeros_like(values)))
    count = ops.sum(ops.cast(keep, values.dtype))
    return total / ops.maximum(count, 1.0)


@dataclass(frozen=True)
class PairBatch:
    """A batch prepared for a pair loss: rows against columns, and the pair masks.

    Attributes:
        embeddings: ``[B, D]`` the batch (compute dtype).
        labels: ``[B]``.
        references: ``[N, D]`` the columns: the batch itself, or the batch followed by a
            cross-batch memory.
        reference_labels: ``[N]``.
        positive, negative: ``[B, N]`` bool pair masks (a row is never its own positive;
            memory slots that hold nothing are in neither mask).
        same: whether ``references`` is ``embeddings`` (no memory).
    """

    embeddings: Any
    labels: Any
    references: Any
    reference_labels: Any
    positive: Any
    negative: Any
    same: bool

    def matrix(self, fn: Any) -> Any:
        """``[B, N]`` values of a pairwise function ``fn(x [B, D], y [N', D] or None)``.

        ``fn(embeddings)`` for the batch against itself (exact zero diagonal, duplicates at
        exactly zero distance), followed by ``fn(embeddings, memory)`` with a memory.
        """
        own = fn(self.embeddings, None)
        if self.same:
            return own
        memory = self.references[ops.shape(self.embeddings)[0]:]
        return ops.concatenate([own, fn(self.embeddings, memory)], axis=1)

    def narrowed(self, positive: Any, negative: Any) -> "PairBatch":
        """The same batch with the pair masks replaced (e.g. by a miner's choice)."""
        return replace(self, positive=positive, negative=negative)


def pair_batch(labels: Any, embeddings: Any, memory: Any | None = None,
               negative_mask: Any | None = None) -> PairBatch:
    """Labels ``[B]`` and embeddings ``[B, D]`` -> a `PairBatch` with every pair.

    Args:
        negative_mask: optional ``[B, N]`` bool: pairs outside it are not negatives (a
            weak label's semantic threshold).
        memory: optional ``(embeddings [M, D], labels [M], valid [M] bool)`` of a
            cross-batch memory (`atl_keras.losses.memory.CrossBatchMemory`): its rows are
            appended as columns (constants: no gradient flows into them); ``valid`` False
            marks empty slots.
    """
    embeddings = prepare_embeddings(embeddings)
    labels = prepare_labels(labels, embeddings.shape[0])
    positive, negative = pair_masks(labels)
    if memory is None:
        batch = PairBatch(embeddings, labels, embeddings, labels, positive, negative, True)
    else:
        batch = _with_memory(embeddings, labels, positive, negative, memory)
    if negative_mask is not None:
        batch = batch.narrowed(batch.positive, ops.logical_and(batch.negative, negative_mask))
    return batch


def mined_batch(labels: Any, embeddings: Any, memory: Any | None = None,
                negative_mask: Any | None = None, miner: Any | None = None) -> PairBatch:
    """`pair_batch` narrowed by an optional pair miner: what every pair loss starts from."""
    batch = pair_batch(labels, embeddings, memory, negative_mask)
    return batch if miner is None else miner.select_pairs(batch)


def pair_constants(values: Any | None, like: Any) -> Any | None:
    """Per-pair settings (weak-label margins) as constants in ``like``'s dtype (None stays)."""
    return None if values is None else ops.stop_gradient(ops.cast(values, like.dtype))


def _with_memory(embeddings: Any, labels: Any, positive: Any, negative: Any, memory: Any) -> PairBatch:
    mem_embeddings, mem_labels, mem_valid = memory
    mem_embeddings = ops.stop_gradient(ops.cast(mem_embeddings, embeddings.dtype))
    mem_labels = ops.cast(mem_labels, labels.dtype)
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(mem_labels, 0))
    valid = ops.expand_dims(ops.cast(mem_valid, "bool"), 0)
    return PairBatch(
        embeddings,
        labels,
        ops.concatenate([embeddings, mem_embeddings], axis=0),
        ops.concatenate([labels, mem_labels], axis=0),
        ops.concatenate([positive, ops.logical_and(same, valid)], axis=1),
        ops.concatenate([negative, ops.logical_and(ops.logical_not(same), valid)], axis=1),
        False,
    )


class PairLoss(MetricLoss):
    """Base of the pair losses: an optional pair miner, cross-batch memory and weak label.

    Subclasses implement ``compute(labels, embeddings, relaxations, negative_mask, memory)``
    (a pure function call) and extend ``get_config``.

    Args:
        miner: None, a `atl_keras.losses.pair_miners.PairMiner` or its name
            (``"multi_similarity"``).
        memory_size: ``M > 0`` keeps the last ``M`` embeddings of earlier batches
            (`atl_keras.losses.memory.CrossBatchMemory`, XBM) as extra pairs; needs
            ``embedding_dim``.
        embedding_dim: ``D`` of the memory.
        weak_label: None or a `atl_keras.margins.WeakLabelMargins` (or its config dict).
    """

    #: Whether the loss has a negative term a weak-label margin can relax.
    supports_weak_label = True

    def __init__(self, miner: Any = None, memory_size: int = 0, embedding_dim: int | None = None,
                 weak_label: Any = None, name: str | None = None,
                 reduction: str | None = "sum_over_batch_size", dtype: Any = "float32") -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        from atl_keras.losses.pair_miners import get_pair_miner
        from atl_keras.margins.weak_label import WeakLabelMargins

        self.miner = get_pair_miner(miner)
        if isinstance(weak_label, dict):
            weak_label = WeakLabelMargins.from_config(weak_label)
        if weak_label is not None and not isinstance(weak_label, WeakLabelMargins):
            raise ValueError(f"weak_label must be None or a WeakLabelMargins; got {weak_label!r}.")
        if weak_label is not None and not self.supports_weak_label:
            raise ValueError(f"{type(self).__name__} has no margin for a weak label; remove weak_label.")
        self.weak_label = weak_label
        self.memory = None
        if memory_size:
            from atl_keras.losses.memory import CrossBatchMemory

            if weak_label is not None and weak_label.needs_text:
                raise ValueError(
                    "A cross-batch memory holds no text embeddings: use weak-label margins from "
                    "a table (WeakLabelMargins(table=...)) with memory_size, or no memory."
                )
            self.memory = CrossBatchMemory(memory_size, embedding_dim)

    @property
    def needs_text(self) -> bool:  # noqa: D102
        return self.weak_label is not None and self.weak_label.needs_text

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels, text = split_targets(y_true, need_text=self.needs_text, loss_name=type(self).__name__)
        labels = prepare_labels(labels, None)
        memory = None if self.memory is None else self.memory.read()
        relaxations = negative_mask = None
        if self.weak_label is not None:
            columns = None if memory is None else ops.concatenate(
                [labels, ops.cast(memory[1], labels.dtype)], axis=0)
            relaxations, negative_mask = self.weak_label.relaxations(labels, text, columns)
        value = self.compute(labels, y_pred, relaxations, negative_mask, memory)
        if self.memory is not None:  # after the loss has read the memory
            self.memory.write(labels, y_pred)
        return value

    def compute(self, labels: Any, embeddings: Any, relaxations: Any, negative_mask: Any,
                memory: Any) -> Any:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "miner": None if self.miner is None else miner_config(self.miner),
            "memory_size": 0 if self.memory is None else self.memory.size,
            "embedding_dim": None if self.memory is None else self.memory.embedding_dim,
            "weak_label": None if self.weak_label is None else self.weak_label.get_config(),
        }

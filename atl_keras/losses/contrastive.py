"""Contrastive loss (Hadsell, Chopra, LeCun 2006) with PyTorch Metric Learning's semantics.

For L2-normalised embeddings and their Euclidean distance ``d`` (``distance="l2"``, PML's
default ``LpDistance``), every positive pair ``(a, p)`` costs ``relu(d_ap - pos_margin)``
and every negative pair ``(a, n)`` costs ``relu(m_an - d_an)`` with ``m_an = neg_margin``:

    L = mean_{positive pairs with a cost > 0} + mean_{negative pairs with a cost > 0}

(PML's ``AvgNonZeroReducer`` per pair sign; a sign without a costly pair adds 0). Pairs are
ordered (``(a, n)`` and ``(n, a)`` both count), as in PML.

Weak labels: ``neg_margins`` may be a ``[B, N]`` matrix of per-pair negative margins, e.g.
`atl_keras.margins.batch_margin_matrices` of the batch's text embeddings with the margin
range ``[min_margin, max_margin]`` (`ContrastiveLoss(weak_label=...)` builds it): negatives
whose descriptions say nearly the same are pushed only to ``min_margin``, unrelated ones to
``max_margin``. ``min_margin == max_margin == neg_margin`` gives exactly the plain loss.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.distances import l2_normalize, pairwise_distances, validate_distance
from atl_keras.losses.pairs import (
    PairLoss,
    mean_of_positive,
    mined_batch,
    pair_constants,
    validate_number,
)

__all__ = [
    "ContrastiveLoss",
    "contrastive_from_config",
    "weak_contrastive_from_config","contrastive_loss", "contrastive_pair_loss"]


def contrastive_pair_loss(distances: Any, positive: Any, negative: Any,
                          pos_margin: float, neg_margins: Any) -> Any:
    """The contrastive loss of a ``[B, N]`` distance matrix under pair masks.

    Args:
        distances: ``[B, N]`` float.
        positive, negative: ``[B, N]`` bool pair masks.
        pos_margin: float; neg_margins: float or ``[B, N]``.
    """
    pos_cost = ops.relu(distances - pos_margin)
    neg_cost = ops.relu(neg_margins - distances)
    return mean_of_positive(pos_cost, positive) + mean_of_positive(neg_cost, negative)


def contrastive_loss(
    labels: Any,
    embeddings: Any,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    distance: str = "l2",
    neg_margins: Any | None = None,
    negative_mask: Any | None = None,
    miner: Any | None = None,
    memory: Any | None = None,
) -> Any:
    """Contrastive loss of a batch (see the module docstring).

    Args:
        labels: ``[B]`` or ``[B, 1]`` integer class (item) ids.
        embeddings: ``[B, D]`` float; L2-normalised here (as PML's default distance does).
        pos_margin: positives closer than this cost nothing.
        neg_margin: negatives farther than this cost nothing.
        distance: ``"l2"`` (PML's default), ``"squared_l2"`` or ``"cosine"``.
        neg_margins: optional ``[B, N]`` per-pair negative margins (replaces
            ``neg_margin``; ``N = B``, or ``B + M`` with ``memory``).
        negative_mask: optional ``[B, N]`` bool; pairs outside it are not negatives.
        miner: optional pair miner (`atl_keras.losses.pair_miners`) narrowing the pairs.
        memory: optional ``(embeddings [M, D], labels [M], valid [M])`` extra columns
            (`atl_keras.losses.memory.CrossBatchMemory`).

    Returns:
        Float32 scalar (float64 for float64 inputs); 0.0 for a batch without a pair.

    Example:
        >>> contrastive_loss([0, 0, 1, 1], keras.ops.eye(4, 3))
    """
    distance = validate_distance(distance)
    pos_margin = validate_number(pos_margin, "pos_margin", 0.0)
    neg_margin = validate_number(neg_margin, "neg_margin", 0.0)
    batch = mined_batch(labels, embeddings, memory, negative_mask, miner)
    dist = batch.matrix(lambda x, y: pairwise_distances(
        l2_normalize(x), None if y is None else l2_normalize(y), distance=distance))
    margins = neg_margin if neg_margins is None else pair_constants(neg_margins, dist)
    return contrastive_pair_loss(dist, batch.positive, batch.negative, pos_margin, margins)


@keras.saving.register_keras_serializable(package="atl_keras")
class ContrastiveLoss(PairLoss):
    """Contrastive loss; see `contrastive_loss`. PML 2.9's ``ContrastiveLoss()`` by default.

    Args:
        pos_margin, neg_margin: ``>= 0``.
        distance: ``"l2"`` (PML's default), ``"squared_l2"`` or ``"cosine"``.
        miner, memory_size, embedding_dim, weak_label: see `atl_keras.losses.pairs.PairLoss`;
            a weak label lowers the negative margin to ``neg_margin - r_an``.

    ``y_true``: labels ``[B]`` or a dict with ``"label"`` (and ``"text_embedding"`` for a
    text weak label); ``y_pred``: ``[B, D]`` embeddings.

    Example:
        >>> model.compile(optimizer="adam", loss=ContrastiveLoss(neg_margin=0.8))
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, distance: str = "l2",
                 miner: Any = None, memory_size: int = 0, embedding_dim: int | None = None,
                 weak_label: Any = None, name: str = "contrastive_loss",
                 reduction: str | None = "sum_over_batch_size", dtype: Any = "float32") -> None:
        super().__init__(miner, memory_size, embedding_dim, weak_label, name, reduction, dtype)
        self.pos_margin = validate_number(pos_margin, "pos_margin", 0.0)
        self.neg_margin = validate_number(neg_margin, "neg_margin", 0.0)
        self.distance = validate_distance(distance)

    def compute(self, labels, embeddings, relaxations, negative_mask, memory):  # noqa: D102
        margins = None if relaxations is None else ops.maximum(self.neg_margin - relaxations, 0.0)
        return contrastive_loss(labels, embeddings, self.pos_margin, self.neg_margin, self.distance,
                                margins, negative_mask, self.miner, memory)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pos_margin": self.pos_margin,
                "neg_margin": self.neg_margin, "distance": self.distance}


def contrastive_from_config(config: Any, data: Any = None, item_text: Any = None) -> ContrastiveLoss:
    """``loss="contrastive"``: PML 2.9's defaults."""
    return ContrastiveLoss()


def weak_contrastive_from_config(config: Any, data: Any = None, item_text: Any = None) -> ContrastiveLoss:
    """``loss="weak_contrastive"``: the config's weak label (`weak_label_from_config`)."""
    from atl_keras.margins.weak_label import weak_label_from_config

    return ContrastiveLoss(weak_label=weak_label_from_config(config, data, item_text))

"""Circle loss (Sun et al., CVPR 2020) for pair labels, with PyTorch Metric Learning's semantics.

On cosine similarities ``s``, with relaxation ``m`` and scale ``gamma``: optima
``O_p = 1 + m``, ``O_n = -m`` and decision margins ``Delta_p = 1 - m``, ``Delta_n = m``;
the weights ``relu(O_p - s_ap)`` and ``relu(s_an - O_n)`` are constants (no gradient).
Per anchor ``a`` with a positive and a negative:

    L_a = softplus( logsumexp_{p in P_a} (-gamma relu(O_p - s_ap) (s_ap - Delta_p))
                  + logsumexp_{n in N_a} ( gamma relu(s_an - O_n) (s_an - Delta_n)) )

mean over the anchors whose ``L_a > 0`` (PML's ``AvgNonZeroReducer``); 0 without such an
anchor.

Weak labels: ``neg_relaxations`` may be a ``[B, N]`` matrix of per-pair ``m_an`` for the
negatives (``O_n = -m_an``, ``Delta_n = m_an``). A larger relaxation lets a negative stay
more similar, so `CircleLoss(weak_label=...)` gives negatives with nearly the same
description the largest ``m`` and unrelated ones the smallest:
``m_an = m + max_margin - t_an`` with ``t_an`` ATL's margin mapping onto
``[min_margin, max_margin]``; ``min_margin == max_margin`` gives exactly the plain loss.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.losses.pairs import (
    PairLoss,
    cosine_similarities,
    masked_logsumexp,
    mean_of_positive,
    mined_batch,
    pair_constants,
    validate_number,
)

__all__ = [
    "CircleLoss",
    "circle_from_config",
    "weak_circle_from_config","circle_loss", "circle_pair_loss"]


def circle_pair_loss(similarities: Any, positive: Any, negative: Any, m: float, gamma: float,
                     neg_relaxations: Any | None = None) -> Any:
    """The circle loss of a ``[B, N]`` similarity matrix under pair masks."""
    fixed = ops.stop_gradient(similarities)
    m_n = m if neg_relaxations is None else neg_relaxations
    logit_p = -gamma * ops.relu(1.0 + m - fixed) * (similarities - (1.0 - m))
    logit_n = gamma * ops.relu(fixed + m_n) * (similarities - m_n)
    total = masked_logsumexp(logit_p, positive) + masked_logsumexp(logit_n, negative)
    valid = ops.logical_and(ops.any(positive, axis=1), ops.any(negative, axis=1))
    losses = ops.where(valid, ops.softplus(ops.where(valid, total, ops.zeros_like(total))),
                       ops.zeros_like(total))
    return mean_of_positive(losses)


def circle_loss(
    labels: Any,
    embeddings: Any,
    m: float = 0.4,
    gamma: float = 80.0,
    neg_relaxations: Any | None = None,
    negative_mask: Any | None = None,
    miner: Any | None = None,
    memory: Any | None = None,
) -> Any:
    """Circle loss of a batch (see the module docstring).

    Args:
        labels: ``[B]`` or ``[B, 1]`` integer class (item) ids.
        embeddings: ``[B, D]`` float (normalised here).
        m: the relaxation factor; gamma: ``> 0``, the scale.
        neg_relaxations: optional ``[B, N]`` per-pair ``m`` of the negatives.
        negative_mask: optional ``[B, N]`` bool; pairs outside it are not negatives.
        miner: optional pair miner (`atl_keras.losses.pair_miners`) narrowing the pairs.
        memory: optional ``(embeddings [M, D], labels [M], valid [M])`` extra columns
            (`atl_keras.losses.memory.CrossBatchMemory`).

    Returns:
        Float32 scalar (float64 for float64 inputs); 0.0 for a batch without an anchor
        that has both a positive and a negative.
    """
    m = validate_number(m, "m", 0.0)
    gamma = validate_number(gamma, "gamma", 0.0, strict=True)
    batch = mined_batch(labels, embeddings, memory, negative_mask, miner)
    sim = batch.matrix(cosine_similarities)
    return circle_pair_loss(sim, batch.positive, batch.negative, m, gamma,
                            pair_constants(neg_relaxations, sim))


@keras.saving.register_keras_serializable(package="atl_keras")
class CircleLoss(PairLoss):
    """Circle loss; see `circle_loss`. PML 2.9's ``CircleLoss()`` by default.

    Args:
        m: the relaxation factor; gamma: ``> 0``, the scale.
        miner, memory_size, embedding_dim, weak_label: see `atl_keras.losses.pairs.PairLoss`;
            a weak label relaxes the negatives to ``m + r_an``.
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0, miner: Any = None,
                 memory_size: int = 0, embedding_dim: int | None = None, weak_label: Any = None,
                 name: str = "circle_loss", reduction: str | None = "sum_over_batch_size",
                 dtype: Any = "float32") -> None:
        super().__init__(miner, memory_size, embedding_dim, weak_label, name, reduction, dtype)
        self.m = validate_number(m, "m", 0.0)
        self.gamma = validate_number(gamma, "gamma", 0.0, strict=True)

    def compute(self, labels, embeddings, relaxations, negative_mask, memory):  # noqa: D102
        relax = None if relaxations is None else self.m + relaxations
        return circle_loss(labels, embeddings, self.m, self.gamma, relax, negative_mask,
                           self.miner, memory)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "m": self.m, "gamma": self.gamma}


def circle_from_config(config: Any, data: Any = None, item_text: Any = None) -> CircleLoss:
    """``loss="circle"``: PML 2.9's defaults."""
    return CircleLoss()


def weak_circle_from_config(config: Any, data: Any = None, item_text: Any = None) -> CircleLoss:
    """``loss="weak_circle"``: the config's weak label (`weak_label_from_config`)."""
    from atl_keras.margins.weak_label import weak_label_from_config

    return CircleLoss(weak_label=weak_label_from_config(config, data, item_text))

"""Supervised contrastive loss (Khosla et al., NeurIPS 2020) with PyTorch Metric Learning's
semantics; with one positive per anchor (two views of each item) it is NT-Xent (SimCLR).

On cosine similarities ``s`` and temperature ``T``, per anchor ``a`` with positives ``P_a``:

    L_a = -1/|P_a| sum_{p in P_a} ( s_ap / T - log sum_{j in P_a u N_a} e^{s_aj / T} )

mean over the anchors with ``L_a > 0`` (PML's ``AvgNonZeroReducer``). A batch without any
positive pair or without any negative pair gives 0, as in PML.
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
    validate_number,
)

__all__ = [
    "SupConLoss",
    "supcon_from_config","supcon_loss", "supcon_pair_loss"]


def supcon_pair_loss(similarities: Any, positive: Any, negative: Any, temperature: float) -> Any:
    """The SupCon loss of a ``[B, N]`` similarity matrix under pair masks."""
    logits = similarities / temperature
    log_norm = masked_logsumexp(logits, ops.logical_or(positive, negative))
    log_prob = logits - ops.expand_dims(log_norm, 1)
    count = ops.sum(ops.cast(positive, logits.dtype), axis=1)
    total = ops.sum(ops.where(positive, log_prob, ops.zeros_like(log_prob)), axis=1)
    losses = -total / ops.maximum(count, 1.0)
    loss = mean_of_positive(losses)
    both = ops.logical_and(ops.any(positive), ops.any(negative))
    return ops.where(both, loss, ops.zeros_like(loss))


def supcon_loss(
    labels: Any,
    embeddings: Any,
    temperature: float = 0.1,
    negative_mask: Any | None = None,
    miner: Any | None = None,
    memory: Any | None = None,
) -> Any:
    """Supervised contrastive loss of a batch (see the module docstring).

    Args:
        labels: ``[B]`` or ``[B, 1]`` integer class (item) ids.
        embeddings: ``[B, D]`` float (normalised here).
        temperature: ``T > 0``.
        negative_mask: optional ``[B, N]`` bool; pairs outside it are not negatives.
        miner: optional pair miner (`atl_keras.losses.pair_miners`) narrowing the pairs.
        memory: optional ``(embeddings [M, D], labels [M], valid [M])`` extra columns
            (`atl_keras.losses.memory.CrossBatchMemory`).

    Returns:
        Float32 scalar (float64 for float64 inputs).
    """
    temperature = validate_number(temperature, "temperature", 0.0, strict=True)
    batch = mined_batch(labels, embeddings, memory, negative_mask, miner)
    sim = batch.matrix(cosine_similarities)
    return supcon_pair_loss(sim, batch.positive, batch.negative, temperature)


@keras.saving.register_keras_serializable(package="atl_keras")
class SupConLoss(PairLoss):
    """Supervised contrastive loss (NT-Xent with labels); see `supcon_loss`. PML 2.9's
    ``SupConLoss()`` by default. It has no margin, so no weak label.

    Args:
        temperature: ``T > 0``.
        miner, memory_size, embedding_dim: see `atl_keras.losses.pairs.PairLoss`.
    """

    supports_weak_label = False

    def __init__(self, temperature: float = 0.1, miner: Any = None, memory_size: int = 0,
                 embedding_dim: int | None = None, weak_label: Any = None,
                 name: str = "supcon_loss", reduction: str | None = "sum_over_batch_size",
                 dtype: Any = "float32") -> None:
        super().__init__(miner, memory_size, embedding_dim, weak_label, name, reduction, dtype)
        self.temperature = validate_number(temperature, "temperature", 0.0, strict=True)

    def compute(self, labels, embeddings, relaxations, negative_mask, memory):  # noqa: D102
        return supcon_loss(labels, embeddings, self.temperature, negative_mask, self.miner, memory)

    def get_config(self) -> dict[str, Any]:
        config = {**super().get_config(), "temperature": self.temperature}
        config.pop("weak_label")
        return config


def supcon_from_config(config: Any, data: Any = None, item_text: Any = None) -> SupConLoss:
    """``loss="supcon"``: PML 2.9's default temperature 0.1."""
    return SupConLoss()

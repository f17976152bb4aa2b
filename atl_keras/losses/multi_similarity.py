"""Multi-similarity loss (Wang et al., CVPR 2019) with PyTorch Metric Learning's semantics.

On cosine similarities ``s`` of the L2-normalised embeddings, per anchor ``a``:

    L_a = 1/alpha log(1 + sum_{p in P_a} e^{-alpha (s_ap - base)})
        + 1/beta  log(1 + sum_{n in N_a} e^{ beta (s_an - b_an)})

with ``b_an = base``, mean over all ``B`` anchors (PML's ``MeanReducer``; an anchor without
pairs adds 0). PML pairs this loss with its ``MultiSimilarityMiner``
(`atl_keras.losses.pair_miners.MultiSimilarityMiner`, ``epsilon``), which keeps the
positives less similar than the hardest negative plus epsilon and the negatives more
similar than the hardest positive minus epsilon: pass it as ``miner``.

Weak labels: ``neg_bases`` may be a ``[B, N]`` matrix of per-pair negative bases ``b_an``.
`MultiSimilarityLoss(weak_label=...)` builds it from the batch's text embeddings: a
negative whose description says nearly the same may stay as similar as ``base + spread``
(pushed gently), an unrelated one only as similar as ``base`` —
``b_an = base + max_margin - m_an`` with ``m_an`` ATL's margin mapping onto
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
    mined_batch,
    pair_constants,
    validate_number,
)

__all__ = [
    "MultiSimilarityLoss",
    "multi_similarity_from_config",
    "weak_multi_similarity_from_config","multi_similarity_loss", "multi_similarity_pair_loss"]


def multi_similarity_pair_loss(similarities: Any, positive: Any, negative: Any, alpha: float,
                               beta: float, base: float, neg_bases: Any | None = None) -> Any:
    """The multi-similarity loss of a ``[B, N]`` similarity matrix under pair masks."""
    neg_base = base if neg_bases is None else neg_bases
    pos = masked_logsumexp(-alpha * (similarities - base), positive, add_one=True) / alpha
    neg = masked_logsumexp(beta * (similarities - neg_base), negative, add_one=True) / beta
    return ops.mean(pos + neg)


def multi_similarity_loss(
    labels: Any,
    embeddings: Any,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    neg_bases: Any | None = None,
    negative_mask: Any | None = None,
    miner: Any | None = None,
    memory: Any | None = None,
) -> Any:
    """Multi-similarity loss of a batch (see the module docstring).

    Args:
        labels: ``[B]`` or ``[B, 1]`` integer class (item) ids.
        embeddings: ``[B, D]`` float (normalised here).
        alpha, beta: ``> 0``, the positive and negative scales.
        base: the similarity threshold ``lambda``.
        neg_bases: optional ``[B, N]`` per-pair negative bases (replace ``base`` for the
            negatives; ``N = B``, or ``B + M`` with ``memory``).
        negative_mask: optional ``[B, N]`` bool; pairs outside it are not negatives.
        miner: optional pair miner (`atl_keras.losses.pair_miners`) narrowing the pairs.
        memory: optional ``(embeddings [M, D], labels [M], valid [M])`` extra columns
            (`atl_keras.losses.memory.CrossBatchMemory`).

    Returns:
        Float32 scalar (float64 for float64 inputs); 0.0 for a batch without a pair.
    """
    alpha = validate_number(alpha, "alpha", 0.0, strict=True)
    beta = validate_number(beta, "beta", 0.0, strict=True)
    base = float(validate_number(base, "base"))
    batch = mined_batch(labels, embeddings, memory, negative_mask, miner)
    sim = batch.matrix(cosine_similarities)
    return multi_similarity_pair_loss(sim, batch.positive, batch.negative, alpha, beta, base,
                                      pair_constants(neg_bases, sim))


@keras.saving.register_keras_serializable(package="atl_keras")
class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss; see `multi_similarity_loss`. PML 2.9's
    ``MultiSimilarityLoss()`` by default; ``miner="multi_similarity"`` (or a
    `MultiSimilarityMiner(epsilon)`) adds PML's miner.

    Args:
        alpha, beta: ``> 0``; base: the similarity threshold.
        miner, memory_size, embedding_dim, weak_label: see `atl_keras.losses.pairs.PairLoss`;
            a weak label raises the negative base to ``base + r_an``.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 miner: Any = None, memory_size: int = 0, embedding_dim: int | None = None,
                 weak_label: Any = None, name: str = "multi_similarity_loss",
                 reduction: str | None = "sum_over_batch_size", dtype: Any = "float32") -> None:
        super().__init__(miner, memory_size, embedding_dim, weak_label, name, reduction, dtype)
        self.alpha = validate_number(alpha, "alpha", 0.0, strict=True)
        self.beta = validate_number(beta, "beta", 0.0, strict=True)
        self.base = validate_number(base, "base")

    def compute(self, labels, embeddings, relaxations, negative_mask, memory):  # noqa: D102
        bases = None if relaxations is None else self.base + relaxations
        return multi_similarity_loss(labels, embeddings, self.alpha, self.beta, self.base, bases,
                                     negative_mask, self.miner, memory)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta, "base": self.base}


def multi_similarity_from_config(config: Any, data: Any = None, item_text: Any = None) -> MultiSimilarityLoss:
    """``loss="multi_similarity"``: PML 2.9's defaults and its MultiSimilarityMiner."""
    return MultiSimilarityLoss(miner="multi_similarity")


def weak_multi_similarity_from_config(config: Any, data: Any = None, item_text: Any = None) -> MultiSimilarityLoss:
    """``loss="weak_multi_similarity"``: the config's weak label (`weak_label_from_config`)."""
    from atl_keras.margins.weak_label import weak_label_from_config

    return MultiSimilarityLoss(miner="multi_similarity", weak_label=weak_label_from_config(config, data, item_text))

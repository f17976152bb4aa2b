"""Pair miners: choose which positive and negative pairs a loss sees.

A pair miner narrows the pair masks of a `atl_keras.losses.pairs.PairBatch`
(``select_pairs(batch) -> batch``); every pair loss (contrastive, multi-similarity,
circle, SupCon) takes one as ``miner=``, with or without a cross-batch memory. The same
objects are `atl_keras.losses.mining.Miner` s, so the triplet losses take them as
``mining=`` too (the triplets are then every mined positive pair with every mined negative
of its anchor, reduced like ``batch_all``).

- `MultiSimilarityMiner` (Wang et al. 2019, PyTorch Metric Learning's semantics): on
  cosine similarities, keep a positive ``(a, p)`` if ``s_ap - epsilon < max_n s_an`` and a
  negative ``(a, n)`` if ``s_an + epsilon > min_p s_ap``; nothing when the batch has no
  positive or no negative pair.
- `DistanceWeightedMiner` (Wu et al. 2017): per positive pair ``(a, p)``, one negative
  drawn with probability proportional to ``q(d_an)^-1``, the inverse density of distances
  between points uniform on the unit sphere of dimension ``D``,
  ``log q(d) = (D - 2) log d + (D - 3) / 2 log(1 - d^2 / 4)``, with ``d`` clipped below at
  ``cutoff`` and negatives at ``d >= nonzero_loss_cutoff`` never drawn. Random: pass a
  ``seed`` for reproducible draws.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.distances import l2_normalize, pairwise_distances
from atl_keras.losses.mining import BatchAllMiner, Miner
from atl_keras.losses.pairs import PairBatch, cosine_similarities, validate_number

__all__ = [
    "PAIR_MINERS",
    "DistanceWeightedMiner",
    "MultiSimilarityMiner",
    "PairMiner",
    "get_pair_miner",
    "multi_similarity_pairs",
]


def _row_extreme(values: Any, mask: Any, largest: bool) -> Any:
    """Row max (``largest``) or min of ``values`` over ``mask``; ``[B, 1]``, finite."""
    big = ops.stop_gradient(ops.max(ops.abs(values))) + 1.0
    fill = -big if largest else big
    masked = ops.where(mask, values, ops.zeros_like(values) + fill)
    reduce = ops.max if largest else ops.min
    return reduce(masked, axis=1, keepdims=True)


def multi_similarity_pairs(similarities: Any, positive: Any, negative: Any,
                           epsilon: float) -> tuple[Any, Any]:
    """PML's multi-similarity mining on a ``[B, N]`` *similarity* matrix -> (positive, negative).

    A positive is kept if it is less similar than the row's most similar negative plus
    ``epsilon``, a negative if it is more similar than the row's least similar positive minus
    ``epsilon``. A row without negatives keeps no positive and vice versa; a batch without
    any positive or any negative pair keeps nothing.
    """
    has_pos = ops.any(positive, axis=1, keepdims=True)
    has_neg = ops.any(negative, axis=1, keepdims=True)
    hardest_neg = _row_extreme(similarities, negative, largest=True)
    hardest_pos = _row_extreme(similarities, positive, largest=False)
    keep_pos = positive & has_neg & ops.less(similarities - epsilon, hardest_neg)
    keep_neg = negative & has_pos & ops.greater(similarities + epsilon, hardest_pos)
    both = ops.logical_and(ops.any(positive), ops.any(negative))
    return ops.logical_and(keep_pos, both), ops.logical_and(keep_neg, both)


class PairMiner(Miner):
    """A miner that chooses pairs: ``select_pairs(batch) -> batch`` for the pair losses.

    As a triplet `Miner` (``TripletLoss(mining=PairMiner(...))``), its triplets are every
    kept positive pair with every kept negative of the same anchor, reduced like
    ``batch_all`` (the mean hinge over the violating ones).
    """

    def select_pairs(self, batch: PairBatch) -> PairBatch:
        raise NotImplementedError

    def select_from_distances(self, distances: Any, positive: Any, negative: Any) -> tuple[Any, Any]:
        """The kept (positive, negative) masks from a ``[B, B]`` distance matrix."""
        raise NotImplementedError

    def mine(self, dist, margins, positive, negative, soft_margin, slots):  # noqa: D102
        positive, negative = self.select_from_distances(ops.stop_gradient(dist), positive, negative)
        return BatchAllMiner().mine(dist, margins, positive, negative, soft_margin, slots)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PairMiner":
        return cls(**config)


@keras.saving.register_keras_serializable(package="atl_keras")
class MultiSimilarityMiner(PairMiner):
    """Multi-similarity pair mining (Wang et al. 2019) with PML's ``epsilon``.

    On cosine similarities for the pair losses. As a triplet miner it reads the triplet
    loss' distance instead: a positive is kept if ``d_ap + epsilon > min_n d_an``, a
    negative if ``d_an - epsilon < max_p d_ap`` (PML's rule for distances).
    """

    name = "multi_similarity"

    def __init__(self, epsilon: float = 0.1) -> None:
        self.epsilon = validate_number(epsilon, "epsilon", 0.0)

    def select_pairs(self, batch: PairBatch) -> PairBatch:  # noqa: D102
        sim = ops.stop_gradient(batch.matrix(cosine_similarities))
        return batch.narrowed(*multi_similarity_pairs(sim, batch.positive, batch.negative,
                                                      self.epsilon))

    def select_from_distances(self, distances, positive, negative):  # noqa: D102
        return multi_similarity_pairs(-distances, positive, negative, self.epsilon)

    def get_config(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    def __repr__(self) -> str:
        return f"MultiSimilarityMiner(epsilon={self.epsilon})"


@keras.saving.register_keras_serializable(package="atl_keras")
class DistanceWeightedMiner(PairMiner):
    """Distance-weighted negative sampling (Wu et al. 2017); see the module docstring.

    Args:
        cutoff: distances below it count as ``cutoff`` (PML's default 0.5).
        nonzero_loss_cutoff: negatives at least this far are never drawn (1.4).
        negatives_per_anchor: how many negatives each anchor draws (with replacement; the
            kept negatives are the distinct ones). PML draws one per positive pair.
        seed: seed of the draws (an int, or None for a random one).
        embedding_dim: ``D``, needed only as a triplet miner (a pair loss reads it from the
            embeddings).

    Distances are Euclidean between the L2-normalised embeddings (PML's ``LpDistance``); as
    a triplet miner it reads the triplet loss' distance matrix, which must then be
    ``"l2"`` (``TripletLoss(distance="l2", mining=DistanceWeightedMiner(embedding_dim=D))``). The draws use a `keras.random.SeedGenerator` (TensorFlow: a variable that
    advances every call, also inside ``tf.function``).
    """

    name = "distance_weighted"

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4,
                 negatives_per_anchor: int = 1, seed: int | None = None,
                 embedding_dim: int | None = None) -> None:
        self.cutoff = validate_number(cutoff, "cutoff", 0.0, strict=True)
        self.nonzero_loss_cutoff = validate_number(nonzero_loss_cutoff, "nonzero_loss_cutoff",
                                                   self.cutoff, strict=True)
        if isinstance(negatives_per_anchor, bool) or not isinstance(negatives_per_anchor, int) \
                or negatives_per_anchor < 1:
            raise ValueError(f"negatives_per_anchor must be an int >= 1; got {negatives_per_anchor!r}.")
        self.negatives_per_anchor = negatives_per_anchor
        self.seed = seed
        if embedding_dim is not None and (isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int)
                                          or embedding_dim < 1):
            raise ValueError(f"embedding_dim must be None or an int >= 1; got {embedding_dim!r}.")
        self.embedding_dim = embedding_dim
        self._seed_generator: keras.random.SeedGenerator | None = None

    def log_weights(self, distances: Any, dim: Any) -> Any:
        """``log q(d)^-1`` of ``[B, N]`` unit-sphere distances in dimension ``dim`` (clipped)."""
        d = ops.maximum(distances, self.cutoff)
        dim = ops.cast(dim, d.dtype)
        inside = ops.maximum(1.0 - 0.25 * ops.square(d), 1e-8)
        return (2.0 - dim) * ops.log(d) - (dim - 3.0) / 2.0 * ops.log(inside)

    def sample_negatives(self, distances: Any, negative: Any, dim: Any) -> Any:
        """``[B, N]`` bool: the drawn negatives (a row with nothing to draw keeps none)."""
        drawable = ops.logical_and(negative, ops.less(distances, self.nonzero_loss_cutoff))
        logits = self.log_weights(distances, dim)
        floor = ops.full_like(logits, -1e30 if not str(logits.dtype).endswith("float64") else -1e300)
        logits = ops.where(drawable, logits, floor)
        if self._seed_generator is None:
            self._seed_generator = keras.random.SeedGenerator(self.seed)
        columns = keras.random.categorical(logits, self.negatives_per_anchor,
                                           seed=self._seed_generator)
        width = ops.shape(distances)[1]
        drawn = ops.sum(ops.one_hot(columns, width, dtype="int32"), axis=1) > 0
        return ops.logical_and(drawn, ops.any(drawable, axis=1, keepdims=True))

    def _select(self, distances: Any, positive: Any, negative: Any, dim: Any) -> tuple[Any, Any]:
        negatives = self.sample_negatives(distances, negative, dim)
        has_negative = ops.any(negatives, axis=1, keepdims=True)
        return ops.logical_and(positive, has_negative), negatives

    def select_pairs(self, batch: PairBatch) -> PairBatch:  # noqa: D102
        def unit_l2(x: Any, y: Any) -> Any:
            return pairwise_distances(l2_normalize(x), None if y is None else l2_normalize(y), "l2")

        distances = ops.stop_gradient(batch.matrix(unit_l2))
        dim = ops.shape(batch.embeddings)[1]
        return batch.narrowed(*self._select(distances, batch.positive, batch.negative, dim))

    def select_from_distances(self, distances, positive, negative):  # noqa: D102
        if self.embedding_dim is None:
            raise ValueError(
                "DistanceWeightedMiner as a triplet miner needs the embedding size: pass "
                "DistanceWeightedMiner(embedding_dim=D) (and TripletLoss(distance='l2'))."
            )
        return self._select(distances, positive, negative, self.embedding_dim)

    def get_config(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff, "nonzero_loss_cutoff": self.nonzero_loss_cutoff,
                "negatives_per_anchor": self.negatives_per_anchor, "seed": self.seed,
                "embedding_dim": self.embedding_dim}

    def __repr__(self) -> str:
        return (f"DistanceWeightedMiner(cutoff={self.cutoff}, "
                f"nonzero_loss_cutoff={self.nonzero_loss_cutoff}, "
                f"negatives_per_anchor={self.negatives_per_anchor}, seed={self.seed}, "
                f"embedding_dim={self.embedding_dim})")


#: Pair miners by name (``miner="multi_similarity"``).
PAIR_MINERS: dict[str, type[PairMiner]] = {
    cls.name: cls for cls in (MultiSimilarityMiner, DistanceWeightedMiner)
}


def get_pair_miner(miner: Any) -> PairMiner | None:
    """None, a `PairMiner`, its name or its Keras config dict -> a `PairMiner` (or None)."""
    if miner is None or isinstance(miner, PairMiner):
        return miner
    if isinstance(miner, dict):
        miner = keras.saving.deserialize_keras_object(miner)
        if isinstance(miner, PairMiner):
            return miner
    elif isinstance(miner, str) and miner in PAIR_MINERS:
        return PAIR_MINERS[miner]()
    raise ValueError(
        f"Unknown pair miner {miner!r}: pass None, a PairMiner or one of "
        f"{', '.join(repr(n) for n in PAIR_MINERS)}."
    )

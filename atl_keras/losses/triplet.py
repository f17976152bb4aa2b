"""Triplet losses: the baseline and the weakly supervised adaptive triplet loss (ATL).

Each is a pure function of tensors written with `keras.ops` (TensorFlow, JAX and PyTorch
backends) plus a thin `keras.losses.Loss` (`MetricLoss`) that holds the configuration.

Definitions (``B`` = batch size, ``d`` = the chosen distance):

- A valid triplet ``(a, p, n)`` has ``a != p``, ``label[a] == label[p]`` and
  ``label[a] != label[n]``. With ATL's ``semantic_threshold`` tau, an ``n`` whose
  text distance ``d(g_a, g_n) < tau`` is *not* a negative of ``a``.
- ``x_apn = d_ap - d_an + m_an``; the loss of a triplet is ``hinge(x) = max(0, x)``
  or, with ``soft_margin=True``, ``softplus(x)``.
- Triplet baseline: ``m_an = margin``. ATL:
  ``m_an = min_margin + (max_margin - min_margin) * d(g_a, g_n) / d_max`` where
  ``g`` are L2-normalised text embeddings (constants) and ``d_max`` is
  `atl_keras.distances.max_distance` (the mapping and the per-batch matrices live in
  `atl_keras.margins`). ``min_margin == max_margin == m`` gives exactly the baseline
  with ``margin=m``.
- Missing descriptions: `atl_keras.text` gives an item without a description
  an *all-zero* text embedding ("unknown text"). Any anchor-negative pair where
  either text embedding is all-zero gets ``m_an = missing_text_margin``
  (default: the midpoint ``(min_margin + max_margin) / 2``) and is never
  removed by ``semantic_threshold``. So a batch whose texts are all missing is
  exactly the baseline with ``margin=missing_text_margin``.

Mining (which triplets, and their mean) is a `atl_keras.losses.mining.Miner`;
``mining="batch_hard"`` names one. A batch without a valid triplet (B=1, one label only,
singletons only) gives a loss of exactly 0.0 with finite (zero) gradients.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.distances import compute_dtype, pairwise_distances, validate_distance
from atl_keras.losses.base import (
    MetricLoss,
    pair_masks,
    prepare_embeddings,
    prepare_labels,
    split_targets,
)
from atl_keras.losses.mining import (
    Miner,
    batch_all_hinge_sums,
    get_miner,
    miner_config,
    safe_mean,
    validate_max_images,
    validate_soft_margin,
)
from atl_keras.margins.batch import batch_margin_matrices
from atl_keras.margins.checks import (
    validate_adaptive_margins,
    validate_margin,
    validate_missing_text_margin,
)

__all__ = [
    "AdaptiveTripletLoss",
    "TripletLoss",
    "adaptive_triplet_loss",
    "margin_triplet_loss",
    "triplet_loss",
    "triplet_statistics",
]


def margin_triplet_loss(
    labels: Any,
    distances: Any,
    margins: Any,
    mining: str | Miner = "batch_hard",
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
        mining: ``"batch_all"``, ``"batch_hard"``, ``"semi_hard"`` or a
            `atl_keras.losses.mining.Miner`.
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
    miner = get_miner(mining)
    soft_margin = validate_soft_margin(soft_margin)
    max_images_per_label = validate_max_images(max_images_per_label)
    distances = ops.convert_to_tensor(distances)
    distances = ops.cast(distances, compute_dtype(distances))
    margins = ops.cast(ops.convert_to_tensor(margins), distances.dtype)
    labels = prepare_labels(labels, distances.shape[0])
    positive, negative = pair_masks(labels)
    if negative_mask is not None:
        negative = ops.logical_and(negative, ops.cast(negative_mask, "bool"))
    return miner(distances, margins, positive, negative, soft_margin, max_images_per_label)



def triplet_loss(
    labels: Any,
    embeddings: Any,
    margin: float = 0.2,
    mining: str | Miner = "batch_hard",
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
    margin = validate_margin(margin, "margin")
    distance = validate_distance(distance)
    embeddings = prepare_embeddings(embeddings)
    labels = prepare_labels(labels, embeddings.shape[0])
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
    mining: str | Miner = "batch_hard",
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
    min_margin, max_margin, semantic_threshold = validate_adaptive_margins(
        min_margin, max_margin, distance, semantic_threshold
    )
    missing_text_margin = validate_missing_text_margin(missing_text_margin, min_margin, max_margin)
    embeddings = prepare_embeddings(embeddings)
    labels = prepare_labels(labels, embeddings.shape[0])
    dist = pairwise_distances(embeddings, distance=distance)
    margins, negative_mask, _ = batch_margin_matrices(
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
    embeddings = ops.stop_gradient(prepare_embeddings(embeddings))
    labels = prepare_labels(labels, embeddings.shape[0])
    dist = pairwise_distances(embeddings, distance=distance)
    positive, negative = pair_masks(labels)
    if text_embeddings is None:
        margin = validate_margin(margin, "margin")
        margins = ops.zeros_like(dist) + margin
    else:
        min_margin, max_margin, semantic_threshold = validate_adaptive_margins(
            min_margin, max_margin, distance, semantic_threshold
        )
        missing_text_margin = validate_missing_text_margin(
            missing_text_margin, min_margin, max_margin
        )
        margins, mask, _ = batch_margin_matrices(
            text_embeddings, labels, min_margin, max_margin, distance, missing_text_margin,
            semantic_threshold,
        )
        margins = ops.cast(margins, dist.dtype)
        if mask is not None:
            negative = ops.logical_and(negative, mask)
    _, active, margin_sum, _ = batch_all_hinge_sums(dist, margins - dist, positive, negative, margins)
    posf = ops.cast(positive, dist.dtype)
    negf = ops.cast(negative, dist.dtype)
    valid = ops.sum(ops.sum(posf, axis=1) * ops.sum(negf, axis=1))
    return {
        "num_valid_triplets": valid,
        "num_active_triplets": active,
        "fraction_active": safe_mean(active, valid),
        "mean_active_margin": safe_mean(margin_sum, active),
        "mean_positive_distance": safe_mean(ops.sum(dist * posf), ops.sum(posf)),
        "mean_negative_distance": safe_mean(ops.sum(dist * negf), ops.sum(negf)),
    }


@keras.saving.register_keras_serializable(package="atl_keras")
class TripletLoss(MetricLoss):
    """Triplet loss with a constant margin; see `triplet_loss`.

    Args:
        margin: ``m >= 0``.
        mining: ``"batch_all"`` | ``"batch_hard"`` | ``"semi_hard"``, or a
            `atl_keras.losses.mining.Miner` (``get_config`` stores it, `miner_config`).
        distance: ``"squared_l2"`` | ``"l2"`` | ``"cosine"``.
        soft_margin: softplus instead of the hinge.
        max_images_per_label: optional ``K`` of P x K batches (a speed hint,
            see `margin_triplet_loss`).

    ``y_true`` is the labels ``[B]`` (or ``[B, 1]``) or a dict with a
    ``"label"`` entry (other entries are ignored); ``y_pred`` is ``[B, D]``
    embeddings. Works in any Keras model's ``compile``/``fit`` with label
    targets (see `AdaptiveTripletLoss` for dict targets).

    Example:
        >>> model.compile(optimizer="adam", loss=TripletLoss(mining="semi_hard"))
        >>> model.fit(images, item_ids, batch_size=64)
    """

    def __init__(
        self,
        margin: float = 0.2,
        mining: str | Miner = "batch_hard",
        distance: str = "squared_l2",
        soft_margin: bool = False,
        name: str = "triplet_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype: Any = "float32",
        max_images_per_label: int | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.margin = validate_margin(margin, "margin")
        self.miner = get_miner(mining)
        self.mining = self.miner.name
        self.distance = validate_distance(distance)
        self.soft_margin = validate_soft_margin(soft_margin)
        self.max_images_per_label = validate_max_images(max_images_per_label)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels, _ = split_targets(y_true, need_text=False, loss_name=type(self).__name__)
        return triplet_loss(
            labels,
            y_pred,
            margin=self.margin,
            mining=self.miner,
            distance=self.distance,
            soft_margin=self.soft_margin,
            max_images_per_label=self.max_images_per_label,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "margin": self.margin,
            "mining": miner_config(self.miner),
            "distance": self.distance,
            "soft_margin": self.soft_margin,
            "max_images_per_label": self.max_images_per_label,
        }


@keras.saving.register_keras_serializable(package="atl_keras")
class AdaptiveTripletLoss(MetricLoss):
    """Weakly supervised adaptive triplet loss; see `adaptive_triplet_loss`.

    Args:
        min_margin, max_margin: ``0 <= min_margin <= max_margin``.
        mining: ``"batch_all"`` | ``"batch_hard"`` | ``"semi_hard"`` or a `Miner`.
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
    ``y_pred`` is ``[B, D]`` embeddings. Keras' ``CompileLoss`` cannot hand such
    a dict to one output of a plain ``keras.Model``: build the model as
    `atl_keras.MetricModel(inputs, outputs)` (or `ATLModel`), whose
    ``compute_loss`` passes each output its whole target (nested per output in
    multi-output models), or opt in to `install_keras_target_support`.

    Example:
        >>> inputs = keras.Input((28, 28, 1))
        >>> x = keras.layers.Dense(64)(keras.layers.Flatten()(inputs))
        >>> model = atl_keras.MetricModel(inputs, keras.layers.UnitNormalization()(x))
        >>> model.compile(optimizer="adam", loss=AdaptiveTripletLoss(mining="semi_hard"))
        >>> model.fit(pk_dataset)  # yields (images, {"label": ..., "text_embedding": ...})
    """

    needs_text = True

    def __init__(
        self,
        min_margin: float = 0.05,
        max_margin: float = 0.4,
        mining: str | Miner = "batch_hard",
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
        self.max_images_per_label = validate_max_images(max_images_per_label)
        self.miner = get_miner(mining)
        self.mining = self.miner.name
        self.distance = validate_distance(distance)
        self.min_margin, self.max_margin, self.semantic_threshold = validate_adaptive_margins(
            min_margin, max_margin, self.distance, semantic_threshold
        )
        self.soft_margin = validate_soft_margin(soft_margin)
        validate_missing_text_margin(missing_text_margin, self.min_margin, self.max_margin)
        # None is kept (it means "the midpoint", also after a config round trip).
        self.missing_text_margin = (
            None if missing_text_margin is None else float(missing_text_margin)
        )

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels, text = split_targets(y_true, need_text=True, loss_name=type(self).__name__)
        return adaptive_triplet_loss(
            labels,
            y_pred,
            text,
            min_margin=self.min_margin,
            max_margin=self.max_margin,
            mining=self.miner,
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
            "mining": miner_config(self.miner),
            "distance": self.distance,
            "semantic_threshold": self.semantic_threshold,
            "soft_margin": self.soft_margin,
            "missing_text_margin": self.missing_text_margin,
            "max_images_per_label": self.max_images_per_label,
        }


# --------------------------------------------------------------------------
# Builders of the registry (`atl_keras.losses.registry`): a training config -> a loss.
# --------------------------------------------------------------------------


def triplet_from_config(config: Any, data: Any = None, item_text: Any = None) -> TripletLoss:
    """``loss="triplet"``: `TripletLoss` with the config's margin, mining and distance."""
    return TripletLoss(margin=config.margin, mining=config.mining, distance=config.distance,
                       max_images_per_label=config.k)


def atl_from_config(config: Any, data: Any = None, item_text: Any = None) -> MetricLoss:
    """``loss="atl"``: `AdaptiveTripletLoss`, or with a `margin_source` other than ``text``
    or a `margin_mapping` other than ``linear`` the margin-table loss over the catalog's
    items (`atl_keras.losses.margin_table.margin_table_from_config`, needs `data` and
    `item_text` [M, T])."""
    if config.margin_source != "text" or config.margin_mapping != "linear":
        from atl_keras.losses.margin_table import margin_table_from_config

        return margin_table_from_config(config, data, item_text)
    return AdaptiveTripletLoss(
        min_margin=config.min_margin,
        max_margin=config.max_margin,
        mining=config.mining,
        distance=config.distance,
        semantic_threshold=config.semantic_threshold,
        missing_text_margin=config.missing_text_margin,
        max_images_per_label=config.k,  # P x K batches: one [B, K-1, B] branch (a speed hint)
    )

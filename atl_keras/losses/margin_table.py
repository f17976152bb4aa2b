"""The margin-table triplet loss: per-item-pair margins read from a precomputed table.

Every weak-label condition of the experiments (text margins, their controls, a fixed
margin) is this loss with a different ``[M, M]`` table from
`atl_keras.margins.sources.margin_table`.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from atl_keras.distances import pairwise_distances, validate_distance
from atl_keras.losses.base import MetricLoss, prepare_embeddings, prepare_labels, split_targets
from atl_keras.losses.mining import get_miner, miner_config, validate_soft_margin
from atl_keras.losses.triplet import margin_triplet_loss

__all__ = ["MarginTableTripletLoss", "margin_table_from_config"]


@keras.saving.register_keras_serializable(package="atl_keras")
class MarginTableTripletLoss(MetricLoss):
    """Triplet loss whose margin of anchor item ``a`` and negative item ``n`` is ``table[a, n]``.

    The experiments' one code path: ATL with text margins, its controls and a fixed-margin
    triplet loss differ only in `table` (see `margin_table`). With the ``linear`` mapping and
    the ``text`` source it equals `AdaptiveTripletLoss` on the same items (tables come from
    `atl_keras.margins.sources.margin_table`).

    Args:
        table: ``[M, M]`` margins; labels are item indices in ``[0, M)``.
        mining: ``"batch_all"`` | ``"batch_hard"`` | ``"semi_hard"`` or a `Miner`.
        distance: image embedding distance.
        negative_table: optional ``[M, M]`` bool; ``False`` marks pairs that are not
            negatives (ATL's semantic threshold, precomputed).
        soft_margin: softplus instead of the hinge.

    ``y_true``: labels ``[B]`` or a dict with ``"label"``; ``y_pred``: ``[B, D]`` embeddings.
    """

    def __init__(
        self,
        table: Any,
        mining: str = "batch_hard",
        distance: str = "squared_l2",
        negative_table: Any | None = None,
        soft_margin: bool = False,
        name: str = "margin_table_triplet_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype: Any = "float32",
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        table = np.asarray(table, np.float32)
        if table.ndim != 2 or table.shape[0] != table.shape[1] or not np.all(np.isfinite(table)) or table.min() < 0:
            raise ValueError(f"table must be a finite, non-negative [M, M] matrix, got shape {table.shape}.")
        self.table = table
        self.negative_table = None if negative_table is None else np.asarray(negative_table, bool)
        if self.negative_table is not None and self.negative_table.shape != table.shape:
            raise ValueError(f"negative_table must have the table's shape {table.shape}.")
        self.miner = get_miner(mining)
        self.mining = self.miner.name
        self.distance = validate_distance(distance)
        self.soft_margin = validate_soft_margin(soft_margin)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels, _ = split_targets(y_true, need_text=False, loss_name=type(self).__name__)
        embeddings = prepare_embeddings(y_pred)
        labels = prepare_labels(labels, embeddings.shape[0])
        rows_of = ops.cast(labels, "int32")  # item indices into the table (labels stay uncast)
        distances = pairwise_distances(embeddings, distance=self.distance)
        rows = ops.take(ops.convert_to_tensor(self.table), rows_of, axis=0)
        margins = ops.take(rows, rows_of, axis=1)
        negative_mask = None
        if self.negative_table is not None:
            mask_rows = ops.take(ops.convert_to_tensor(self.negative_table), rows_of, axis=0)
            negative_mask = ops.take(mask_rows, rows_of, axis=1)
        return margin_triplet_loss(labels, distances, margins, mining=self.miner,
                                   soft_margin=self.soft_margin, negative_mask=negative_mask)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "table": self.table.tolist(), "mining": miner_config(self.miner), "distance": self.distance,
            "negative_table": None if self.negative_table is None else self.negative_table.tolist(),
            "soft_margin": self.soft_margin,
        }


def margin_table_from_config(config: Any, data: Any, item_text: Any) -> MarginTableTripletLoss:
    """ATL through a margin table: `config.margin_source` + `config.margin_mapping` over the
    training items of `data` (see `atl_keras.margins.sources.margin_table`);
    `semantic_threshold` masks pairs whose description distance is below it, as
    `AdaptiveTripletLoss` does. `item_text` is the items' text embeddings ``[M, T]``."""
    from atl_keras.margins.weak_label import table_from_config

    table, negatives = table_from_config(config, data, item_text)
    return MarginTableTripletLoss(table, mining=config.mining, distance=config.distance, negative_table=negatives)

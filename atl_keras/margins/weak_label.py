"""The weak-label margin of a pair loss: one object, any loss of the pair family.

`WeakLabelMargins` gives the ``[B, B]`` per-pair margins ``m_an`` of a batch and, with a
semantic threshold, the mask of pairs that stay negatives:

- from the batch's text embeddings (``y_true["text_embedding"]``, the default source):
  ATL's ``linear`` mapping ``m = min_margin + (max_margin - min_margin) * d(g_a, g_n) / d_max``
  of the description distances, ``missing_text_margin`` where a text is missing, and
  ``semantic_threshold`` tau (a pair whose text distance is below tau is not a negative),
  exactly as `atl_keras.losses.AdaptiveTripletLoss` computes them
  (`atl_keras.margins.batch.batch_margin_matrices`);
- from a catalog's ``[M, M]`` margin ``table`` indexed by the labels (item indices): any
  mapping (``linear``, ``paper``, ``catalog``) and any source or control (``text``,
  ``shuffled_text``, ``permuted``, ``fixed``, ``oracle``) of
  `atl_keras.margins.sources.margin_table`, with an optional ``negative_table``.

A pair loss reads the margins as a *relaxation* of its own negative term,
``r_an = max_margin - m_an`` in ``[0, max_margin - min_margin]``: 0 for unrelated
descriptions (the plain loss), the whole spread for identical ones (pushed apart gently):

- `ContrastiveLoss`: negative margin ``neg_margin - r_an``;
- `MultiSimilarityLoss`: negative base ``base + r_an``;
- `CircleLoss`: negative relaxation ``m + r_an``.

So ``min_margin == max_margin`` gives exactly the plain loss, and the spread is the only
knob. (`ArcFaceLoss` takes class margins like `AdaptiveProxyLoss` instead.)
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from atl_keras.distances import validate_distance
from atl_keras.margins.batch import batch_margin_matrices
from atl_keras.margins.checks import (
    validate_adaptive_margins,
    validate_missing_text_margin,
)

__all__ = ["WeakLabelMargins", "table_from_config", "weak_label_from_config"]


@keras.saving.register_keras_serializable(package="atl_keras")
class WeakLabelMargins:
    """Per-pair weak-label margins of a batch, from its text embeddings or a margin table.

    Args:
        min_margin, max_margin: the margin range ``0 <= min <= max`` of the text source
            (None: 0.0 and 0.2). With a ``table``, None means its smallest / largest value
            (``r = max_margin - table[a, n]``).
        distance: the text distance (``"squared_l2"``, ``"l2"``, ``"cosine"``).
        missing_text_margin: margin of pairs where a text is all-zero (None: the midpoint).
        semantic_threshold: None or tau in ``[0, d_max]``: pairs whose text distance is below
            tau are not negatives.
        table: optional ``[M, M]`` float margins of a catalog's items (labels index it).
        negative_table: optional ``[M, M]`` bool with the table: False = not a negative.

    Example:
        >>> loss = atl.ContrastiveLoss(weak_label=atl.WeakLabelMargins(0.6, 1.0))
        >>> model.compile("adam", loss=loss)  # targets {"label": ..., "text_embedding": ...}
    """

    def __init__(
        self,
        min_margin: float | None = None,
        max_margin: float | None = None,
        distance: str = "squared_l2",
        missing_text_margin: float | None = None,
        semantic_threshold: float | None = None,
        table: Any | None = None,
        negative_table: Any | None = None,
    ) -> None:
        self.distance = validate_distance(distance)
        self.table = None
        self.negative_table = None
        if table is not None:
            table = np.asarray(table, np.float32)
            if table.ndim != 2 or table.shape[0] != table.shape[1] or not np.all(np.isfinite(table)) \
                    or table.min() < 0:
                raise ValueError(
                    f"table must be a finite, non-negative [M, M] matrix; got shape {table.shape}. "
                    "Build it with atl_keras.margins.margin_table."
                )
            if semantic_threshold is not None or missing_text_margin is not None:
                raise ValueError(
                    "semantic_threshold / missing_text_margin apply to the text source; with a "
                    "table pass negative_table (and build missing texts into the table)."
                )
            self.table = table
            min_margin = float(table.min()) if min_margin is None else min_margin
            max_margin = float(table.max()) if max_margin is None else max_margin
            if negative_table is not None:
                self.negative_table = np.asarray(negative_table, bool)
                if self.negative_table.shape != table.shape:
                    raise ValueError(f"negative_table must have the table's shape {table.shape}.")
        elif negative_table is not None:
            raise ValueError("negative_table needs a table.")
        else:
            min_margin = 0.0 if min_margin is None else min_margin
            max_margin = 0.2 if max_margin is None else max_margin
        self.min_margin, self.max_margin, self.semantic_threshold = validate_adaptive_margins(
            min_margin, max_margin, self.distance, semantic_threshold)
        self.missing_text_margin = None if missing_text_margin is None else float(missing_text_margin)
        self._missing_margin = validate_missing_text_margin(
            missing_text_margin, self.min_margin, self.max_margin)

    @property
    def needs_text(self) -> bool:
        """Whether the loss needs ``y_true["text_embedding"]`` (the text source)."""
        return self.table is None

    def pair_margins(self, labels: Any, text_embeddings: Any | None,
                     columns: Any | None = None) -> tuple[Any, Any | None]:
        """``[B]`` labels (and ``[B, T]`` texts) -> (margins ``[B, N]``, negatives ``[B, N]`` bool or None).

        ``columns``: optional ``[N]`` labels of the columns (the batch followed by a
        cross-batch memory's labels; table source only). Default: the batch, ``N = B``.
        """
        if self.table is None:
            if columns is not None:
                raise ValueError("Text weak-label margins cover the batch only (no memory columns).")
            margins, keep, _ = batch_margin_matrices(
                text_embeddings, labels, self.min_margin, self.max_margin, self.distance,
                self._missing_margin, self.semantic_threshold)
            return margins, keep
        rows = ops.cast(labels, "int32")
        cols = rows if columns is None else ops.cast(columns, "int32")

        def pick(table: np.ndarray) -> Any:
            return ops.take(ops.take(ops.convert_to_tensor(table), rows, axis=0), cols, axis=1)

        keep = None if self.negative_table is None else pick(self.negative_table)
        return pick(self.table), keep

    def relaxations(self, labels: Any, text_embeddings: Any | None,
                    columns: Any | None = None) -> tuple[Any, Any | None]:
        """(``r = max_margin - m`` ``[B, N]``, negatives mask or None); see the module docstring."""
        margins, keep = self.pair_margins(labels, text_embeddings, columns)
        return ops.stop_gradient(self.max_margin - margins), keep

    def get_config(self) -> dict[str, Any]:
        return {
            "min_margin": self.min_margin,
            "max_margin": self.max_margin,
            "distance": self.distance,
            "missing_text_margin": self.missing_text_margin,
            "semantic_threshold": self.semantic_threshold,
            "table": None if self.table is None else self.table.tolist(),
            "negative_table": None if self.negative_table is None else self.negative_table.tolist(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "WeakLabelMargins":
        return cls(**config)

    def __repr__(self) -> str:
        source = "text" if self.table is None else f"table {self.table.shape}"
        return (f"WeakLabelMargins({source}, min_margin={self.min_margin}, "
                f"max_margin={self.max_margin}, semantic_threshold={self.semantic_threshold})")


def table_from_config(config: Any, data: Any, item_text: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A training config's ``[M, M]`` margin table over the training items of ``data``
    (`config.margin_source` + `config.margin_mapping`, `atl_keras.margins.sources.margin_table`)
    and, with `config.semantic_threshold`, the negatives table (False where the description
    distance is below it). ``item_text``: the items' text embeddings ``[M, T]``."""
    from atl_keras.margins.mapping import text_distance_table
    from atl_keras.margins.sources import margin_table

    if data is None or item_text is None:
        raise ValueError("margin_source/margin_mapping other than text/linear need the data and item text embeddings.")
    table = margin_table(
        config.margin_source, text_embeddings=item_text, item_attributes=data.item_attributes,
        train_items=np.unique(data.train_labels), mapping=config.margin_mapping,
        min_margin=config.min_margin, max_margin=config.max_margin, distance=config.distance,
        missing_text_margin=config.missing_text_margin, seed=config.seed,
    )
    negatives = None
    if config.semantic_threshold is not None:
        distances = text_distance_table(item_text, config.distance)
        negatives = ~(np.isfinite(distances) & (distances < config.semantic_threshold))
    return table, negatives


def weak_label_from_config(config: Any, data: Any = None, item_text: Any = None) -> WeakLabelMargins:
    """The weak label of a training config (`atl_keras.train.TrainConfig`): per-batch text
    margins for ``margin_source="text"`` with the ``linear`` mapping, else the catalog table
    of `table_from_config`, with the config's margin range."""
    if config.margin_source == "text" and config.margin_mapping == "linear":
        return WeakLabelMargins(config.min_margin, config.max_margin, config.distance,
                                config.missing_text_margin, config.semantic_threshold)
    table, negatives = table_from_config(config, data, item_text)
    return WeakLabelMargins(config.min_margin, config.max_margin, config.distance, table=table,
                            negative_table=negatives)

"""Per-class weak-label margins of the proxy losses: ``m_{y c}`` for a sample of class ``y``
against class ``c``, from class text embeddings, a precomputed matrix or a constant.

`ClassMargins` is the margin source of `atl_keras.losses.AdaptiveProxyLoss` and
`atl_keras.losses.ArcFaceLoss` (their negative logits get ``+ m_{y c}``). Exactly one source:

- ``class_text_embeddings`` ``[C, T]`` (row c = text embedding of class c, all-zero =
  missing description): ATL's ``linear`` mapping with ``min_margin``, ``max_margin``,
  ``distance`` and ``missing_text_margin`` (None = midpoint). With ``precompute_margins``
  (None: when ``C <= PRECOMPUTE_MAX_CLASSES``) the ``[C, C]`` matrix is built once
  (`class_margin_matrix`) and a batch gathers its rows; otherwise each batch computes its
  rows (``[B, T] x [T, C]``, no ``C^2`` memory);
- ``margin_matrix`` ``[C, C]`` (any mapping or control, e.g. a catalog-scaled table): row
  ``y`` holds the margins of class ``y`` against every class;
- ``margin`` (a float): the same margin for every negative.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from atl_keras.distances import validate_distance
from atl_keras.margins.checks import validate_margin, validate_margin_range, validate_missing_text_margin
from atl_keras.margins.mapping import class_margin_matrix, linear_margins, text_distances, unit_text_rows

__all__ = ["PRECOMPUTE_MAX_CLASSES", "ClassMargins"]

#: The ``[C, C]`` text margin matrix is built once up to this many classes.
PRECOMPUTE_MAX_CLASSES = 2048


class ClassMargins:
    """A per-class margin source (see the module docstring); ``batch_margins(labels)``."""

    def __init__(
        self,
        class_text_embeddings: Any | None = None,
        margin_matrix: Any | None = None,
        margin: float | None = None,
        min_margin: float = 0.05,
        max_margin: float = 0.4,
        distance: str = "squared_l2",
        missing_text_margin: float | None = None,
        precompute_margins: bool | None = None,
        owner: str = "The loss",
        required: bool = True,
    ) -> None:
        sources = [s for s, v in (("class_text_embeddings", class_text_embeddings),
                                  ("margin_matrix", margin_matrix), ("margin", margin)) if v is not None]
        if len(sources) > 1 or (required and not sources):
            raise ValueError(
                f"{owner} needs {'exactly' if required else 'at most'} one margin source: "
                "class_text_embeddings [C, T], margin_matrix [C, C] or a constant margin; got "
                f"{', '.join(sources) if sources else 'none'}."
            )
        self.distance = validate_distance(distance)
        self.min_margin, self.max_margin = validate_margin_range(min_margin, max_margin)
        self.missing_text_margin = None if missing_text_margin is None else float(missing_text_margin)
        self._missing_margin = validate_missing_text_margin(missing_text_margin, self.min_margin, self.max_margin)
        self.margin = None if margin is None else validate_margin(margin, "margin")
        if precompute_margins not in (None, True, False):
            raise ValueError(f"precompute_margins must be None, True or False, got {precompute_margins!r}.")
        self.precompute_margins = precompute_margins
        self.class_text_embeddings = None
        self.margin_matrix = None
        self._text_matrix = None
        if class_text_embeddings is not None:
            self.class_text_embeddings = np.asarray(class_text_embeddings, np.float32)
            unit, self._missing = unit_text_rows(self.class_text_embeddings, "class_text_embeddings")
            self._unit_text = unit.astype(np.float32)
            classes = len(self.class_text_embeddings)
            if precompute_margins or (precompute_margins is None and classes <= PRECOMPUTE_MAX_CLASSES):
                self._text_matrix = class_margin_matrix(
                    self.class_text_embeddings, self.min_margin, self.max_margin, self.distance,
                    self.missing_text_margin,
                )
        if margin_matrix is not None:
            matrix = np.asarray(margin_matrix, np.float32)
            if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not np.all(np.isfinite(matrix)):
                raise ValueError(
                    f"margin_matrix must be a finite square [C, C] matrix, got shape {matrix.shape}."
                )
            self.margin_matrix = matrix

    @property
    def active(self) -> bool:
        """Whether there is any margin source."""
        return self.margin is not None or self.num_classes is not None

    @property
    def num_classes(self) -> int | None:
        """``C`` of a text or matrix source, else None."""
        if self.class_text_embeddings is not None:
            return int(self.class_text_embeddings.shape[0])
        if self.margin_matrix is not None:
            return int(self.margin_matrix.shape[0])
        return None

    def batch_margins(self, labels: Any) -> Any:
        """``[B]`` labels -> ``[B, C]`` margins (a scalar for a constant margin, 0 without a source)."""
        if self.margin is not None:
            return self.margin
        if not self.active:
            return 0.0
        labels = ops.cast(labels, "int32")
        matrix = self.margin_matrix if self.margin_matrix is not None else self._text_matrix
        if matrix is not None:
            return ops.take(ops.convert_to_tensor(matrix), labels, axis=0)
        unit = ops.convert_to_tensor(self._unit_text)
        cosine = ops.matmul(ops.take(unit, labels, axis=0), ops.transpose(unit))
        distances = text_distances(ops.clip(cosine, -1.0, 1.0), self.distance)
        margins = linear_margins(distances, self.min_margin, self.max_margin, self.distance)
        missing = ops.convert_to_tensor(self._missing)
        missing_pair = ops.logical_or(ops.expand_dims(ops.take(missing, labels), 1), ops.expand_dims(missing, 0))
        return ops.where(missing_pair, ops.full_like(margins, self._missing_margin), margins)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (arrays as lists, so a saved model carries them)."""
        return {
            "class_text_embeddings": None
            if self.class_text_embeddings is None
            else self.class_text_embeddings.tolist(),
            "margin_matrix": None if self.margin_matrix is None else self.margin_matrix.tolist(),
            "margin": self.margin,
            "min_margin": self.min_margin,
            "max_margin": self.max_margin,
            "distance": self.distance,
            "missing_text_margin": self.missing_text_margin,
            "precompute_margins": self.precompute_margins,
        }

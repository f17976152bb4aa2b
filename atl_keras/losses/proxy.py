"""Proxy losses: one learnable proxy per training class instead of in-batch triplets.

Two losses, each a pure function of tensors written with `keras.ops` plus a thin
`keras.losses.Loss` that holds the configuration (``B`` = batch, ``C`` = classes,
``D`` = embedding size; ``f_i`` and ``p_c`` are L2-normalised here, ``cos`` is their dot):

- **Adaptive proxy loss** (`adaptive_proxy_loss`, `AdaptiveProxyLoss`): a normalised
  softmax over the proxies with scale ``s`` and an additive margin on each *negative* logit,

      L_i = -log( e^{s cos(f_i, p_{y_i})}
                  / (e^{s cos(f_i, p_{y_i})} + sum_{c != y_i} e^{s (cos(f_i, p_c) + m_{y_i c})}) )

  mean over the batch. ``m_{y c}`` comes from the distance between the text embeddings of
  classes ``y`` and ``c`` through ATL's margin mapping,
  ``m = min_margin + (max_margin - min_margin) * d(g_y, g_c) / d_max`` (see
  `atl_keras.margins.mapping`), or from any precomputed ``[C, C]`` margin matrix (other mappings plug
  in there), or is a constant ``margin`` (the plain additive-margin normalised softmax). This
  is *our reading of the abstract* of Fehervari & Macedo, "Adaptive additive
  classification-based loss for deep metric learning" (arXiv 2006.14693): a margin per
  (sample, negative proxy) pair from precomputed class text distances. Its method section was
  not available to us; the scale, margin range, distance and proxy learning rate are
  parameters, not the paper's values.
- **ProxyAnchor** (`proxy_anchor_loss`, `ProxyAnchorLoss`; Kim et al., CVPR 2020) with
  PyTorch Metric Learning's semantics (``margin`` delta, ``alpha``):

      L = 1/|P+| sum_{p in P+} log(1 + sum_{i: y_i = p}  e^{-alpha (cos(f_i, p) - delta)})
        + 1/C    sum_{p}       log(1 + sum_{i: y_i != p} e^{ alpha (cos(f_i, p) + delta)})

  ``P+`` = proxies with at least one positive in the batch.

Classes are dense ids ``0..C-1`` (labels outside that range are an error on the device).
The proxies ``[C, D]`` are model weights (`atl_keras.proxies.ProxyHead`, created by
``ATLModel(num_proxies=C)``), passed to the loss as ``loss(y_true, y_pred, proxies=...)``;
`ATLModel.compute_loss` does that. Text embeddings and margins are constants (no gradient).
Math runs in float32 (float64 inputs stay float64). Identical embeddings and proxies, and
classes absent from a batch, give finite values and gradients.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from atl_keras.distances import compute_dtype, l2_normalize
from atl_keras.losses.base import MetricLoss, prepare_labels, split_targets
from atl_keras.margins.class_margins import ClassMargins
from atl_keras.margins.mapping import class_margin_matrix

__all__ = [
    "AdaptiveProxyLoss",
    "ProxyAnchorLoss",
    "ProxyLoss",
    "adaptive_proxy_loss",
    "adaptive_proxy_loss_from_cosines",
    "proxy_anchor_loss",
    "proxy_anchor_loss_from_cosines",
    "proxy_classes",
]

#: Settings of `AdaptiveProxyLoss` that live in its `ClassMargins`.
_MARGIN_FIELDS = ("class_text_embeddings", "margin_matrix", "margin", "min_margin", "max_margin",
                  "distance", "missing_text_margin", "precompute_margins")


# --------------------------------------------------------------------------
# The losses as functions.
# --------------------------------------------------------------------------


def _prepare(labels: Any, embeddings: Any, proxies: Any) -> tuple[Any, Any, Any, str]:
    embeddings = ops.convert_to_tensor(embeddings)
    proxies = ops.convert_to_tensor(proxies)
    if len(embeddings.shape) != 2 or len(proxies.shape) != 2:
        raise ValueError(
            f"embeddings must be [batch, dim] and proxies [classes, dim]; got "
            f"{tuple(embeddings.shape)} and {tuple(proxies.shape)}."
        )
    if embeddings.shape[1] is not None and proxies.shape[1] is not None and embeddings.shape[1] != proxies.shape[1]:
        raise ValueError(
            f"embeddings have dim {embeddings.shape[1]} but proxies have dim {proxies.shape[1]}; "
            "build the proxies with the model's embedding_dim."
        )
    dtype = compute_dtype(embeddings)
    labels = prepare_labels(labels, embeddings.shape[0])
    return labels, ops.cast(embeddings, dtype), ops.cast(proxies, dtype), dtype


def _prepare_cosines(cosine: Any) -> Any:
    cosine = ops.convert_to_tensor(cosine)
    if len(cosine.shape) != 2:
        raise ValueError(
            f"cosines must have shape [batch, classes] (a ProxyHead output); got {tuple(cosine.shape)}."
        )
    return ops.cast(cosine, compute_dtype(cosine))


def _cosines(embeddings: Any, proxies: Any) -> Any:
    """``[B, D] x [C, D] -> [B, C]`` cosines of the normalised rows."""
    return ops.matmul(l2_normalize(embeddings), ops.transpose(l2_normalize(proxies)))


def adaptive_proxy_loss(
    labels: Any,
    embeddings: Any,
    proxies: Any,
    margins: Any,
    scale: float = 16.0,
    sample_weight: Any | None = None,
) -> Any:
    """Normalised softmax over proxies with an additive margin on each negative logit.

    Args:
        labels: ``[B]`` (or ``[B, 1]``) int class ids in ``[0, C)``.
        embeddings: ``[B, D]`` float (normalised here).
        proxies: ``[C, D]`` float (normalised here).
        margins: ``m_{y_i c}`` as a ``[B, C]`` tensor (row i = margins of sample i's class
            against every class; entry ``y_i`` is ignored) or a scalar.
        scale: ``s > 0``.
        sample_weight: optional ``[B]`` weights; the result is ``sum_i w_i L_i / B``.

    Returns:
        Scalar: the mean of ``L_i`` (see the module docstring).
    """
    labels, embeddings, proxies, _ = _prepare(labels, embeddings, proxies)
    return adaptive_proxy_loss_from_cosines(labels, _cosines(embeddings, proxies), margins, scale,
                                            sample_weight)


def adaptive_proxy_loss_from_cosines(
    labels: Any, cosine: Any, margins: Any, scale: float = 16.0, sample_weight: Any | None = None
) -> Any:
    """`adaptive_proxy_loss` from the cosines ``[B, C]`` of the normalised embeddings and
    proxies (the output of a `atl_keras.ProxyHead` layer); labels ``[B]`` in ``[0, C)``."""
    cosine = _prepare_cosines(cosine)
    labels = prepare_labels(labels, cosine.shape[0])
    dtype = keras.backend.standardize_dtype(cosine.dtype)
    positive = ops.one_hot(ops.cast(labels, "int32"), ops.shape(cosine)[1], dtype=dtype)
    margins = ops.stop_gradient(ops.cast(margins, dtype))
    logits = float(scale) * (cosine + margins * (1.0 - positive))
    per_sample = ops.logsumexp(logits, axis=1) - ops.sum(logits * positive, axis=1)
    if sample_weight is not None:
        per_sample = per_sample * ops.reshape(ops.cast(sample_weight, dtype), (-1,))
    return ops.mean(per_sample)


def _log1p_sum_exp(x: Any, mask: Any, axis: int) -> Any:
    """``log(1 + sum_{mask} exp(x))`` along ``axis``, stable; 0 where the mask is empty."""
    very_negative = ops.full_like(x, -1e30 if x.dtype != "float64" else -1e300)
    x = ops.where(mask, x, very_negative)
    shift = ops.stop_gradient(ops.maximum(ops.max(x, axis=axis, keepdims=True), 0.0))
    total = ops.exp(-shift) + ops.sum(ops.where(mask, ops.exp(x - shift), 0.0), axis=axis, keepdims=True)
    return ops.squeeze(shift + ops.log(total), axis=axis)


def proxy_anchor_loss(
    labels: Any,
    embeddings: Any,
    proxies: Any,
    margin: float = 0.1,
    alpha: float = 32.0,
) -> Any:
    """ProxyAnchor (Kim et al. 2020) as PyTorch Metric Learning 2.x computes it.

    Args:
        labels: ``[B]`` int class ids in ``[0, C)``.
        embeddings: ``[B, D]``; proxies: ``[C, D]`` (both normalised here).
        margin: delta; alpha: the scale.

    Returns:
        Scalar: mean positive term over proxies with a positive in the batch plus the mean
        negative term over all C proxies (see the module docstring).
    """
    labels, embeddings, proxies, _ = _prepare(labels, embeddings, proxies)
    return proxy_anchor_loss_from_cosines(labels, _cosines(embeddings, proxies), margin, alpha)


def proxy_anchor_loss_from_cosines(labels: Any, cosine: Any, margin: float = 0.1, alpha: float = 32.0) -> Any:
    """`proxy_anchor_loss` from the cosines ``[B, C]`` (a `atl_keras.ProxyHead` output)."""
    cosine = _prepare_cosines(cosine)
    labels = prepare_labels(labels, cosine.shape[0])
    dtype = keras.backend.standardize_dtype(cosine.dtype)
    positive = ops.cast(ops.one_hot(ops.cast(labels, "int32"), ops.shape(cosine)[1]), "bool")
    pos_term = _log1p_sum_exp(-float(alpha) * (cosine - float(margin)), positive, axis=0)
    neg_term = _log1p_sum_exp(float(alpha) * (cosine + float(margin)), ops.logical_not(positive), axis=0)
    with_positive = ops.sum(ops.cast(ops.any(positive, axis=0), dtype))
    classes = ops.cast(ops.shape(cosine)[1], dtype)
    return ops.sum(pos_term) / ops.maximum(with_positive, 1.0) + ops.sum(neg_term) / classes


# --------------------------------------------------------------------------
# keras.losses.Loss wrappers.
# --------------------------------------------------------------------------

_PROXIES_HELP = (
    "build the model with ATLModel(..., num_proxies=C) (it passes its proxies to the loss), "
    "or call loss(y_true, y_pred, proxies=P) with P [C, D]"
)


def _check_proxies(loss_name: str, proxies: Any, num_classes: int | None) -> None:
    if proxies is None:
        raise ValueError(f"{loss_name} needs the class proxies: {_PROXIES_HELP}.")
    rows = proxies.shape[0]
    if num_classes is not None and rows is not None and rows != num_classes:
        raise ValueError(
            f"{loss_name} has margins for {num_classes} classes but got {rows} proxies; use "
            f"ATLModel(num_proxies={num_classes}) (one proxy per class)."
        )


class ProxyLoss(MetricLoss):
    """Base class of the proxy losses; labels keep their integer dtype.

    Two ways to read a batch:

    - ``loss(y_true, embeddings [B, D], proxies=P [C, D])`` (``from_cosines=False``, the
      default): `ATLModel(num_proxies=C)` passes its proxies.
    - ``loss(y_true, cosines [B, C])`` with ``from_cosines=True``: the output of a
      `atl_keras.ProxyHead` layer in any functional model (labels-only targets).

    Subclasses implement ``compute_from_cosines(labels, cosine, sample_weight)``.
    """

    supports_sample_weight = False

    def __init__(self, from_cosines: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(from_cosines, bool):
            raise ValueError(f"from_cosines must be True or False; got {from_cosines!r}.")
        self.from_cosines = from_cosines

    @property
    def needs_proxies(self) -> bool:
        """`ATLModel.compute_loss` passes ``proxies=`` to losses that need them."""
        return not self.from_cosines

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None, proxies: Any = None) -> Any:
        """Loss of a batch.

        Args:
            y_true: labels ``[B]`` or a dict ``{"label": [B], "text_embedding": [B, T]}``
                (only ``label`` is read).
            y_pred: ``[B, D]`` embeddings, or with ``from_cosines=True`` the cosines ``[B, C]``.
            sample_weight: ``[B]`` (AdaptiveProxyLoss only).
            proxies: ``[C, D]`` class proxies (`ATLModel` passes its own); not with
                ``from_cosines=True``.

        Returns:
            Float32 scalar (divided by the replica count under tf.distribute, like Keras'
            mean losses).
        """
        name = type(self).__name__
        if self.from_cosines:
            if proxies is not None:
                raise ValueError(
                    f"{name} was built with from_cosines=True: y_pred are the cosines [B, C] of a "
                    "ProxyHead layer, so do not pass proxies (or build it with from_cosines=False)."
                )
            columns = ops.convert_to_tensor(y_pred).shape[-1]
            if self.num_classes is not None and columns is not None and columns != self.num_classes:
                raise ValueError(
                    f"{name} has margins for {self.num_classes} classes but y_pred has {columns} "
                    f"cosine columns; use ProxyHead(num_proxies={self.num_classes}, ...)."
                )
        else:
            if proxies is not None:
                proxies = ops.convert_to_tensor(proxies)
            _check_proxies(name, proxies, self.num_classes)
        if sample_weight is not None and not self.supports_sample_weight:
            raise ValueError(
                f"{name} does not support sample_weight (it is a sum over proxies, not "
                "samples). Remove sample_weight/class_weight from fit()."
            )
        labels, _ = split_targets(y_true, need_text=False, loss_name=name)
        with keras.name_scope(self.name):
            if self.from_cosines:
                return self.finish(self.compute_from_cosines(labels, y_pred, sample_weight))
            return self.finish(self.compute(labels, y_pred, proxies, sample_weight))

    def call(self, y_true: Any, y_pred: Any) -> Any:
        raise ValueError(f"{type(self).__name__} needs the class proxies: {_PROXIES_HELP}.")

    @property
    def num_classes(self) -> int | None:
        return None

    def compute(self, labels: Any, embeddings: Any, proxies: Any, sample_weight: Any) -> Any:
        """The loss from embeddings ``[B, D]`` and proxies ``[C, D]``."""
        labels, embeddings, proxies, _ = _prepare(labels, embeddings, proxies)
        return self.compute_from_cosines(labels, _cosines(embeddings, proxies), sample_weight)

    def compute_from_cosines(self, labels: Any, cosine: Any, sample_weight: Any) -> Any:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "from_cosines": self.from_cosines}


@keras.saving.register_keras_serializable(package="atl_keras")
class AdaptiveProxyLoss(ProxyLoss):
    """Additive-margin normalised softmax with a margin per negative proxy; see `adaptive_proxy_loss`.

    Exactly one margin source (`atl_keras.margins.class_margins.ClassMargins`):

    - ``class_text_embeddings`` ``[C, T]`` (row c = text embedding of class c, all-zero =
      missing description): margins through ATL's mapping with ``min_margin``,
      ``max_margin``, ``distance`` and ``missing_text_margin`` (None = midpoint). With
      ``precompute_margins`` (None: when ``C <= 2048``) the ``[C, C]`` matrix is built once
      (`class_margin_matrix`) and a batch gathers its rows; otherwise each batch computes its
      rows (``[B, T] x [T, C]``, no ``C^2`` memory);
    - ``margin_matrix`` ``[C, C]`` (any mapping, e.g. `class_margin_matrix`, a catalog-scaled
      or a permuted control): row ``y`` are the margins of class ``y`` against every class;
    - ``margin`` (a float): the same margin for every negative, which is the plain
      additive-margin normalised softmax and needs no text.

    Args:
        scale: ``s > 0``, the softmax temperature's inverse.
        from_cosines: ``y_pred`` are the cosines ``[B, C]`` of a `atl_keras.ProxyHead` layer
            (any functional model) instead of embeddings with ``proxies=``.

    ``y_true`` is the labels ``[B]`` or the P x K target dict (only ``label`` is read: the
    class texts are given here, once per catalog). Arrays are stored in ``get_config`` as
    lists, so a saved model carries them (``C x T`` or ``C x C`` floats).

    Example:
        >>> model = ATLModel("small_cnn", input_shape=(32, 32, 3), num_proxies=len(texts))
        >>> model.compile("adam", loss=AdaptiveProxyLoss(class_text_embeddings=texts))
    """

    supports_sample_weight = True

    def __init__(
        self,
        class_text_embeddings: Any | None = None,
        margin_matrix: Any | None = None,
        margin: float | None = None,
        min_margin: float = 0.05,
        max_margin: float = 0.4,
        scale: float = 16.0,
        distance: str = "squared_l2",
        missing_text_margin: float | None = None,
        precompute_margins: bool | None = None,
        name: str = "adaptive_proxy_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype: Any = "float32",
        from_cosines: bool = False,
    ) -> None:
        super().__init__(from_cosines=from_cosines, name=name, reduction=reduction, dtype=dtype)
        self.scale = float(scale)
        if not np.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}.")
        self.class_margins = ClassMargins(
            class_text_embeddings, margin_matrix, margin, min_margin, max_margin, distance,
            missing_text_margin, precompute_margins, owner="AdaptiveProxyLoss")

    def __getattr__(self, name: str) -> Any:
        # The margin source's settings read as the loss' own (loss.min_margin, ...).
        if name in _MARGIN_FIELDS and "class_margins" in self.__dict__:
            return getattr(self.__dict__["class_margins"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def num_classes(self) -> int | None:
        return self.class_margins.num_classes

    def batch_margins(self, labels: Any) -> Any:
        """``[B]`` labels -> ``[B, C]`` margins (or a scalar for a constant margin)."""
        return self.class_margins.batch_margins(labels)

    def compute_from_cosines(self, labels: Any, cosine: Any, sample_weight: Any) -> Any:
        labels = prepare_labels(labels, None)
        return adaptive_proxy_loss_from_cosines(
            labels, cosine, self.batch_margins(labels), self.scale, sample_weight
        )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self.class_margins.get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="atl_keras")
class ProxyAnchorLoss(ProxyLoss):
    """ProxyAnchor with PyTorch Metric Learning's ``margin`` (delta) and ``alpha``; see
    `proxy_anchor_loss`. ``num_classes`` (optional) checks the proxies' count;
    ``from_cosines=True`` reads the cosines ``[B, C]`` of a `atl_keras.ProxyHead` layer.

    ``y_true`` is the labels ``[B]`` or the P x K target dict (only ``label`` is read).
    """

    def __init__(
        self,
        margin: float = 0.1,
        alpha: float = 32.0,
        num_classes: int | None = None,
        name: str = "proxy_anchor_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype: Any = "float32",
        from_cosines: bool = False,
    ) -> None:
        super().__init__(from_cosines=from_cosines, name=name, reduction=reduction, dtype=dtype)
        self.margin = float(margin)
        self.alpha = float(alpha)
        if not np.isfinite(self.margin) or not np.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"Need a finite margin and alpha > 0, got margin={margin!r}, alpha={alpha!r}.")
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}.")
        self._num_classes = None if num_classes is None else int(num_classes)

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def compute_from_cosines(self, labels: Any, cosine: Any, sample_weight: Any) -> Any:
        return proxy_anchor_loss_from_cosines(labels, cosine, margin=self.margin, alpha=self.alpha)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "margin": self.margin,
            "alpha": self.alpha,
            "num_classes": self._num_classes,
        }


# --------------------------------------------------------------------------
# Builders of the registry (`atl_keras.losses.registry`): a training config -> a loss.
# --------------------------------------------------------------------------


def proxy_classes(data: Any) -> np.ndarray:
    """The training items, sorted: proxy ``c`` belongs to item ``proxy_classes(data)[c]``."""
    return np.unique(data.train_labels)


def _need_data(config: Any, data: Any, item_text: Any) -> np.ndarray:
    if data is None or item_text is None:
        raise ValueError(f"loss {config.loss!r} needs the data and the item text embeddings [M, T].")
    return proxy_classes(data)


def proxy_anchor_from_config(config: Any, data: Any, item_text: Any) -> ProxyAnchorLoss:
    """``loss="proxy_anchor"``: one proxy per training item (labels = `proxy_classes` index)."""
    classes = _need_data(config, data, item_text)
    alpha = 32.0 if config.proxy_scale is None else config.proxy_scale
    return ProxyAnchorLoss(margin=config.proxy_anchor_margin, alpha=alpha, num_classes=len(classes))


def adaptive_proxy_from_config(config: Any, data: Any, item_text: Any) -> AdaptiveProxyLoss:
    """``loss="adaptive_proxy"``: margins from the items' text (``margin_source`` text +
    ``linear``) or from the margin table of `margin_source` / `margin_mapping` restricted to
    the training items (labels = `proxy_classes` index)."""
    classes = _need_data(config, data, item_text)
    scale = 16.0 if config.proxy_scale is None else config.proxy_scale
    common = dict(min_margin=config.min_margin, max_margin=config.max_margin, scale=scale,
                  distance=config.distance, missing_text_margin=config.missing_text_margin)
    if config.margin_source == "text" and config.margin_mapping == "linear":
        return AdaptiveProxyLoss(class_text_embeddings=item_text[classes], **common)
    from atl_keras.margins import margin_table

    table = margin_table(
        config.margin_source, text_embeddings=item_text, item_attributes=data.item_attributes,
        train_items=classes, mapping=config.margin_mapping, min_margin=config.min_margin,
        max_margin=config.max_margin, distance=config.distance,
        missing_text_margin=config.missing_text_margin, seed=config.seed,
    )
    return AdaptiveProxyLoss(margin_matrix=table[np.ix_(classes, classes)], **common)

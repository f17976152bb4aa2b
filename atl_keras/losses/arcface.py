"""ArcFace (Deng et al., CVPR 2019) and sub-center ArcFace (Deng et al., ECCV 2020) on class
proxies, with PyTorch Metric Learning's semantics.

``cos_ic`` is the cosine between embedding ``i`` and the proxy of class ``c`` (both
L2-normalised); with ``k`` sub-centers per class the proxies are ``[C * k, D]``, row
``c * k + j`` the ``j``-th sub-center of class ``c``, and ``cos_ic`` is the largest cosine
over the class' sub-centers. With ``theta_i`` the angle to the own class ``y_i`` and the
additive angular margin ``m`` (radians):

    target_i = cos(theta_i + m)            if theta_i <= pi - m
               cos(theta_i) - m sin(m)     otherwise (keeps the logit decreasing in theta)
    L_i = cross_entropy(scale * [cos_i1, ..., target_i, ..., cos_iC], y_i)

mean over the batch. ``cos(theta + m)`` is computed as ``cos theta cos m - sin theta sin m``
with a gradient-safe ``sin theta``, so an embedding exactly on its proxy has finite
gradients (PML's ``acos`` has an infinite slope there).

Weak labels: ``class_margins`` (``[B, C]``, or a scalar) adds an additive cosine margin
``m_{y_i c}`` to each *negative* logit, like `atl_keras.losses.AdaptiveProxyLoss`: classes
whose descriptions are unrelated to ``y_i`` must be left farther behind. ``ArcFaceLoss``
builds it from class text embeddings or a ``[C, C]`` margin matrix; without it (or with
margins 0) this is plain ArcFace.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from atl_keras.distances import compute_dtype, l2_normalize
from atl_keras.losses.base import prepare_labels
from atl_keras.losses.pairs import validate_number
from atl_keras.losses.proxy import ProxyLoss
from atl_keras.margins.class_margins import ClassMargins

__all__ = [
    "ArcFaceLoss",
    "arcface_from_config",
    "arcface_loss",
    "arcface_loss_from_cosines",
    "weak_arcface_from_config",
]


def validate_sub_centers(sub_centers: Any) -> int:
    """An int ``k >= 1``."""
    if isinstance(sub_centers, bool) or not isinstance(sub_centers, int) or sub_centers < 1:
        raise ValueError(f"sub_centers must be an int >= 1; got {sub_centers!r}.")
    return sub_centers


def arcface_loss_from_cosines(
    labels: Any,
    cosine: Any,
    margin: float = 28.6,
    scale: float = 64.0,
    sub_centers: int = 1,
    class_margins: Any | None = None,
) -> Any:
    """ArcFace from the cosines ``[B, C * k]`` of the embeddings and the proxies (e.g. a
    `atl_keras.ProxyHead` output; column ``c * k + j`` = sub-center ``j`` of class ``c``).

    Args: as `arcface_loss`. Returns: the mean cross-entropy.
    """
    margin = validate_number(margin, "margin", 0.0)
    scale = validate_number(scale, "scale", 0.0, strict=True)
    sub_centers = validate_sub_centers(sub_centers)
    cosine = ops.convert_to_tensor(cosine)
    if len(cosine.shape) != 2:
        raise ValueError(f"cosines must have shape [batch, classes * sub_centers]; got {tuple(cosine.shape)}.")
    dtype = compute_dtype(cosine)
    cosine = ops.cast(cosine, dtype)
    columns = cosine.shape[1]
    if columns is not None and columns % sub_centers:
        raise ValueError(
            f"{columns} proxies do not split into sub_centers={sub_centers} per class; build "
            "the proxy head with num_proxies = classes * sub_centers."
        )
    labels = prepare_labels(labels, cosine.shape[0])
    if sub_centers > 1:  # the best sub-center of each class
        cosine = ops.max(ops.reshape(cosine, (ops.shape(cosine)[0], -1, sub_centers)), axis=2)
    target = ops.one_hot(ops.cast(labels, "int32"), ops.shape(cosine)[1], dtype=dtype)
    cos_y = ops.sum(cosine * target, axis=1)
    cos_t = ops.clip(cos_y, -1.0, 1.0)
    m = math.radians(margin)
    sin_squared = 1.0 - ops.square(cos_t)
    positive = ops.greater(sin_squared, 1e-12)
    sin_t = ops.where(positive, ops.sqrt(ops.where(positive, sin_squared, ops.ones_like(cos_t))),
                      ops.zeros_like(cos_t))
    shifted = ops.where(ops.greater_equal(cos_t, -math.cos(m)),
                        cos_t * math.cos(m) - sin_t * math.sin(m),
                        cos_t - m * math.sin(m))
    logits = cosine + target * ops.expand_dims(shifted - cos_y, 1)
    if class_margins is not None:
        logits = logits + (1.0 - target) * ops.stop_gradient(ops.cast(class_margins, dtype))
    logits = scale * logits
    return ops.mean(ops.logsumexp(logits, axis=1) - ops.sum(logits * target, axis=1))


def arcface_loss(
    labels: Any,
    embeddings: Any,
    proxies: Any,
    margin: float = 28.6,
    scale: float = 64.0,
    sub_centers: int = 1,
    class_margins: Any | None = None,
) -> Any:
    """ArcFace / sub-center ArcFace loss of a batch (see the module docstring).

    Args:
        labels: ``[B]`` int class ids in ``[0, C)``.
        embeddings: ``[B, D]`` float (normalised here).
        proxies: ``[C * sub_centers, D]`` float (normalised here).
        margin: the additive angular margin in degrees (PML's default 28.6 = 0.5 rad).
        scale: ``s > 0``.
        sub_centers: ``k >= 1`` proxies per class (1: plain ArcFace).
        class_margins: optional weak-label margins of the negative logits, ``[B, C]``.

    Returns:
        Scalar: the mean cross-entropy.
    """
    embeddings = ops.convert_to_tensor(embeddings)
    dtype = compute_dtype(embeddings)
    proxies = ops.cast(ops.convert_to_tensor(proxies), dtype)
    if len(embeddings.shape) != 2 or len(proxies.shape) != 2:
        raise ValueError(
            f"embeddings must be [batch, dim] and proxies [classes * sub_centers, dim]; got "
            f"{tuple(embeddings.shape)} and {tuple(proxies.shape)}."
        )
    cosine = ops.matmul(l2_normalize(ops.cast(embeddings, dtype)), ops.transpose(l2_normalize(proxies)))
    return arcface_loss_from_cosines(labels, cosine, margin, scale, sub_centers, class_margins)


@keras.saving.register_keras_serializable(package="atl_keras")
class ArcFaceLoss(ProxyLoss):
    """ArcFace / sub-center ArcFace on class proxies; see `arcface_loss`.

    PML 2.9's ``ArcFaceLoss(num_classes, embedding_size)`` (``sub_centers=1``) and
    ``SubCenterArcFaceLoss(..., sub_centers=k)`` with their defaults, the class weights
    being the proxies: ``ATLModel(num_proxies=C * k)`` or any `atl_keras.proxies.ProxyHead`
    in a functional model, ``loss(y_true, y_pred, proxies=head.proxies)``.

    Args:
        margin: the additive angular margin in degrees; scale: ``s > 0``.
        sub_centers: ``k`` proxies per class.
        num_classes: optional ``C`` to check the proxies against (``C * k`` rows).
        class_text_embeddings, margin_matrix, min_margin, max_margin, distance,
        missing_text_margin, precompute_margins: optional weak-label margins of the
            negative logits, as `atl_keras.losses.AdaptiveProxyLoss` takes them
            (`atl_keras.margins.class_margins.ClassMargins`); none: plain ArcFace.

    ``y_true`` is the labels ``[B]`` (dense class ids) or a dict with ``"label"``;
    ``from_cosines=True`` reads the cosines ``[B, C * k]`` of a `atl_keras.ProxyHead` layer
    (any functional model) instead of embeddings with ``proxies=``.
    """

    def __init__(
        self,
        margin: float = 28.6,
        scale: float = 64.0,
        sub_centers: int = 1,
        num_classes: int | None = None,
        class_text_embeddings: Any | None = None,
        margin_matrix: Any | None = None,
        min_margin: float = 0.0,
        max_margin: float = 0.2,
        distance: str = "squared_l2",
        missing_text_margin: float | None = None,
        precompute_margins: bool | None = None,
        name: str = "arcface_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype: Any = "float32",
        from_cosines: bool = False,
    ) -> None:
        super().__init__(from_cosines=from_cosines, name=name, reduction=reduction, dtype=dtype)
        self.margin = validate_number(margin, "margin", 0.0)
        self.scale = validate_number(scale, "scale", 0.0, strict=True)
        self.sub_centers = validate_sub_centers(sub_centers)
        self.class_margins = ClassMargins(
            class_text_embeddings, margin_matrix, None, min_margin, max_margin, distance,
            missing_text_margin, precompute_margins, owner="ArcFaceLoss", required=False)
        classes = self.class_margins.num_classes
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}.")
            if classes is not None and classes != num_classes:
                raise ValueError(f"num_classes={num_classes} but the class margins cover {classes} classes.")
        self._num_classes = num_classes if num_classes is not None else classes

    @property
    def num_classes(self) -> int | None:
        """Proxy rows expected: ``C * sub_centers`` (None: not checked)."""
        return None if self._num_classes is None else self._num_classes * self.sub_centers

    def compute_from_cosines(self, labels: Any, cosine: Any, sample_weight: Any) -> Any:  # noqa: D102
        labels = prepare_labels(labels, None)
        margins = self.class_margins.batch_margins(labels) if self.class_margins.active else None
        return arcface_loss_from_cosines(labels, cosine, self.margin, self.scale, self.sub_centers,
                                         margins)

    def get_config(self) -> dict[str, Any]:
        margins = self.class_margins.get_config()
        margins.pop("margin")
        return {**super().get_config(), "margin": self.margin, "scale": self.scale,
                "sub_centers": self.sub_centers, "num_classes": self._num_classes, **margins}


def arcface_from_config(config: Any, data: Any, item_text: Any) -> ArcFaceLoss:
    """``loss="arcface"``: one proxy per training item, PML 2.9's margin and scale
    (``proxy_scale`` overrides the scale)."""
    from atl_keras.losses.proxy import proxy_classes

    classes = proxy_classes(data)
    scale = 64.0 if config.proxy_scale is None else config.proxy_scale
    return ArcFaceLoss(scale=scale, num_classes=len(classes))


def weak_arcface_from_config(config: Any, data: Any, item_text: Any) -> ArcFaceLoss:
    """``loss="weak_arcface"``: ArcFace plus the items' text margins on the negative logits
    (``min_margin``/``max_margin``, like ``adaptive_proxy``)."""
    from atl_keras.losses.proxy import proxy_classes

    if data is None or item_text is None:
        raise ValueError("loss 'weak_arcface' needs the data and the item text embeddings [M, T].")
    classes = proxy_classes(data)
    scale = 64.0 if config.proxy_scale is None else config.proxy_scale
    return ArcFaceLoss(scale=scale, class_text_embeddings=item_text[classes],
                       min_margin=config.min_margin, max_margin=config.max_margin,
                       distance=config.distance, missing_text_margin=config.missing_text_margin)

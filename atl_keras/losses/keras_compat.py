"""Keras compatibility: let ``compile``/``fit`` hand dict targets to the metric losses.

Keras 3's ``CompileLoss`` matches ``y_true`` to the structure of ``y_pred``, which a loss
that reads several targets of one output (labels *and* text embeddings) cannot express;
`install_keras_target_support` bridges that for `MetricLoss` instances.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.losses.base import MetricLoss

__all__ = ["install_keras_target_support"]


def install_keras_target_support() -> bool:
    """Let Keras' ``CompileLoss`` pass dict targets unchanged to the triplet losses.

    Keras 3 (3.15) reconciles ``y_true`` with the *structure* of ``y_pred``
    before any loss runs (``keras/src/trainers/compile_utils.py``,
    ``CompileLoss.call``): a dict target ``{"label", "text_embedding"}`` for a
    single ``[B, D]`` output fails with "y_true and y_pred have different
    structures", and a one-key dict ``{"label": ...}`` is packed into its
    *key*. Losses like ours read several targets of one output, which Keras'
    structure matching cannot express. This wraps ``CompileLoss.call`` once
    (called when this module is imported): when the compiled loss is a
    `MetricLoss` without proxies (`TripletLoss`, `AdaptiveTripletLoss`, ...), ``y_pred`` is a single
    tensor and ``y_true`` a dict, the loss gets the dict as is (times its
    ``loss_weights``); every other case runs Keras' code unchanged.

    Returns:
        True if installed (or already installed), False if this Keras has no
        ``CompileLoss.call`` to wrap (then use an `ATLModel`, whose
        ``compute_loss`` passes targets through on any Keras).
    """
    try:
        from keras.src.trainers import compile_utils
    except ImportError:  # pragma: no cover - other Keras layouts
        return False
    compile_loss = getattr(compile_utils, "CompileLoss", None)
    original = getattr(compile_loss, "call", None)
    if original is None or not hasattr(compile_loss, "build"):
        return False
    if getattr(original, "_atl_dict_targets", False):
        return True

    def call(self: Any, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        loss = getattr(self, "_user_loss", None)
        if not (isinstance(loss, MetricLoss) and not loss.needs_proxies and isinstance(y_true, dict)
                and not keras.tree.is_nested(y_pred)):
            return original(self, y_true, y_pred, sample_weight)
        if not self.built:  # Keras' own bookkeeping, built from one target leaf
            self.build(keras.tree.flatten(y_true)[0], y_pred)
        value = ops.cast(loss(y_true, y_pred, sample_weight), self.dtype)
        weights = [entry.loss_weights for entry in (self._flat_losses or ())]
        if weights and weights[0] is not None:
            value = ops.multiply(value, weights[0])
        return value

    call._atl_dict_targets = True  # type: ignore[attr-defined]
    call.__doc__ = original.__doc__
    compile_loss.call = call
    return True


install_keras_target_support()

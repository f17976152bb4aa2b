"""Keras compatibility: metric losses by registered name, and dict targets.

- `get`: a loss identifier -> a loss object. Strings name a registered atl_keras loss class
  (``"TripletLoss"`` or ``"atl_keras>TripletLoss"``, built with its defaults) or a Keras
  loss; `resolve_losses` does it over a nested ``loss=`` structure. `atl_keras.ATLModel`
  and `atl_keras.MetricModel` resolve ``compile(loss="TripletLoss")`` with it (Keras' own
  ``keras.losses.get`` only knows Keras' built-in names).
- `install_keras_target_support`: an explicit opt-in (never run at import) that lets a
  plain ``keras.Model`` hand a dict target to a single-output metric loss, by wrapping
  Keras' private ``CompileLoss.call``. `atl_keras.MetricModel` (a drop-in for
  ``keras.Model(inputs, outputs)``) and `ATLModel` need no patch.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.losses.base import MetricLoss
from atl_keras.losses.registry import import_losses

__all__ = ["get", "install_keras_target_support", "resolve_losses"]


def get(identifier: Any) -> Any:
    """A loss object from a name, a config dict or a loss (returned unchanged).

    Strings: a registered atl_keras loss class name (``"TripletLoss"``,
    ``"atl_keras>AdaptiveTripletLoss"``), instantiated with its defaults, else a Keras loss
    name (``"mse"``). Losses that need arguments (``"AdaptiveProxyLoss"``: a margin source)
    raise their own error: pass an instance instead.
    """
    if isinstance(identifier, str):
        import_losses()
        registered = identifier if ">" in identifier else f"atl_keras>{identifier}"
        cls = keras.saving.get_registered_object(registered)
        if isinstance(cls, type) and issubclass(cls, keras.losses.Loss):
            return cls()
        try:
            return keras.losses.get(identifier)
        except ValueError:
            names = sorted(
                name.partition(">")[2] for name, obj in keras.saving.get_custom_objects().items()
                if name.startswith("atl_keras>") and isinstance(obj, type) and issubclass(obj, MetricLoss)
            )
            raise ValueError(
                f"Unknown loss {identifier!r}: neither an atl_keras loss ({', '.join(names)}) "
                "nor a Keras loss name."
            ) from None
    if isinstance(identifier, dict) and "class_name" in identifier:
        import_losses()
        return keras.losses.get(identifier)
    return identifier


def resolve_losses(loss: Any) -> Any:
    """`get` applied to every string in a ``loss=`` argument (a loss, a list or a dict)."""
    if isinstance(loss, dict) and "class_name" not in loss:
        return {key: resolve_losses(value) for key, value in loss.items()}
    if isinstance(loss, (list, tuple)):
        return type(loss)(resolve_losses(value) for value in loss)
    return None if loss is None else get(loss)


def install_keras_target_support() -> bool:
    """Let Keras' ``CompileLoss`` pass dict targets unchanged to the triplet losses.

    Keras 3 (3.15) reconciles ``y_true`` with the *structure* of ``y_pred``
    before any loss runs (``keras/src/trainers/compile_utils.py``,
    ``CompileLoss.call``): a dict target ``{"label", "text_embedding"}`` for a
    single ``[B, D]`` output fails with "y_true and y_pred have different
    structures", and a one-key dict ``{"label": ...}`` is packed into its
    *key*. Losses like ours read several targets of one output, which Keras'
    structure matching cannot express. This wraps ``CompileLoss.call`` once, when called
    (an explicit opt-in: importing atl_keras never does it; `atl_keras.MetricModel` and
    `atl_keras.ATLModel` need no patch): when the compiled loss is a
    `MetricLoss` without proxies (`TripletLoss`, `AdaptiveTripletLoss`, ...), ``y_pred`` is a single
    tensor and ``y_true`` a dict, the loss gets the dict as is (times its
    ``loss_weights``); every other case runs Keras' code unchanged.

    Returns:
        True if installed (or already installed), False if this Keras has no
        ``CompileLoss.call`` to wrap (then use `atl_keras.MetricModel` or `ATLModel`,
        whose ``compute_loss`` passes targets through on any Keras).
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

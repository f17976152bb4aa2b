"""`MetricModel`: a `keras.Model` whose losses get each output's whole target, nested or not.

Keras 3's ``CompileLoss`` matches ``y_true`` leaf by leaf to the outputs, so a loss that
reads several targets of one output (ATL's ``{"label", "text_embedding"}``) cannot be
compiled into a plain ``keras.Model``. `MetricModel` takes the same arguments as
``keras.Model`` (functional ``MetricModel(inputs, outputs)`` or subclassed) and overrides
the public ``compute_loss``: each output's loss gets that output's target as it is.

    inputs = keras.Input((28, 28, 1))
    embedding = keras.layers.UnitNormalization()(keras.layers.Dense(64)(keras.layers.Flatten()(inputs)))
    cosines = atl.ProxyHead(num_proxies=10, embedding_dim=64)(embedding)
    model = atl.MetricModel(inputs, {"embedding": embedding, "proxy": cosines})
    model.compile("adam", loss={"embedding": "AdaptiveTripletLoss",
                                "proxy": atl.ProxyAnchorLoss(from_cosines=True)},
                  loss_weights={"embedding": 1.0, "proxy": 0.5})
    model.fit(x, {"embedding": {"label": labels, "text_embedding": text}, "proxy": labels})
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.losses.keras_compat import resolve_losses

__all__ = ["LossNamesMixin", "MetricModel", "structured_loss"]


def _by_output(value: Any, names: list[str], what: str) -> dict[str, Any]:
    """A dict / list / single value over the outputs -> dict keyed by output name."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(f"{what} has {len(value)} entries but the model has {len(names)} "
                             f"outputs ({', '.join(names)}).")
        return dict(zip(names, value))
    if len(names) != 1:
        raise ValueError(f"{what} is a single value but the model has {len(names)} outputs "
                         f"({', '.join(names)}): give a dict keyed by output name.")
    return {names[0]: value}


def structured_loss(
    loss: Any, y: Any, y_pred: Any, output_names: list[str],
    sample_weight: Any = None, loss_weights: Any = None,
) -> Any:
    """``sum_k w_k * loss_k(y[k], y_pred[k])`` over the outputs that have a loss.

    Args:
        loss: one loss (single output) or a dict / list of losses (None: no loss).
        y: the target; per output anything the output's loss reads (a dict is passed whole).
        y_pred: one tensor, or a dict / list of tensors (one per output).
        output_names: the model's output names (maps lists to names).
        sample_weight: None, one ``[B]`` tensor for every output, or one per output.
        loss_weights: None, a number (single output) or a dict / list of numbers.

    Returns:
        Float32 scalar.
    """
    single = not isinstance(y_pred, (dict, list, tuple))
    if single and not isinstance(loss, (dict, list, tuple)):
        entries = {"output": (loss, y, y_pred, sample_weight, loss_weights)}
    else:
        names = list(y_pred) if isinstance(y_pred, dict) else list(output_names)
        preds = _by_output(y_pred, names, "y_pred")
        losses = _by_output(loss, names, "loss")
        active = [name for name, fn in losses.items() if fn is not None]
        if isinstance(y, dict) and set(active) <= set(y):
            targets = y
        elif isinstance(y, (list, tuple)) and len(y) == len(names):
            targets = dict(zip(names, y))
        elif len(active) == 1:  # one output with a loss: y is its whole target
            targets = {active[0]: y}
        else:
            raise ValueError(f"y must give a target per output with a loss ({', '.join(active)}): "
                             "a dict keyed by output name (values may be dicts themselves).")
        weights = {} if loss_weights is None else _by_output(loss_weights, names, "loss_weights")
        per_output_weight = isinstance(sample_weight, (dict, list, tuple))
        weights_by = _by_output(sample_weight, names, "sample_weight") if per_output_weight else {}
        entries = {}
        for name, fn in losses.items():
            if fn is None:
                continue
            if name not in preds:
                raise ValueError(f"loss has an entry {name!r} but the model's outputs are "
                                 f"{', '.join(preds)}.")
            if name not in targets:
                raise ValueError(f"The output {name!r} has a loss but y has no {name!r} entry "
                                 f"(y has {', '.join(map(str, targets))}).")
            weight = weights_by.get(name) if per_output_weight else sample_weight
            entries[name] = (fn, targets[name], preds[name], weight, weights.get(name))
    total = None
    for name, (fn, y_k, pred_k, sample_weight_k, weight_k) in entries.items():
        if getattr(fn, "needs_proxies", False):
            raise ValueError(
                f"{type(fn).__name__} on output {name!r} needs the class proxies: put an "
                "atl_keras.ProxyHead in the model (its output: cosines [B, C]) and build the "
                "loss with from_cosines=True, or use ATLModel(num_proxies=C)."
            )
        if isinstance(fn, keras.losses.Loss):
            value = fn(y_k, pred_k) if sample_weight_k is None else fn(y_k, pred_k, sample_weight_k)
        else:  # a Keras loss function ("mse"): per-sample values, mean over the batch
            values = ops.cast(fn(y_k, pred_k), "float32")
            if sample_weight_k is not None:
                values = values * ops.reshape(ops.cast(sample_weight_k, "float32"), ops.shape(values))
            value = ops.mean(values)
        value = ops.cast(value, "float32")
        if weight_k is not None:
            value = value * float(weight_k)
        total = value if total is None else total + value
    if total is None:
        raise ValueError("No output has a loss: compile(loss=...) with a loss for at least one output.")
    return total


class LossNamesMixin:
    """``compile(loss=...)`` accepts registered loss names (`atl_keras.losses.get`) in any
    structure; a saved model compiles again on load (``compile_from_config``)."""

    def compile(self, optimizer: Any = "rmsprop", loss: Any = None, loss_weights: Any = None,
                **kwargs: Any) -> None:
        self._metric_loss_weights = loss_weights
        super().compile(optimizer=optimizer, loss=resolve_losses(loss), loss_weights=loss_weights,
                        **kwargs)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """Keras' ``compile_from_config`` (it skips models that override ``compile``)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)


@keras.saving.register_keras_serializable(package="atl_keras")
class MetricModel(LossNamesMixin, keras.Model):
    """`keras.Model` for metric losses: same constructor, ``compile`` accepts registered loss
    names (``"TripletLoss"``) and each output's loss gets its whole target (a dict such as
    ``{"label", "text_embedding"}``, also nested per output in a multi-output model).

    No Keras internals are patched: only the public ``compute_loss`` is overridden.
    """

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Sum over outputs of ``loss_weight * loss(target, output)`` + regularisation losses."""
        del x, training
        if self.loss is None:
            raise ValueError("MetricModel has no loss: call model.compile(optimizer, loss=...) first.")
        if y is None:
            raise ValueError("MetricModel.fit/evaluate needs targets: batches must be (x, y).")
        total = structured_loss(self.loss, y, y_pred, list(self.output_names or ()),
                                sample_weight, getattr(self, "_metric_loss_weights", None))
        for extra in self.losses:
            total = total + ops.cast(self._aggregate_additional_loss(extra), "float32")
        return total

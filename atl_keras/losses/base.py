"""The base of every metric loss: targets, labels, embeddings, replica scaling.

A metric loss reads a *batch*: labels ``[B]`` (item ids, never cast to float: ids may
exceed 2**24), embeddings ``[B, D]`` and, for weak-label margins, text embeddings
``[B, T]``. Keras hands a loss ``(y_true, y_pred)``; `split_targets` turns ``y_true``
(labels, or a dict ``{"label": [B], "text_embedding": [B, T]}``) into labels and text.

`MetricLoss` is the public base class: a subclass implements ``call(y_true, y_pred)``
(usually `split_targets` + a pure function of tensors) and ``get_config``; the base class
refuses ``sample_weight`` (a mean over mined pairs/triplets has no per-sample term), casts
the result to the loss dtype and divides by the replica count under `tf.distribute`, like
Keras' own mean losses (`scale_for_distribution`).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.distances import compute_dtype

__all__ = [
    "MetricLoss",
    "pair_masks",
    "prepare_embeddings",
    "prepare_labels",
    "scale_for_distribution",
    "split_targets",
]

#: Reductions after which a loss is a mean, divided by the replica count like Keras' own.
MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")

def prepare_labels(labels: Any, batch_size: int | None) -> Any:
    """Labels ``[B]`` or ``[B, 1]`` -> ``[B]``, dtype untouched (``batch_size``: rows to match)."""
    labels = ops.convert_to_tensor(labels)
    if len(labels.shape) == 2 and labels.shape[1] == 1:
        labels = ops.reshape(labels, (-1,))
    if len(labels.shape) != 1:
        raise ValueError(
            f"labels must have shape [batch] or [batch, 1]; got {tuple(labels.shape)}."
        )
    if batch_size is not None and labels.shape[0] is not None and labels.shape[0] != batch_size:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but embeddings has {batch_size} rows; "
            "pass one label per embedding."
        )
    return labels


def prepare_embeddings(embeddings: Any, name: str = "embeddings") -> Any:
    """``[B, D]`` -> the same in its compute dtype (float32 for half precision)."""
    embeddings = ops.convert_to_tensor(embeddings)
    if len(embeddings.shape) != 2:
        raise ValueError(
            f"{name} must have shape [batch, dim]; got {tuple(embeddings.shape)}."
        )
    return ops.cast(embeddings, compute_dtype(embeddings))


def pair_masks(labels: Any) -> tuple[Any, Any]:
    """``[B]`` labels -> (positive mask, negative mask), both ``[B, B]`` bool."""
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    index = ops.arange(ops.shape(labels)[0])
    diagonal = ops.equal(ops.expand_dims(index, 1), ops.expand_dims(index, 0))
    positive = ops.logical_and(same, ops.logical_not(diagonal))
    return positive, ops.logical_not(same)


_TARGET_HELP = (
    "y_true must be a dict {'label': int [batch], 'text_embedding': float [batch, T]}"
)


def split_targets(y_true: Any, need_text: bool, loss_name: str) -> tuple[Any, Any | None]:
    """``y_true`` (labels ``[B]`` or a dict with ``label`` and ``text_embedding``) ->
    (labels, text embeddings ``[B, T]`` or None); raises if ``need_text`` and there is none."""
    if isinstance(y_true, dict):
        if "label" not in y_true:
            raise ValueError(
                f"{loss_name}: y_true dict has keys {sorted(y_true)} but no 'label'. "
                f"{_TARGET_HELP}."
            )
        text = y_true.get("text_embedding")
        if need_text and text is None:
            raise ValueError(
                f"{loss_name} needs text embeddings: y_true has no 'text_embedding'. "
                f"{_TARGET_HELP}."
            )
        return y_true["label"], text
    if isinstance(y_true, str):  # Keras' CompileLoss packs a one-key dict into its key
        raise ValueError(
            f"{loss_name} received y_true={y_true!r} (a dict key): Keras' compile() cannot hand "
            "a dict target to one output of a plain keras.Model. Build the model as "
            "atl_keras.MetricModel(inputs, outputs) (same arguments as keras.Model; nested "
            "target dicts per output work) or an ATLModel, or call "
            "atl_keras.losses.install_keras_target_support() once. "
            f"{_TARGET_HELP}."
        )
    if need_text:
        raise ValueError(
            f"{loss_name} needs text embeddings but y_true is a single tensor "
            f"(labels only). {_TARGET_HELP}. Use TripletLoss for labels alone."
        )
    return y_true, None


def scale_for_distribution(loss: Any) -> Any:
    """Divide by the replica count under tf.distribute, like Keras' own losses.

    Keras sums gradients over replicas, so built-in losses with a mean
    reduction return ``loss / num_replicas`` per replica; Keras' loss tracker
    undoes this for display. The pure functions above return the unscaled mean.
    """
    if keras.backend.backend() != "tensorflow":
        return loss
    import tensorflow as tf  # only for the strategy lookup

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss * (1.0 / replicas) if replicas > 1 else loss


class MetricLoss(keras.losses.Loss):
    """Base class of the metric losses: ``loss(y_true, y_pred)`` -> float32 scalar.

    Subclasses implement ``call(y_true, y_pred)`` (use `split_targets`) and extend
    ``get_config``. Class attributes:

    - ``needs_text``: ``y_true`` must carry ``text_embedding`` (documentation and the
      Keras compatibility layer read it).
    - ``needs_proxies``: the loss takes the class proxies (``loss(..., proxies=P)``);
      `atl_keras.model.ATLModel.compute_loss` passes its own.
    """

    needs_text = False
    needs_proxies = False

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Loss of a batch.

        Args:
            y_true: labels ``[B]``/``[B, 1]`` or a dict
                ``{"label": [B], "text_embedding": [B, T]}``. Labels are not cast
                to float (item ids may exceed 2**24).
            y_pred: ``[B, D]`` embeddings (any float dtype; math in float32).
            sample_weight: not supported (must be None): the loss is a mean
                over triplets mined across the batch, so a sample's weight has
                no single term to scale (a weighted anchor changes which
                negatives are hardest for the others too).

        Returns:
            Float32 scalar.
        """
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} does not support sample_weight or class_weight: it "
                "averages over triplets mined across the whole batch, not over samples. "
                "Remove sample_weight/class_weight from fit() (balance items in the sampler, "
                "e.g. atl_keras.data.pk_dataset, instead)."
            )
        with keras.name_scope(self.name):
            return self.finish(self.call(y_true, y_pred))

    def finish(self, loss: Any) -> Any:
        """Cast to the loss dtype; divide by the replica count after a mean reduction."""
        loss = ops.cast(loss, self.dtype)
        if self.reduction in MEAN_REDUCTIONS:
            loss = scale_for_distribution(loss)
        return loss

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction, "dtype": self.dtype}

"""`ATLModel`: pixels -> backbone -> global pooling -> projection -> L2-normalised embedding.

    model = ATLModel("small_cnn", input_shape=(28, 28, 1), embedding_dim=64)
    model.compile(keras.optimizers.Adam(1e-3), loss=atl.AdaptiveTripletLoss())
    model.fit(pk_dataset(images, labels, text_embeddings, p=8, k=4), steps_per_epoch=100)
    vectors = model.embed(images)                  # np.ndarray [N, 64], unit norm, float32
    model.save("atl.keras"); keras.models.load_model("atl.keras")

Batches for ``fit``/``evaluate`` are ``(images [B, H, W, C] float32 in [0, 255],
{"label": int64 [B], "text_embedding": float32 [B, T]})`` (or just the label tensor for
losses that ignore text). The whole target structure goes to the compiled loss as
``loss(y_true, y_pred)``; see `ATLModel.compute_loss`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from atl_keras.backbones import build_backbone
from atl_keras.distribute import gather_replicas, in_multi_replica_context
from atl_keras.losses.triplet import AdaptiveTripletLoss, TripletLoss, triplet_statistics
from atl_keras.metric_model import LossNamesMixin
from atl_keras.proxies import ProxyHead

__all__ = ["ATLModel", "GeneralizedMeanPooling", "L2Normalization", "POOLINGS", "PROXY_STATISTICS",
           "TRIPLET_STATISTICS"]

#: Batch statistics tracked as metrics while training with TripletLoss / AdaptiveTripletLoss.
TRIPLET_STATISTICS = ("fraction_active", "mean_active_margin")
#: Batch statistics tracked while training with a proxy loss (`atl_keras.losses.proxy`):
#: the share of rows whose nearest proxy (cosine) is their own class's.
PROXY_STATISTICS = ("proxy_accuracy",)

POOLINGS = ("avg", "max", "gem")


@keras.saving.register_keras_serializable(package="atl_keras")
class GeneralizedMeanPooling(layers.Layer):
    """GeM pooling (Radenović et al. 2018): ``(mean_hw clamp(x, eps)^p)^(1/p)``.

    ``[B, H, W, C] -> [B, C]``. ``p = 1`` is average pooling, ``p -> inf`` max pooling;
    ``p`` is learned when ``trainable_p``. Computed in float32 (``x^p`` overflows float16).
    """

    def __init__(self, p: float = 3.0, trainable_p: bool = True, epsilon: float = 1e-6, **kwargs: Any):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if p <= 0:
            raise ValueError(f"GeM exponent p must be > 0, got {p}.")
        self.initial_p = float(p)
        self.trainable_p = bool(trainable_p)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_p),
            trainable=self.trainable_p,
        )

    def call(self, x):
        x = ops.cast(x, "float32")
        p = ops.maximum(ops.cast(self.p, "float32"), 1e-3)
        pooled = ops.mean(ops.power(ops.maximum(x, self.epsilon), p), axis=(1, 2))
        return ops.power(pooled, 1.0 / p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "p": self.initial_p,
            "trainable_p": self.trainable_p,
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package="atl_keras")
class L2Normalization(layers.Layer):
    """``x / ||x||_2`` along the last axis, always in float32. ``[B, D] -> [B, D]`` unit rows.

    Rows are first divided by their max-abs value (a constant for the gradient: the result
    is scale invariant), so tiny features (e.g. an untrained ImageNet architecture in
    inference mode gives ~1e-10) still come out with unit norm. A zero row stays zero with a
    finite gradient (``epsilon`` bounds the squared norm from below).
    """

    def __init__(self, epsilon: float = 1e-12, **kwargs: Any):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, x):
        x = ops.cast(x, "float32")
        scale = ops.stop_gradient(ops.max(ops.abs(x), axis=-1, keepdims=True))
        x = x * ops.where(scale > 1e-30, 1.0 / ops.maximum(scale, 1e-30), 1.0)
        squared_norm = ops.sum(ops.square(x), axis=-1, keepdims=True)
        return x * ops.rsqrt(ops.maximum(squared_norm, self.epsilon))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("dtype", None)
        return {**config, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="atl_keras")
class ATLModel(LossNamesMixin, keras.Model):
    """Embedding model: ``[B, H, W, C]`` pixels in [0, 255] -> ``[B, embedding_dim]`` float32, unit L2 norm.

    Args:
        backbone: name for `atl_keras.backbones.build_backbone` (``"small_cnn"``,
            ``"resnet50"``, ``"efficientnetv2-s"``, ...).
        input_shape: ``(H, W, C)`` of the images, C in {1, 3}.
        embedding_dim: size D of the output embedding.
        pooling: ``"avg"``, ``"max"`` or ``"gem"`` (generalized mean, learned exponent).
        weights: backbone initialisation: ``None``, ``"imagenet"`` (from Keras' local cache only)
            or a local weights file. Only used when the model is created; a saved ``.keras``
            model carries its trained weights, so `from_config` builds with ``weights=None``.
        dropout: dropout rate before the projection (0 disables it).
        cross_replica_mining: under a `tf.distribute` strategy with R > 1 replicas, all-gather
            embeddings and targets so triplets are mined over the *global* batch (every
            replica sees all ``R * b`` rows as negatives) instead of each replica's ``b`` rows.
            The gradient equals the global-batch gradient on one device (see `compute_loss`).
            No effect with one replica. (BatchNormalization statistics stay per replica,
            as everywhere in Keras: layers in training mode see the local rows only.)
        track_triplet_statistics: with `TripletLoss` / `AdaptiveTripletLoss`, track
            ``fraction_active`` (violating / valid triplets) and ``mean_active_margin``
            (mean margin of violating triplets) of each (global) batch as metrics, shown
            in History and TensorBoard. ``O(B^2 log B)``, no gradient. With a proxy loss
            it tracks ``proxy_accuracy`` instead (rows whose nearest proxy is their class's;
            ``O(B C D)``); statistics that do not apply to the compiled loss are not logged.
        num_proxies: C > 0 adds a `atl_keras.proxies.ProxyHead` of C class proxies (labels
            0..C-1) for proxy losses (`atl_keras.losses.proxy`); ``compute_loss`` passes them
            as ``loss(y, y_pred, proxies=...)``. Not on the inference path (``call``).
        proxy_learning_rate_multiplier: the head's learning-rate multiplier (see `ProxyHead`).

    The model is built in ``__init__``, so weights exist before ``fit``/``save``. Under a
    ``mixed_float16`` / ``mixed_bfloat16`` policy the backbone and projection run in half
    precision and the output is normalised and returned in float32 (so the loss is float32).
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        input_shape: Sequence[int] = (28, 28, 1),
        embedding_dim: int = 128,
        pooling: str = "avg",
        weights: str | os.PathLike | None = None,
        dropout: float = 0.0,
        cross_replica_mining: bool = True,
        track_triplet_statistics: bool = True,
        num_proxies: int = 0,
        proxy_learning_rate_multiplier: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for flag, value in (
            ("cross_replica_mining", cross_replica_mining),
            ("track_triplet_statistics", track_triplet_statistics),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}.")
        if not isinstance(backbone, str):
            raise ValueError(
                f"backbone must be a backbone name (str), got {type(backbone).__name__}; see "
                "atl_keras.backbones.available_backbones()."
            )
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {pooling!r}; expected one of {POOLINGS}.")
        if not isinstance(embedding_dim, int) or embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.backbone_name = backbone
        self.image_shape = tuple(int(d) for d in input_shape)
        self.embedding_dim = embedding_dim
        self.pooling = pooling
        self.initial_weights = os.fspath(weights) if weights is not None else None
        self.dropout_rate = float(dropout)
        self.cross_replica_mining = cross_replica_mining
        self.track_triplet_statistics = track_triplet_statistics

        self.backbone = build_backbone(backbone, self.image_shape, weights=weights)
        self.statistics = (
            {name: keras.metrics.Mean(name=name) for name in TRIPLET_STATISTICS}
            if track_triplet_statistics
            else {}
        )
        if pooling == "avg":
            self.pool = layers.GlobalAveragePooling2D(name="avg_pool")
        elif pooling == "max":
            self.pool = layers.GlobalMaxPooling2D(name="max_pool")
        else:
            self.pool = GeneralizedMeanPooling(name="gem_pool")
        self.dropout = layers.Dropout(self.dropout_rate, name="dropout") if self.dropout_rate else None
        self.projection = layers.Dense(embedding_dim, name="projection")
        self.l2_normalize = L2Normalization(name="l2_normalize")
        self.num_proxies = int(num_proxies)
        self.proxy_learning_rate_multiplier = float(proxy_learning_rate_multiplier)
        self.proxy_head = (
            ProxyHead(self.num_proxies, embedding_dim, self.proxy_learning_rate_multiplier, name="proxy_head")
            if self.num_proxies
            else None
        )
        self.proxy_statistics = (
            {name: keras.metrics.Mean(name=name) for name in PROXY_STATISTICS}
            if track_triplet_statistics and self.num_proxies
            else {}
        )
        self.build((None, *self.image_shape))

    def build(self, input_shape):
        features = self.backbone.output_shape
        if len(features) == 4:
            self.pool.build(features)
            features = self.pool.compute_output_shape(features)
        self.projection.build(features)
        self.l2_normalize.build((None, self.embedding_dim))
        if self.proxy_head is not None:
            self.proxy_head.build()
        self.built = True

    def call(self, images, training: bool | None = None):
        """``images [B, H, W, C]`` (any real dtype, pixels in [0, 255]) -> ``[B, D]`` float32."""
        x = self.backbone(ops.cast(images, "float32"), training=training)
        if len(x.shape) == 4:
            x = self.pool(x)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        x = self.projection(x)
        return self.l2_normalize(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    # ------------------------------------------------------------------ training
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Total loss = ``self.loss(y, y_pred[, sample_weight])`` + regularisation losses.

        Overrides `keras.Model.compute_loss` because Keras' ``CompileLoss`` maps targets onto
        outputs one to one and cannot hand a dict target (``{"label", "text_embedding"}``) to
        a single-output loss. As in Keras, `train_step`/`test_step` record the returned value
        in the ``"loss"`` tracker (progress bar, History, ``evaluate``).

        Cross-replica mining (``cross_replica_mining=True``, R > 1 replicas): ``y_pred`` and
        ``y`` are all-gathered to the global ``[R * b, ...]`` batch, so every replica
        computes the same global loss ``L``; the loss classes divide it by R (as every Keras
        loss does under a strategy), the gradient of the all-gather sums the replicas'
        gradients of the gathered embeddings and keeps the local rows, and Keras sums the
        weight gradients over replicas: the update is exactly the one-device gradient of
        ``L`` on the global batch.

        Args:
            y: the batch target, passed unchanged to the loss (dict or label tensor ``[B]``).
            y_pred: embeddings ``[B, D]``.
        Returns:
            Scalar float32 loss.
        """
        del x, training
        if self.loss is None:
            raise ValueError(
                "ATLModel has no loss: call model.compile(optimizer, "
                "loss=atl_keras.AdaptiveTripletLoss(...)) (or TripletLoss) before fit/evaluate."
            )
        if y is None:
            raise ValueError(
                "ATLModel.fit/evaluate needs targets: batches must be (images, "
                '{"label": [B], "text_embedding": [B, T]}) or (images, labels [B]); got images only.'
            )
        loss_fn = self.loss
        if self.cross_replica_mining and in_multi_replica_context():
            if sample_weight is not None:
                raise ValueError(
                    "cross_replica_mining does not support sample_weight; remove it or build "
                    "ATLModel(cross_replica_mining=False)."
                )
            y_pred, y = gather_replicas((y_pred, y))
        if self.statistics:
            self._update_triplet_statistics(loss_fn, y, y_pred)
        extra = {}
        if getattr(loss_fn, "needs_proxies", False):  # atl_keras.losses.proxy
            if self.proxy_head is None:
                raise ValueError(
                    f"{type(loss_fn).__name__} needs class proxies: build "
                    "ATLModel(..., num_proxies=<number of training classes>)."
                )
            extra["proxies"] = self.proxy_head.proxies
            if self.proxy_statistics:
                self._update_proxy_statistics(y, y_pred)
        if sample_weight is None:
            value = loss_fn(y, y_pred, **extra)
        else:
            value = loss_fn(y, y_pred, sample_weight, **extra)
        total = ops.cast(value, "float32")
        for extra in self.losses:
            total = total + ops.cast(self._aggregate_additional_loss(extra), "float32")
        return total

    def fit(self, *args: Any, **kwargs: Any):
        """`keras.Model.fit`; with a ``tf.data.Dataset`` (e.g. `pk_dataset`, which already
        randomises its batches) ``shuffle`` defaults to False, since Keras ignores
        ``shuffle=True`` for datasets and warns that it does."""
        x = args[0] if args else kwargs.get("x")
        if "shuffle" not in kwargs and len(args) < 9 and isinstance(x, tf.data.Dataset):
            kwargs["shuffle"] = False
        return super().fit(*args, **kwargs)

    def train_step(self, *args):
        """Keras' step: ``(data)`` on TensorFlow and PyTorch, ``(state, data)`` on JAX (which
        returns ``(logs, state)``)."""
        return self._multi_worker_logs(super().train_step(*args))

    def test_step(self, *args):
        return self._multi_worker_logs(super().test_step(*args))

    def _multi_worker_logs(self, logs: Any) -> Any:
        """Scalar logs -> ``[1]`` under MultiWorkerMirroredStrategy.

        Keras (3.15) averages step logs across workers with ``strategy.reduce("MEAN", v,
        axis=0)``, which rejects scalars; on ``[1]`` tensors it is the mean over replicas.
        """
        if keras.backend.backend() != "tensorflow" or not isinstance(
            self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy
        ):
            return logs
        return tf.nest.map_structure(
            lambda v: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v, logs
        )

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' symbolic build, taking shapes from this worker's first replica.

        Keras (3.15) reduces a per-replica batch with ``strategy.reduce("MEAN", ...)`` only to
        read its shapes; under MultiWorkerMirroredStrategy that reduce fails on an eager
        ``PerReplica`` (batches from `distribute_datasets_from_function`). The first local
        replica's tensors have the per-replica shapes the build needs, with no collective.
        """
        strategy = getattr(self, "_distribute_strategy", None)
        if strategy is None or iterator is None or keras.backend.backend() != "tensorflow":
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            data_batch = next(batches)
            break

        def local(value: Any) -> Any:
            if isinstance(value, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(value)[0]
            return value

        data_batch = tf.nest.map_structure(local, data_batch)
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def _update_triplet_statistics(self, loss_fn: Any, y: Any, y_pred: Any) -> None:
        """Update the ``fraction_active`` / ``mean_active_margin`` metrics (no gradient)."""
        labels = y["label"] if isinstance(y, dict) else y
        if isinstance(loss_fn, AdaptiveTripletLoss) and isinstance(y, dict):
            stats = triplet_statistics(
                labels,
                y_pred,
                y.get("text_embedding"),
                min_margin=loss_fn.min_margin,
                max_margin=loss_fn.max_margin,
                distance=loss_fn.distance,
                semantic_threshold=loss_fn.semantic_threshold,
            )
        elif isinstance(loss_fn, TripletLoss):
            stats = triplet_statistics(
                labels, y_pred, margin=loss_fn.margin, distance=loss_fn.distance
            )
        else:  # another loss: nothing meaningful to report
            return
        for name, metric in self.statistics.items():
            metric.update_state(ops.stop_gradient(stats[name]))

    def _update_proxy_statistics(self, y: Any, y_pred: Any) -> None:
        """Update ``proxy_accuracy``: rows of ``y_pred [B, D]`` whose nearest proxy (cosine)
        is their label's (no gradient)."""
        labels = ops.reshape(y["label"] if isinstance(y, dict) else y, (-1,))
        proxies = ops.stop_gradient(self.proxy_head.proxies)  # [C, D]
        norms = ops.sqrt(ops.maximum(ops.sum(ops.square(proxies), axis=1), 1e-12))  # [C]
        cosine = ops.matmul(ops.stop_gradient(ops.cast(y_pred, "float32")), ops.transpose(proxies)) / norms
        nearest = ops.argmax(cosine, axis=1)  # [B]
        hits = ops.cast(ops.equal(ops.cast(nearest, "int64"), ops.cast(labels, "int64")), "float32")
        self.proxy_statistics["proxy_accuracy"].update_state(ops.mean(hits))

    @property
    def metrics(self) -> list:
        """Keras' metrics without the batch statistics that do not apply to the compiled loss
        (triplet statistics of a proxy or margin-table loss would read 0: they are not logged)."""
        metrics = super().metrics
        loss_fn = getattr(self, "loss", None)
        if loss_fn is None:
            return metrics
        hidden = []
        if not isinstance(loss_fn, (AdaptiveTripletLoss, TripletLoss)):
            hidden += list(getattr(self, "statistics", {}).values())
        if not getattr(loss_fn, "needs_proxies", False):
            hidden += list(getattr(self, "proxy_statistics", {}).values())
        hidden_ids = {id(m) for m in hidden}
        return [m for m in metrics if id(m) not in hidden_ids]

    # ----------------------------------------------------------------- inference
    def embed(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Embeddings of ``images`` as a float32 numpy array ``[N, D]`` (unit rows).

        ``images`` is an array ``[N, H, W, C]`` (pixels in [0, 255]), a *finite*
        ``tf.data.Dataset`` of image batches or of ``(images, y)`` / ``(images, y, w)`` batches,
        or a sequence of image files / encoded images (decoded with the model's
        `atl_keras.preprocessing`; a bad one raises `ImageDecodeError`, see
        `atl_keras.embedding.embed_images` to skip them instead). ``batch_size`` applies to
        arrays and files.
        """
        from atl_keras.embedding import embed_images

        if isinstance(images, tf.data.Dataset):
            spec = images.element_spec
            if isinstance(spec, dict):
                raise ValueError(
                    "embed() takes a dataset of image batches or of (images, y) tuples, "
                    f"got a dataset of dicts with keys {sorted(spec)}."
                )
            if images.cardinality() == tf.data.INFINITE_CARDINALITY:
                raise ValueError(
                    "embed() got an infinite dataset (e.g. pk_dataset); pass a finite dataset "
                    "or an array of images."
                )
        elif isinstance(images, (np.ndarray, tf.Tensor)) and np.asarray(images).dtype.kind not in "OSU":
            images = np.asarray(images)
            if images.ndim == len(self.image_shape):  # a single image
                raise ValueError(
                    f"embed() expects a batch [N, {', '.join(map(str, self.image_shape))}], got one "
                    f"image of shape {images.shape}; use images[None]."
                )
            if images.shape[1:] != self.image_shape:
                raise ValueError(
                    f"embed() expects images of shape [N, {', '.join(map(str, self.image_shape))}], got "
                    f"{images.shape}."
                )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        return embed_images(self, images, batch_size=batch_size, strict=True).vectors

    # ------------------------------------------------------------- serialisation
    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            backbone=self.backbone_name,
            input_shape=list(self.image_shape),
            embedding_dim=self.embedding_dim,
            pooling=self.pooling,
            weights=self.initial_weights,
            dropout=self.dropout_rate,
            cross_replica_mining=self.cross_replica_mining,
            track_triplet_statistics=self.track_triplet_statistics,
            num_proxies=self.num_proxies,
            proxy_learning_rate_multiplier=self.proxy_learning_rate_multiplier,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ATLModel":
        config = dict(config)
        # The initial weights were only an initialisation; saved models carry trained weights
        # (and a weights path / ImageNet cache may not exist where the model is loaded).
        config["weights"] = None
        return cls(**config)

"""Class proxies as model weights: `ProxyHead` and `strip_proxies`.

``ATLModel(..., num_proxies=C)`` owns a `ProxyHead` (``C`` proxies of the embedding size) and
passes its proxies to a proxy loss (`atl_keras.losses.proxy`) in ``compute_loss``. The head
is not on the inference path (``model(images)`` and the export never compute it);
`strip_proxies` returns the same embedding model without it, e.g. before exporting.

    model = atl.ATLModel("small_cnn", input_shape=(32, 32, 3), num_proxies=C,
                         proxy_learning_rate_multiplier=10.0)
    model.compile(keras.optimizers.Adam(1e-3), loss=atl.AdaptiveProxyLoss(class_text_embeddings=G))
    model.fit(pk_dataset(...), steps_per_epoch=100)
    embedder = atl.strip_proxies(model)        # same weights, no proxies
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops

from atl_keras.distances import l2_normalize

__all__ = ["ProxyHead", "strip_proxies"]


@keras.saving.register_keras_serializable(package="atl_keras")
class ProxyHead(layers.Layer):
    """``C`` learnable proxies ``[C, D]`` (float32 also under mixed precision).

    Args:
        num_proxies: ``C``, one per training class (labels ``0..C-1``).
        embedding_dim: ``D``.
        learning_rate_multiplier: ``mu > 0``. The stored variable is ``v = p / mu`` and
            `proxies` returns ``mu * v``, so the gradient reaching ``v`` is ``mu`` times the
            proxies' gradient. For optimisers whose step does not depend on the gradient's
            scale (Adam, AdamW, Adamax, RMSprop, Adagrad, Lion, ...) this moves the proxies
            ``mu`` times as far per step as the rest of the model: a learning-rate multiplier
            (proxy methods use 10-100x). With plain SGD the step is multiplied by ``mu**2``.
            Weight decay on ``v`` decays ``p`` at the base rate.
        seed: seed of the initialiser: i.i.d. normal directions, unit-norm rows (the losses
            normalise proxies, so only directions matter).

    As a layer in any functional model (the proxy / ArcFace-style head),
    ``head(embeddings [B, D])`` returns the cosines ``[B, C]`` between the L2-normalised
    embeddings and proxies; a proxy loss built with ``from_cosines=True`` reads them
    (labels-only targets, no proxies argument):

        cosines = atl.ProxyHead(num_proxies=C, embedding_dim=D)(embeddings)
        model = atl.MetricModel(inputs, {"embedding": embeddings, "proxy": cosines})
        model.compile("adam", loss={"proxy": atl.ProxyAnchorLoss(from_cosines=True)})

    ``head()`` without input returns `proxies` ``[C, D]`` (what `ATLModel` passes to the loss).
    """

    def __init__(
        self,
        num_proxies: int,
        embedding_dim: int,
        learning_rate_multiplier: float = 1.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        for name, value in (("num_proxies", num_proxies), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        multiplier = float(learning_rate_multiplier)
        if not np.isfinite(multiplier) or multiplier <= 0:
            raise ValueError(
                f"learning_rate_multiplier must be a finite number > 0, got {learning_rate_multiplier!r}."
            )
        self.num_proxies = int(num_proxies)
        self.embedding_dim = int(embedding_dim)
        self.learning_rate_multiplier = multiplier
        self.seed = seed

    def build(self, input_shape: Any = None) -> None:
        multiplier = self.learning_rate_multiplier
        normal = keras.initializers.RandomNormal(seed=self.seed)

        def initializer(shape: Any, dtype: Any = None) -> Any:
            x = normal(shape, dtype="float32")
            x = x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=1, keepdims=True), 1e-12))
            return ops.cast(x / multiplier, dtype or "float32")

        self.scaled_proxies = self.add_weight(
            name="proxies",
            shape=(self.num_proxies, self.embedding_dim),
            initializer=initializer,
            dtype="float32",
            trainable=True,
        )
        self.built = True

    @property
    def proxies(self) -> Any:
        """``[C, D]`` float32 proxies (not normalised)."""
        return ops.cast(self.scaled_proxies, "float32") * self.learning_rate_multiplier

    def call(self, inputs: Any = None) -> Any:
        """No input: the proxies ``[C, D]``. Embeddings ``[B, D]``: cosines ``[B, C]``."""
        if inputs is None:
            return self.proxies
        embeddings = ops.cast(inputs, "float32")
        return ops.matmul(l2_normalize(embeddings), ops.transpose(l2_normalize(self.proxies)))

    def compute_output_shape(self, input_shape: Any = None) -> tuple[Any, int]:
        if input_shape is None:
            return (self.num_proxies, self.embedding_dim)
        return (input_shape[0], self.num_proxies)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("dtype", None)
        return {
            **config,
            "num_proxies": self.num_proxies,
            "embedding_dim": self.embedding_dim,
            "learning_rate_multiplier": self.learning_rate_multiplier,
            "seed": self.seed,
        }


def strip_proxies(model: keras.Model) -> keras.Model:
    """A copy of an `ATLModel` without its proxy head (same embedding weights).

    Returns the model unchanged if it has no proxies.
    """
    head = getattr(model, "proxy_head", None)
    if head is None:
        return model
    config = model.get_config()
    config["num_proxies"] = 0
    stripped = type(model).from_config(config)
    head_weights = {id(w) for w in head.weights}
    source = [w for w in model.weights if id(w) not in head_weights]
    if len(source) != len(stripped.weights):
        raise ValueError(
            f"strip_proxies: the model has {len(source)} weights besides its proxies but the "
            f"copy has {len(stripped.weights)}; this model class is not supported."
        )
    for target, weight in zip(stripped.weights, source):
        if tuple(target.shape) != tuple(weight.shape):
            raise ValueError(
                f"strip_proxies: weight {weight.path} has shape {tuple(weight.shape)} but the copy "
                f"expects {tuple(target.shape)}."
            )
        target.assign(weight)
    return stripped

"""Cross-batch memory (XBM, Wang et al., CVPR 2020): a queue of earlier batches' embeddings.

A pair loss with ``memory_size=M`` pairs every row of the batch with the batch itself (as
without memory) *and* with the ``M`` most recent embeddings of earlier batches, held as
constants (no gradient flows into the memory). After the loss is computed, the batch is
enqueued, overwriting the oldest rows. Slots not yet written are in no pair.

Under `tf.distribute` every replica enqueues the *global* batch (an all-gather of all
replicas' embeddings and labels, in replica order), so the replicas' copies of the queue
stay identical; the variables are written once per step (``only_first_replica``
aggregation). The memory is TensorFlow-only: Keras' JAX trainer does not carry a loss'
own variables through ``jax.jit``.

Differences from PML 2.9's ``CrossBatchMemory``: PML enqueues first and pairs the batch
with the whole queue (its own rows as detached copies); here the batch's own pairs keep
their gradient on both sides, which is the memory-free loss when the queue is empty.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from atl_keras.distribute import gather_replicas

__all__ = ["CrossBatchMemory"]


class CrossBatchMemory:
    """``M`` rows of ``[D]`` embeddings and their labels, as non-trainable Keras variables.

    Create it (through the loss) inside ``strategy.scope()`` when training distributed.

    Args:
        size: ``M``, at least the (global) batch size.
        embedding_dim: ``D``.
    """

    def __init__(self, size: int, embedding_dim: int | None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"memory_size must be an int >= 1 (0 turns the memory off); got {size!r}.")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(
                "A cross-batch memory needs embedding_dim (the model's embedding size D); "
                f"got {embedding_dim!r}."
            )
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                "The cross-batch memory (memory_size > 0) runs on the TensorFlow backend only: "
                f"Keras' {keras.backend.backend()} trainer does not update a loss' variables."
            )
        self.size = size
        self.embedding_dim = embedding_dim
        common = dict(trainable=False, aggregation="only_first_replica")
        self.embeddings = keras.Variable(ops.zeros((size, embedding_dim)), dtype="float32",
                                         name="memory_embeddings", **common)
        self.labels = keras.Variable(ops.zeros((size,), dtype="int64"), dtype="int64",
                                     name="memory_labels", **common)
        self.filled = keras.Variable(ops.zeros((size,), dtype="bool"), dtype="bool",
                                     name="memory_filled", **common)
        self.position = keras.Variable(0, dtype="int64", name="memory_position", **common)

    def read(self) -> tuple[Any, Any, Any]:
        """``(embeddings [M, D] float32, labels [M] int64, filled [M] bool)``, constants."""
        return (ops.stop_gradient(ops.convert_to_tensor(self.embeddings)),
                ops.convert_to_tensor(self.labels), ops.convert_to_tensor(self.filled))

    def write(self, labels: Any, embeddings: Any) -> None:
        """Enqueue a batch (the global batch under `tf.distribute`), oldest rows first out."""
        embeddings = ops.stop_gradient(ops.cast(embeddings, "float32"))
        labels = ops.cast(labels, "int64")
        embeddings, labels = gather_replicas((embeddings, labels))
        count = ops.shape(embeddings)[0]
        if isinstance(count, int) and count > self.size:
            raise ValueError(
                f"The global batch has {count} rows but the memory only {self.size}; use "
                "memory_size >= the global batch size."
            )
        slots = ops.mod(ops.cast(self.position, "int64") + ops.arange(count, dtype="int64"), self.size)
        slots = ops.expand_dims(ops.cast(slots, "int32"), 1)
        self.embeddings.assign(ops.scatter_update(self.embeddings, slots, embeddings))
        self.labels.assign(ops.scatter_update(self.labels, slots, labels))
        self.filled.assign(ops.scatter_update(self.filled, slots, ops.ones((count,), dtype="bool")))
        self.position.assign(ops.mod(self.position + ops.cast(count, "int64"), self.size))

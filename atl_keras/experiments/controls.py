"""Text controls: descriptions shuffled across items, frozen as a loadable text encoder."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np

from atl_keras.margins import derangement

class ShuffledTextEncoder:
    """CONTROL encoder: each description is encoded as a *different* item's description.

    The unique non-empty `descriptions` are permuted with `derangement(seed)`; ``encode``
    maps every text to its partner's text and encodes that with `base`. So the margins see
    text embeddings with the catalog's real distribution, detached from the images.
    """

    def __init__(self, base: Any, descriptions: Sequence[str | None], seed: int = 0) -> None:
        unique = sorted({d for d in descriptions if isinstance(d, str) and d.strip()})
        if len(unique) < 2:
            raise ValueError("Shuffling needs at least two distinct descriptions.")
        partner = derangement(len(unique), seed)
        self.base = base
        self.seed = int(seed)
        self.mapping = {text: unique[int(j)] for text, j in zip(unique, partner)}
        digest = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted(self.mapping.items())).encode())
        self._identity = f"shuffled:{digest.hexdigest()[:16]}:{base.identity}"

    @property
    def identity(self) -> str:
        return self._identity

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``texts: N strings -> float32 [N, T]`` (the partners' embeddings)."""
        missing = [t for t in texts if t not in self.mapping]
        if missing:
            raise ValueError(f"{len(missing)} texts were not in the shuffled catalog, e.g. {missing[0]!r}.")
        return self.base.encode([self.mapping[t] for t in texts])


def save_lookup_encoder(encoder: ShuffledTextEncoder, path: str) -> str:
    """Freeze `encoder` on its catalog as a TF SavedModel text encoder at `path` (a table lookup).

    The SavedModel maps ``tf.string [N]`` to the stored ``[N, T]`` vectors; a text outside the
    catalog gets a zero row (= "unknown text" for the loss). Loadable with
    ``load_text_encoder(path)`` like any local TF-Hub model; reused when `path` exists.
    """
    import tensorflow as tf

    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    texts = sorted(encoder.mapping)
    vectors = np.asarray(encoder.encode(texts), np.float32)
    vectors = np.concatenate([vectors, np.zeros((1, vectors.shape[1]), np.float32)])  # row for unknown texts

    class _Lookup(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(texts), tf.range(len(texts), dtype=tf.int64)),
                default_value=len(texts))
            self.vectors = tf.Variable(vectors, trainable=False)

        # autograph=False: nothing to convert, and converting this locally defined class failed
        # once inside a long-running process ("tf____init__() takes 1 positional argument").
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
        def __call__(self, x):
            return tf.gather(self.vectors, self.table.lookup(x))

    tmp = f"{path}.tmp"
    tf.saved_model.save(_Lookup(), tmp)
    os.replace(tmp, path)
    return path

"""P x K batch sampling as a pure tf.data pipeline (no Python generator).

Each batch holds P distinct labels and K samples of each, the layout that in-batch triplet
mining needs (every anchor has K - 1 positives and (P - 1) * K negatives):

    ds = pk_dataset(images, labels, text_embeddings, p=8, k=4, seed=0)
    model.fit(ds, steps_per_epoch=steps_per_epoch(len(labels), 8, 4), epochs=10)

Sampling rules:
  - The P labels of a batch are distinct and drawn uniformly from the *usable* labels.
  - A label with at least K samples contributes K distinct samples (without replacement).
  - A label with 2 <= count < K samples contributes all its samples once, and the remaining
    K - count slots are filled by drawing from them again (with replacement), so every batch
    is exactly P x K.
  - A label with a single sample is never drawn: it cannot form a positive pair.
  - Batch b depends only on (seed, b) through stateless random ops, so the same seed gives
    the same infinite sequence of batches regardless of parallelism.

Under ``tf.distribute`` Keras splits each batch evenly across replicas; since a label's K
samples are contiguous, choose P divisible by the replica count (and P / replicas >= 2)
so every replica sees whole labels and can mine its own triplets.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import tensorflow as tf

__all__ = ["pk_dataset", "pk_index_dataset", "steps_per_epoch"]

_AUTOTUNE = tf.data.AUTOTUNE


def steps_per_epoch(num_samples: int, p: int, k: int) -> int:
    """Batches of ``p * k`` needed to draw ``num_samples`` samples once on average (>= 1)."""
    _check_pk(p, k)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    return max(1, math.ceil(num_samples / (p * k)))


def _check_pk(p: int, k: int) -> None:
    for name, value, minimum in (("p", p, 2), ("k", k, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(
                f"{name} must be an int >= {minimum} (P labels x K samples per batch; triplets need "
                f"at least 2 labels and 2 samples per label), got {value!r}."
            )


def _label_table(labels: np.ndarray, p: int, k: int):
    """Group sample indices by label: ``sorted_indices [M], starts [L], counts [L], values [L]``.

    Only usable labels (count >= 2) are kept; ``sorted_indices[starts[l] : starts[l] + counts[l]]``
    are the sample indices of the l-th usable label ``values[l]`` (a ragged table in CSR form).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array [N], got shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    order = np.argsort(labels, kind="stable")
    values, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    usable = counts >= 2
    if usable.sum() < p:
        raise ValueError(
            f"P x K sampling needs at least p={p} labels with >= 2 samples, but only "
            f"{int(usable.sum())} of the {len(values)} labels have 2 or more samples "
            f"({int((~usable).sum())} singleton labels are excluded). Lower p or add data."
        )
    return order.astype(np.int64), starts[usable].astype(np.int64), counts[usable].astype(np.int64), values[usable]


def _sample_within_labels(counts: tf.Tensor, k: int, seed: tf.Tensor) -> tf.Tensor:
    """Offsets ``[P, K]`` into each label's samples, one row per label count in ``counts [P]``.

    Rows with ``count >= K`` get K distinct offsets, a uniform K-subset chosen with Floyd's
    algorithm (K vectorised steps, O(P * K^2), independent of the label size). Rows with
    ``count < K`` get offsets ``0 .. count-1`` once, then uniform draws with replacement.
    """
    uniform = tf.random.stateless_uniform(tf.stack([tf.shape(counts)[0], k]), seed, dtype=tf.float64)
    counts_f = tf.cast(counts, tf.float64)[:, None]
    # Floyd: for j = count - K + i (i = 0..K-1) draw t in [0, j]; take t unless already taken, else j.
    chosen = []
    for i in range(k):
        j = counts - k + i  # [P]
        t = tf.minimum(tf.cast(tf.floor(uniform[:, i] * tf.cast(j + 1, tf.float64)), tf.int64), j)
        if chosen:
            taken = tf.reduce_any(tf.stack(chosen, axis=1) == t[:, None], axis=1)
            t = tf.where(taken, j, t)
        chosen.append(t)
    without_replacement = tf.stack(chosen, axis=1)
    slot = tf.range(k, dtype=tf.int64)[None, :]
    redraw = tf.minimum(tf.cast(tf.floor(uniform * counts_f), tf.int64), counts[:, None] - 1)
    with_replacement = tf.where(slot < counts[:, None], slot, redraw)
    return tf.where(counts[:, None] >= k, without_replacement, with_replacement)


def pk_index_dataset(labels: np.ndarray, p: int = 8, k: int = 4, seed: int = 0) -> tf.data.Dataset:
    """Infinite dataset of sample-index batches ``int64 [P * K]``: P distinct labels x K samples.

    Indices of the same label are contiguous (K at a time). Batch ``b`` is a pure function of
    ``(seed, b)``; see the module docstring for the sampling rules.

    Args:
        labels: ``[N]`` integer labels (any values, e.g. item ids).
        p: labels per batch (>= 2). k: samples per label (>= 2). seed: int.
    Raises:
        ValueError: fewer than ``p`` labels have 2 or more samples, bad shapes or p/k.
    """
    _check_pk(p, k)
    order, starts, counts, _ = _label_table(labels, p, k)
    from atl_keras.data.sources import index_table  # held once, not copied into every dataset graph

    sorted_indices = index_table(order)
    label_starts = index_table(starts)
    label_counts = index_table(counts)
    num_labels = int(len(counts))
    base_seed = tf.constant(int(seed), tf.int64)

    def make_batch(step: tf.Tensor) -> tf.Tensor:
        batch_seed = tf.stack([base_seed, step])
        seeds = tf.random.experimental.stateless_split(batch_seed, num=2)
        keys = tf.random.stateless_uniform([num_labels], seeds[0])
        chosen = tf.math.top_k(keys, k=p, sorted=True).indices  # P distinct labels, uniform.
        counts_p = tf.gather(label_counts, chosen)
        offsets = _sample_within_labels(counts_p, k, seeds[1])  # [P, K]
        positions = tf.gather(label_starts, chosen)[:, None] + offsets
        return tf.reshape(tf.gather(sorted_indices, positions), [p * k])

    return tf.data.Dataset.counter(start=0, step=1, dtype=tf.int64).map(
        make_batch, num_parallel_calls=_AUTOTUNE, deterministic=True
    )


def pk_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    text_embeddings: np.ndarray | None = None,
    p: int = 8,
    k: int = 4,
    seed: int = 0,
    augment: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
) -> tf.data.Dataset:
    """Infinite P x K training batches gathered from in-memory arrays.

    Yields ``(images float32 [P*K, H, W, C], {"label": int64 [P*K], "text_embedding":
    float32 [P*K, T]})``; the dict has only ``"label"`` when ``text_embeddings`` is None.
    Infinite: pass ``steps_per_epoch`` to ``fit`` (see `steps_per_epoch`).

    Args:
        images: ``[N, H, W, C]`` (or ``[N, H, W]``, given a channel axis) pixels in [0, 255],
            any real dtype (uint8 keeps memory low; batches are cast to float32).
        labels: ``[N]`` integer labels; the batch carries these values.
        text_embeddings: optional per-*sample* ``[N, T]`` (index a per-item table with the
            item of each sample first, e.g. ``class_text[labels]``).
        p, k, seed: see `pk_index_dataset`.
        augment: optional ``fn(images [P*K, H, W, C] float32, seed int64 [2]) -> same shape``,
            run in the map with a seed derived from (seed, batch number) for stateless
            random ops (see `atl_keras.data.augment.make_augmenter`), so augmented batches
            are as deterministic as the sampling.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C] (or [N, H, W]), got shape {images.shape}.")
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}.")
    if text_embeddings is not None:
        text_embeddings = np.asarray(text_embeddings, np.float32)
        if text_embeddings.ndim != 2 or len(text_embeddings) != len(labels):
            raise ValueError(
                f"text_embeddings must be per sample [N={len(labels)}, T], got shape "
                f"{text_embeddings.shape}; map per-item embeddings to samples first "
                "(e.g. item_text[labels])."
            )
    indices = pk_index_dataset(labels, p=p, k=k, seed=seed)
    batch = p * k
    image_shape = images.shape[1:]
    from atl_keras.data.sources import index_table

    image_table = index_table(images)
    label_table = index_table(labels.astype(np.int64))
    text_table = index_table(text_embeddings) if text_embeddings is not None else None

    augment_seed = tf.constant(int(seed) + 1_000_003, tf.int64)

    def gather(step: tf.Tensor, idx: tf.Tensor):
        x = tf.cast(tf.gather(image_table, idx), tf.float32)
        if augment is not None:
            x = augment(x, tf.stack([augment_seed, step]))
        x = tf.ensure_shape(x, [batch, *image_shape])
        target = {"label": tf.gather(label_table, idx)}
        if text_table is not None:
            target["text_embedding"] = tf.gather(text_table, idx)
        return x, target

    return (
        indices.enumerate()
        .map(gather, num_parallel_calls=_AUTOTUNE, deterministic=True)
        .prefetch(_AUTOTUNE)
    )

"""Augmentation: shapes and range kept, deterministic per seed, each transform does its job."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from atl_keras.data.augment import make_augmenter
from atl_keras.data.sampler import pk_dataset


def batch(seed: int = 0) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.integers(0, 256, size=(6, 16, 16, 3)).astype(np.float32))


def test_shape_range_and_determinism():
    augment = make_augmenter()
    x = batch()
    a = augment(x, tf.constant([1, 2], tf.int64))
    b = augment(x, tf.constant([1, 2], tf.int64))
    c = augment(x, tf.constant([1, 3], tf.int64))
    assert a.shape == x.shape and a.dtype == tf.float32
    assert float(tf.reduce_min(a)) >= 0.0 and float(tf.reduce_max(a)) <= 255.0
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


def test_all_disabled_is_identity():
    augment = make_augmenter(flip=False, translation=0, zoom=0, brightness=0, contrast=0)
    x = batch()
    np.testing.assert_array_equal(augment(x, tf.constant([0, 0], tf.int64)).numpy(), x.numpy())


def test_flip_only_mirrors_some_images_exactly():
    augment = make_augmenter(translation=0, zoom=0, brightness=0, contrast=0)
    x = batch()
    out = augment(x, tf.constant([5, 5], tf.int64)).numpy()
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x.numpy())]
    same = [np.array_equal(o, i) for o, i in zip(out, x.numpy())]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored)


def test_brightness_only_shifts_each_image_by_one_constant():
    augment = make_augmenter(flip=False, translation=0, zoom=0, brightness=0.1, contrast=0)
    x = tf.fill([4, 8, 8, 3], 100.0)
    out = augment(x, tf.constant([9, 9], tf.int64)).numpy()
    for image in out:
        assert np.ptp(image) < 1e-4 and abs(image.flat[0] - 100.0) <= 25.5 + 1e-4


def test_bad_factor_is_rejected():
    with pytest.raises(ValueError, match="zoom"):
        make_augmenter(zoom=1.5)


def test_pk_dataset_with_augment_is_deterministic_per_seed():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 12, 12, 3)).astype(np.uint8)
    labels = np.repeat(np.arange(10), 4)
    first = [x.numpy() for x, _ in pk_dataset(images, labels, p=4, k=2, seed=3, augment=make_augmenter()).take(3)]
    again = [x.numpy() for x, _ in pk_dataset(images, labels, p=4, k=2, seed=3, augment=make_augmenter()).take(3)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)

"""Training-time image augmentation for the P x K pipeline (pixels stay in [0, 255]).

    train = pk_dataset(images, labels, text, p=16, k=4, augment=make_augmenter())

Geometric and photometric jitter that keeps an item recognisable: horizontal flip, small
translation and zoom, brightness and contrast. Every random draw is a stateless op keyed by
the batch's seed, so the same sampler seed gives bit-identical augmented batches (runs
stay deterministic). Applied inside the tf.data map on training batches only; evaluation
and export never augment.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

Augmenter = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def make_augmenter(
    flip: bool = True,
    translation: float = 0.08,
    zoom: float = 0.1,
    brightness: float = 0.1,
    contrast: float = 0.15,
) -> Augmenter:
    """`augment(images [B, H, W, C] float32 in [0, 255], seed int [2]) -> same shape/range`.

    `translation` is a fraction of the image size, `zoom` a relative scale change,
    `brightness` a fraction of 255, `contrast` a relative change; 0 disables one.
    """
    for name, value in (("translation", translation), ("zoom", zoom),
                        ("brightness", brightness), ("contrast", contrast)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")

    def augment(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        x = tf.cast(images, tf.float32)
        batch = tf.shape(x)[0]
        height = tf.cast(tf.shape(x)[1], tf.float32)
        width = tf.cast(tf.shape(x)[2], tf.float32)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)

        def uniform(i: int, low: float, high: float) -> tf.Tensor:
            return tf.random.stateless_uniform([batch], seeds[i], minval=low, maxval=high)

        if flip:
            flipped = uniform(0, 0.0, 1.0) < 0.5
            x = tf.where(flipped[:, None, None, None], tf.reverse(x, axis=[2]), x)
        if translation or zoom:
            scale = uniform(1, 1.0 - zoom, 1.0 + zoom)
            shift_x = uniform(2, -translation, translation) * width
            shift_y = uniform(3, -translation, translation) * height
            # Output pixel (u, v) samples input (s*u + a, s*v + b): zoom about the centre.
            zeros = tf.zeros_like(scale)
            transforms = tf.stack([
                scale, zeros, (1.0 - scale) * (width - 1) / 2 - shift_x,
                zeros, scale, (1.0 - scale) * (height - 1) / 2 - shift_y,
                zeros, zeros,
            ], axis=1)
            x = tf.raw_ops.ImageProjectiveTransformV3(
                images=x, transforms=transforms, output_shape=tf.shape(x)[1:3],
                fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST",
            )
        if contrast:
            factor = uniform(4, 1.0 - contrast, 1.0 + contrast)[:, None, None, None]
            mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
            x = (x - mean) * factor + mean
        if brightness:
            x = x + uniform(5, -brightness, brightness)[:, None, None, None] * 255.0
        return tf.clip_by_value(x, 0.0, 255.0)

    return augment

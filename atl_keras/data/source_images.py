"""Evaluation images kept as files: an image source plus the preprocessing that decodes it.

    images = SourceImages(catalog.split("test").image_source(), Preprocessing(224))
    len(images), images.shape            # N, (N, 224, 224, 3): nothing decoded
    images[3]                            # uint8 [224, 224, 3], decoded now
    images[:100], images[mask]           # SourceImages of those rows
    embed_images(model, images)          # streamed in batches (atl_keras.embedding)

Streamed datasets (``catalog:``, ``deepfashion-inshop:``, ``shards:``) hold their validation
and test rows this way, so evaluation, the projector export and `atl export` read and decode
batches from files: memory does not grow with the number of evaluation rows. It looks like
a uint8 ``[N, H, W, C]`` array (``len``, ``shape``, ``dtype``, ``ndim``, indexing) but is not
one: ``np.asarray(images)`` raises; ``images.decode()`` decodes every row when that is
really wanted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from atl_keras.data.sources import ImageSource
from atl_keras.preprocessing import DEFAULT_MAX_PIXELS, Preprocessing, decode_bounded

__all__ = ["SourceImages", "readable_rows"]


def readable_rows(
    source: ImageSource, preprocessing: Preprocessing, max_pixels: int | None = DEFAULT_MAX_PIXELS,
    batch_size: int = 64,
) -> np.ndarray:
    """bool ``[N]``: the rows of ``source`` that read and decode (one streamed pass, a few
    batches of pixels in memory at a time)."""
    from atl_keras.data.streaming import stream_images

    good = np.zeros(len(source), bool)
    for rows, _ in stream_images(source, preprocessing, max_pixels=max_pixels).batch(batch_size).as_numpy_iterator():
        good[rows] = True
    return good


class SourceImages:
    """``N`` images of an `ImageSource`, decoded with ``preprocessing`` when read.

    Args:
        source: files or shard records (`atl_keras.data.sources`).
        preprocessing: decode + resize rules; ``shape`` is ``(N, *preprocessing.image_shape)``.
    """

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, source: ImageSource, preprocessing: Preprocessing) -> None:
        self.source = source
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.source)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.source), *(int(d) for d in self.preprocessing.image_shape))

    def __getitem__(self, key: Any) -> Any:
        """An int gives the decoded row (uint8 ``[H, W, C]``); a slice, index array or bool
        mask gives the `SourceImages` of those rows."""
        n = len(self)
        if isinstance(key, (int, np.integer)):
            row = int(key) + n if key < 0 else int(key)
            if not 0 <= row < n:
                raise IndexError(f"row {key} out of range for {n} images.")
            return self._decode_row(row)
        if isinstance(key, slice):
            rows = np.arange(n, dtype=np.int64)[key]
        else:
            key = np.asarray(key)
            if key.dtype == bool:
                if key.shape != (n,):
                    raise IndexError(f"a boolean mask must have shape ({n},), got {key.shape}.")
                rows = np.flatnonzero(key)
            elif key.dtype.kind in "iu":
                rows = np.where(key < 0, key + n, key).astype(np.int64).reshape(-1)
                if rows.size and (rows.min() < 0 or rows.max() >= n):
                    raise IndexError(f"row indices out of range for {n} images.")
            else:
                raise TypeError(f"SourceImages takes an int, a slice, int indices or a bool mask, got {key!r:.80}.")
        return SourceImages(self.source.subset(rows), self.preprocessing)

    def _decode_row(self, row: int) -> np.ndarray:
        try:
            image = decode_bounded(self.source.read(tf.constant(row, tf.int64)), self.preprocessing, DEFAULT_MAX_PIXELS)
        except tf.errors.OpError as exc:
            from atl_keras.data.images import ImageDecodeError

            name = self.source.describe(row)
            raise ImageDecodeError(f"Image {name!r} (row {row}) cannot be read or decoded: {exc.message}",
                                   [name], [row]) from None
        return image.numpy()

    def decode(self) -> np.ndarray:
        """Every row decoded: uint8 ``[N, H, W, C]`` (memory grows with N; a bad row raises)."""
        from atl_keras.data.streaming import decode_source

        prep = self.preprocessing
        images, _ = decode_source(self.source, prep.image_size, channels=prep.channels, strict=True,
                                  resize=prep.resize, pad_value=prep.pad_value)
        return images

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(
            f"SourceImages ({len(self)} images kept as files) is not converted to an array implicitly: "
            "that would decode every row into memory. Pass it to atl_keras.embedding.embed_images / "
            "embed_batches (streamed), index a row (images[i]), or call images.decode() to decode all."
        )

    def __repr__(self) -> str:
        return f"SourceImages({len(self)} rows, image_shape={tuple(self.preprocessing.image_shape)})"

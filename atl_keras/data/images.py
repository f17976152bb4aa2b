"""Image decoding pipeline (tf.data, parallel): files on disk -> uint8 ``[H, W, C]`` tensors.

    images, kept = decode_images(paths, image_size=64)       # uint8 [n_kept, 64, 64, 3], bool [N]
    ds = image_dataset(paths, image_size=64)                 # (uint8 [64, 64, 3], int64 index)

Every file is read, decoded with ``tf.io.decode_image`` (JPEG, PNG, GIF, BMP; animated GIFs
give their first frame, grayscale/RGBA are converted to ``channels``) and resized to a square
``image_size`` (or ``(height, width)``):

- ``resize="pad"`` (default): aspect-preserving; the image is scaled to fit and the borders
  are filled with ``pad_value`` (255 = white, the usual catalog background).
- ``resize="stretch"``: plain bilinear resize to the target size (aspect ratio changes).

Decoding and resizing are `atl_keras.preprocessing` (the one preprocessing shared with the
export and serving): shrinking uses area averaging (a box-filter antialias, fast); enlarging
uses antialiased bilinear interpolation.

Bad files (missing, empty, not an image, truncated or corrupt) are **skipped** by default:
one ``warnings.warn`` per call names the first few and gives the count, and ``kept_mask`` /
the yielded ``index`` say which rows survived. ``strict=True`` raises instead, naming the
files. Bad files are found without Python loops over pixels: existence is checked up front
(``os.path.isfile``) and decoding runs in a parallel ``tf.data`` map whose failures are
dropped with ``ignore_errors``; every element carries its row index, so the rows that did
not come out are exactly the bad ones.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf

from atl_keras.preprocessing import RESIZE_MODES, Preprocessing, decode_raw, resize_image

__all__ = [
    "RESIZE_MODES",
    "ImageDecodeError",
    "decode_images",
    "find_invalid_images",
    "image_dataset",
]

_AUTOTUNE = tf.data.AUTOTUNE
_MAX_NAMED = 5  # bad files named in a warning / error message


class ImageDecodeError(ValueError):
    """Raised in ``strict`` mode when image files are missing or cannot be decoded.

    ``paths`` lists every bad file (in row order), ``indices`` their row indices.
    """

    def __init__(self, message: str, paths: Sequence[str], indices: Sequence[int]):
        super().__init__(message)
        self.paths = list(paths)
        self.indices = list(indices)


def _check_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    else:
        try:
            size = tuple(int(s) for s in image_size)  # type: ignore[union-attr]
        except TypeError:
            size = ()
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int >= 1 or a (height, width) pair, got {image_size!r}.")
    return size  # type: ignore[return-value]


def _check_args(channels: int, resize: str, pad_value: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}.")
    if not 0 <= int(pad_value) <= 255:
        raise ValueError(f"pad_value must be in 0..255, got {pad_value!r}.")


def _decode(contents: tf.Tensor, channels: int) -> tf.Tensor:
    return decode_raw(contents, channels)


def _resize(image: tf.Tensor, size: tuple[int, int], resize: str, pad_value: int) -> tf.Tensor:
    """uint8 ``[h, w, C]`` -> uint8 ``[H, W, C]`` with `atl_keras.preprocessing.resize_image`."""
    channels = int(image.shape[-1])
    return resize_image(image, Preprocessing(size, channels=channels, resize=resize, pad_value=pad_value))


def _index_path_dataset(paths: Sequence[str], indices: np.ndarray) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(paths), tf.string), tf.constant(indices, tf.int64))
    )


def _existing(paths: Sequence[str]) -> np.ndarray:
    """bool ``[N]``: the path is a non-empty regular file."""
    return np.array([os.path.isfile(p) and os.path.getsize(p) > 0 for p in paths], dtype=bool)


def _report(paths: Sequence[str], bad: np.ndarray, strict: bool) -> None:
    """One warning (or, when ``strict``, one `ImageDecodeError`) naming the bad files."""
    bad_indices = np.flatnonzero(bad)
    if bad_indices.size == 0:
        return
    bad_paths = [paths[i] for i in bad_indices]
    named = ", ".join(repr(p) for p in bad_paths[:_MAX_NAMED])
    more = f" and {len(bad_paths) - _MAX_NAMED} more" if len(bad_paths) > _MAX_NAMED else ""
    summary = (
        f"{len(bad_paths)} of {len(paths)} image files are missing, empty or cannot be decoded "
        f"as JPEG/PNG/GIF/BMP: {named}{more}."
    )
    if strict:
        raise ImageDecodeError(
            summary + " Fix or remove these files, or pass strict=False to skip them.",
            bad_paths,
            bad_indices.tolist(),
        )
    warnings.warn(summary + " They were skipped (strict=True raises instead).", stacklevel=3)


def _checked_paths(paths: Sequence[str] | np.ndarray) -> list[str]:
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"paths must be a sequence of file paths, got a single path {paths!r}.")
    return [os.fspath(p) for p in paths]


def find_invalid_images(paths: Sequence[str], channels: int = 3) -> np.ndarray:
    """bool ``[N]``: True where the file is missing, empty or fails to decode.

    Decodes every existing file once in a parallel tf.data pass (no resizing).
    """
    paths = _checked_paths(paths)
    _check_args(channels, "pad", 0)
    exists = _existing(paths)
    candidates = np.flatnonzero(exists)
    ok = np.zeros(len(paths), dtype=bool)
    if candidates.size:
        ds = _index_path_dataset([paths[i] for i in candidates], candidates).map(
            lambda path, index: (tf.shape(_decode(tf.io.read_file(path), channels))[0], index),
            num_parallel_calls=_AUTOTUNE,
            deterministic=True,
        )
        for _, index in ds.ignore_errors(log_warning=False).as_numpy_iterator():
            ok[index] = True
    return ~ok


def _decode_dataset(
    paths: Sequence[str],
    indices: np.ndarray,
    size: tuple[int, int],
    channels: int,
    resize: str,
    pad_value: int,
) -> tf.data.Dataset:
    """``(image uint8 [H, W, C], index)`` for ``paths`` (rows ``indices``); failures dropped."""

    def load(path: tf.Tensor, index: tf.Tensor):
        image = _resize(_decode(tf.io.read_file(path), channels), size, resize, pad_value)
        return tf.ensure_shape(image, [*size, channels]), index

    ds = _index_path_dataset(paths, indices).map(load, num_parallel_calls=_AUTOTUNE, deterministic=True)
    return ds.ignore_errors(log_warning=False)


def image_dataset(
    paths: Sequence[str],
    image_size: int | Sequence[int],
    channels: int = 3,
    strict: bool = False,
    resize: str = "pad",
    pad_value: int = 255,
    validate: bool = True,
) -> tf.data.Dataset:
    """Dataset of ``(image uint8 [H, W, channels], index int64 [])`` decoded from ``paths``.

    ``index`` is the row of the file in ``paths``; bad rows are skipped, so indices can have
    gaps. Decoding runs with ``num_parallel_calls=AUTOTUNE, deterministic=True`` (rows come
    out in order). Batch, cache or prefetch the result as needed.

    Args:
        paths: ``N`` image file paths.
        image_size: output size, an int (square) or ``(height, width)``.
        channels: 3 (RGB) or 1 (grayscale).
        strict: raise `ImageDecodeError` naming the bad files instead of skipping them.
        resize: ``"pad"`` (aspect-preserving, borders = ``pad_value``) or ``"stretch"``.
        pad_value: border fill for ``resize="pad"`` (255 = white).
        validate: find bad files when the dataset is built (existence check plus one
            parallel decode pass, `find_invalid_images`) so that they are reported there,
            once. With ``validate=False`` only missing/empty files are reported up front;
            files that exist but fail to decode are dropped silently while iterating
            (cheaper: every file is decoded once instead of twice). `decode_images`
            reports everything after a single pass.
    Raises:
        ImageDecodeError: ``strict`` and some files are missing or undecodable.
    """
    paths = _checked_paths(paths)
    size = _check_size(image_size)
    _check_args(channels, resize, pad_value)
    bad = find_invalid_images(paths, channels) if validate else ~_existing(paths)
    _report(paths, bad, strict)
    keep = np.flatnonzero(~bad)
    return _decode_dataset([paths[i] for i in keep], keep, size, channels, resize, pad_value)


def decode_images(
    paths: Sequence[str],
    image_size: int | Sequence[int],
    channels: int = 3,
    strict: bool = False,
    resize: str = "pad",
    pad_value: int = 255,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``paths`` into memory in one parallel tf.data pass (see `image_dataset`).

    Returns:
        ``(images uint8 [n_kept, H, W, channels], kept_mask bool [N])``: ``images[j]`` is the
        ``j``-th file whose ``kept_mask`` is True (row order is preserved).
    Raises:
        ImageDecodeError: ``strict`` and some files are missing or undecodable (all of them
            are named in ``.paths``; nothing is returned).
    """
    paths = _checked_paths(paths)
    size = _check_size(image_size)
    _check_args(channels, resize, pad_value)
    candidates = np.flatnonzero(_existing(paths))
    kept = np.zeros(len(paths), dtype=bool)
    images = np.zeros((len(paths), *size, channels), dtype=np.uint8)
    if candidates.size:
        ds = _decode_dataset([paths[i] for i in candidates], candidates, size, channels, resize, pad_value)
        for batch, index in ds.batch(batch_size).prefetch(1).as_numpy_iterator():
            images[index] = batch
            kept[index] = True
    _report(paths, ~kept, strict)
    return (images if kept.all() else images[kept]), kept

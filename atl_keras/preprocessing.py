"""The one image preprocessing of the package: encoded bytes -> uint8 ``[H, W, C]`` model input.

Training decode (`atl_keras.data.images`), evaluation, every exported signature and so
serving call the functions below with the same `Preprocessing`, and the export records it
in its manifest: a photo gives the same pixels, hence the same embedding, wherever it is
embedded.

    prep = Preprocessing(image_size=(64, 64), channels=3, resize="pad", pad_value=255)
    pixels = decode_image(tf.io.read_file("photo.jpg"), prep)     # uint8 [64, 64, 3]
    batch = decode_batch(tf.constant([jpeg, png]), prep)           # float32 [2, 64, 64, 3]

Steps (all TensorFlow ops, so they trace into a SavedModel):

1. ``tf.io.decode_image`` (JPEG, PNG, GIF, BMP; the first frame of an animation),
   converted to ``channels`` (grayscale <-> RGB, alpha dropped).
2. Resize to ``image_size``: ``"pad"`` scales to fit, keeping the aspect ratio, and centres
   the result on a ``pad_value`` canvas; ``"stretch"`` resizes to the size directly. Shrinking
   uses area averaging (the exact box-filter antialias), enlarging antialiased bilinear.
3. Round and clip to uint8 (training batches are uint8, so served pixels are too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import tensorflow as tf

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "RESIZE_MODES",
    "Preprocessing",
    "declared_pixels",
    "decode_batch",
    "decode_bounded",
    "decode_image",
    "resize_image",
]

RESIZE_MODES = ("pad", "stretch")
#: Recorded in the manifest so a reader knows which filter produced the pixels.
ANTIALIAS = "area when shrinking, antialiased bilinear when enlarging; rounded to uint8"


@dataclass(frozen=True)
class Preprocessing:
    """How encoded images become model input.

    Args:
        image_size: ``(height, width)`` of the model input.
        channels: 1 (grayscale) or 3 (RGB).
        resize: ``"pad"`` (aspect-preserving, borders ``pad_value``) or ``"stretch"``.
        pad_value: border fill for ``"pad"``, 0..255 (255 = white catalog background).
    """

    image_size: tuple[int, int]
    channels: int = 3
    resize: str = "pad"
    pad_value: int = 255

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be an int >= 1 or a (height, width) pair, got {self.image_size!r}.")
        object.__setattr__(self, "image_size", size)
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}.")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}.")
        if not 0 <= int(self.pad_value) <= 255:
            raise ValueError(f"pad_value must be in 0..255, got {self.pad_value!r}.")
        object.__setattr__(self, "pad_value", int(self.pad_value))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the manifest's ``preprocessing``)."""
        return {**dataclasses.asdict(self), "image_size": list(self.image_size), "antialias": ANTIALIAS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "image_size" else v) for k, v in data.items() if k in fields})

    @classmethod
    def for_model(cls, model: Any, resize: str = "pad", pad_value: int = 255) -> "Preprocessing":
        """The preprocessing for a model whose input is ``[B, H, W, C]`` (defaults: as training)."""
        shape = tuple(getattr(model, "image_shape", None) or model.input_shape[1:])
        if len(shape) != 3 or any(d is None for d in shape):
            raise ValueError(f"The model input must be a fixed [H, W, C] image, got {shape}.")
        return cls(image_size=(int(shape[0]), int(shape[1])), channels=int(shape[2]), resize=resize, pad_value=pad_value)


def resize_image(image: tf.Tensor, preprocessing: Preprocessing) -> tf.Tensor:
    """uint8 ``[h, w, C]`` -> uint8 ``[H, W, C]`` (see the module docstring). Same size: unchanged."""
    height, width = preprocessing.image_size
    if preprocessing.resize == "stretch":
        target = tf.constant([height, width], tf.int32)
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float64)
        scale = tf.minimum(height / shape[0], width / shape[1])
        target = tf.clip_by_value(tf.cast(tf.round(shape * scale), tf.int32), 1, [height, width])
    x = tf.cast(image, tf.float32)
    shrink = tf.reduce_all(target <= tf.shape(image)[:2])
    # Area averaging is the exact box-filter antialias for shrinking and ~5x faster than
    # bilinear(antialias=True), which handles enlarging (and mixed) cases.
    x = tf.cond(
        shrink,
        lambda: tf.image.resize(x, target, method="area"),
        lambda: tf.image.resize(x, target, method="bilinear", antialias=True),
    )
    x = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
    if preprocessing.resize == "pad":  # centre it (cheaper than resize_with_pad, which pads in float)
        top, left = (height - target[0]) // 2, (width - target[1]) // 2
        paddings = [[top, height - target[0] - top], [left, width - target[1] - left], [0, 0]]
        x = tf.pad(x, paddings, constant_values=tf.constant(preprocessing.pad_value, tf.uint8))
    return tf.ensure_shape(x, preprocessing.image_shape)


def decode_raw(contents: tf.Tensor, channels: int) -> tf.Tensor:
    """Encoded image bytes (scalar tf.string) -> uint8 ``[h, w, channels]`` at its own size."""
    image = tf.io.decode_image(contents, channels=channels, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def decode_image(contents: tf.Tensor, preprocessing: Preprocessing) -> tf.Tensor:
    """Encoded image bytes (scalar tf.string) -> uint8 ``[H, W, C]`` model input."""
    return resize_image(decode_raw(contents, preprocessing.channels), preprocessing)


def decode_batch(images: tf.Tensor | Sequence[bytes], preprocessing: Preprocessing) -> tf.Tensor:
    """Encoded images tf.string ``[B]`` -> float32 pixels ``[B, H, W, C]`` in [0, 255]."""
    return tf.map_fn(
        lambda data: tf.cast(decode_image(data, preprocessing), tf.float32),
        tf.convert_to_tensor(images, tf.string),
        fn_output_signature=tf.TensorSpec(preprocessing.image_shape, tf.float32),
    )


#: Images whose header declares more pixels are refused before decoding (~200 MB as RGB uint8).
DEFAULT_MAX_PIXELS = 64_000_000


def declared_pixels(contents: tf.Tensor) -> tf.Tensor:
    """Pixels (int64 scalar) an encoded image's header declares; 0 if the format is unknown.

    Reads only header bytes (JPEG: the frame header via ``tf.image.extract_jpeg_shape``; PNG
    IHDR; GIF logical screen; BMP info header), so a 300 KB file claiming 10000 x 10000
    pixels can be refused before it is decoded. Graph ops: runs inside ``tf.data`` maps.
    """

    def ints(offset: int, count: int, width: int, big_endian: bool) -> tf.Tensor:
        raw = tf.cast(tf.io.decode_raw(tf.strings.substr(contents, offset, count * width), tf.uint8), tf.int64)
        raw = tf.reshape(raw, [count, width])
        weights = [256 ** (width - 1 - i) if big_endian else 256**i for i in range(width)]
        return tf.reduce_sum(raw * tf.constant(weights, tf.int64), axis=1)

    def product(values: tf.Tensor) -> tf.Tensor:
        return tf.abs(values[0]) * tf.abs(values[1])

    def bmp() -> tf.Tensor:  # signed 32-bit width and height (negative height = top-down)
        values = ints(18, 2, 4, False)
        return product(tf.where(values >= 2**31, values - 2**32, values))

    head = tf.strings.substr(contents, 0, 8)
    return tf.case(
        [
            (tf.strings.substr(head, 0, 3) == b"\xff\xd8\xff",
             lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64))),
            (head == b"\x89PNG\r\n\x1a\n", lambda: product(ints(16, 2, 4, True))),
            (tf.strings.substr(head, 0, 3) == b"GIF", lambda: product(ints(6, 2, 2, False))),
            (tf.strings.substr(head, 0, 2) == b"BM", bmp),
        ],
        default=lambda: tf.constant(0, tf.int64),
    )


def decode_bounded(contents: tf.Tensor, preprocessing: Preprocessing, max_pixels: int | None) -> tf.Tensor:
    """`decode_image`, after failing (InvalidArgumentError) when the header declares more than
    ``max_pixels`` pixels (None or 0: no bound). Inside ``tf.data`` such failures can be
    dropped with ``ignore_errors``."""
    if not max_pixels:
        return decode_image(contents, preprocessing)
    check = tf.debugging.assert_less_equal(
        declared_pixels(contents), tf.constant(int(max_pixels), tf.int64),
        message=f"the image header declares more than {int(max_pixels)} pixels")
    with tf.control_dependencies([check]):
        return decode_image(tf.identity(contents), preprocessing)

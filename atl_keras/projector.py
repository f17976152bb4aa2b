"""TensorBoard embedding-projector export: embeddings + metadata + sprite for the Projector tab.

    write_projector("runs/main/logs/projector", embeddings, [(item_id, text), ...], images)
    # tensorboard --logdir runs/main/logs   -> "Projector"

Writes into ``log_dir``: a TF checkpoint holding the embedding matrix (``embedding.ckpt-1*``,
``checkpoint``), ``metadata.tsv`` (header + one row per embedding), ``sprite.png`` (the
thumbnails, at most `SPRITE_THUMBNAIL` px per side, on a square grid, row-major, in embedding order) and ``projector_config.pbtxt``
tying them together (the `ProjectorConfig` text format TensorBoard reads).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

__all__ = ["SPRITE_THUMBNAIL", "TENSOR_NAME", "write_projector", "make_sprite"]

#: Name of the embedding tensor inside the checkpoint (object-based `tf.train.Checkpoint`).
TENSOR_NAME = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
#: TensorBoard refuses sprites larger than this (pixels per side).
MAX_SPRITE_SIZE = 8192
#: Longest side of a sprite cell: larger images are shrunk to it (the Projector shows
#: thumbnails; 500 images of 224 px would otherwise make a 5,152-px sprite).
SPRITE_THUMBNAIL = 64


def _cell_shape(height: int, width: int, thumbnail: int | None) -> tuple[int, int]:
    """A sprite cell: the image shrunk (aspect kept) so its longer side is at most ``thumbnail``."""
    if thumbnail is None or max(height, width) <= thumbnail:
        return height, width
    scale = thumbnail / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def make_sprite(images: Any, thumbnail: int | None = SPRITE_THUMBNAIL) -> np.ndarray:
    """Tile ``[N, H, W, C]`` images (C in {1, 3}, pixels in [0, 255]) row-major on a square grid.

    Images larger than ``thumbnail`` pixels per side are shrunk (area average, aspect kept)
    one at a time, so memory holds the sprite, not a copy of the images (None: full size).
    ``images`` may be any sequence of ``[H, W, C]`` rows with a ``shape``
    (`atl_keras.data.SourceImages` decodes each row as it is read).
    Returns uint8 ``[G * h, G * w, C]`` with ``G = ceil(sqrt(N))`` and ``(h, w)`` the cell
    (`_cell_shape`); unused cells are white.
    """
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    shape = tuple(images.shape)
    if len(shape) == 3:
        images, shape = np.asarray(images)[..., None], (*shape, 1)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1|3], got shape {shape}.")
    n, height, width, c = shape
    h, w = _cell_shape(height, width, thumbnail)
    grid = max(1, math.ceil(math.sqrt(n)))
    if grid * max(h, w) > MAX_SPRITE_SIZE:
        raise ValueError(
            f"A sprite of {n} images of {h}x{w} needs {grid * max(h, w)} pixels per side; "
            f"TensorBoard allows {MAX_SPRITE_SIZE}. Export fewer or smaller images."
        )
    sprite = np.full((grid * h, grid * w, c), 255, np.uint8)
    for i in range(n):
        image = np.asarray(images[i], np.float32)
        if (h, w) != (height, width):
            image = tf.image.resize(image, (h, w), method="area", antialias=True).numpy()
        r, col = divmod(i, grid)
        sprite[r * h : (r + 1) * h, col * w : (col + 1) * w] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return sprite


def _tsv_cell(value: object) -> str:
    return " ".join(str(value).replace("\t", " ").split()) or "-"


def write_projector(
    log_dir: str,
    embeddings: np.ndarray,
    metadata: Sequence[Sequence[object]],
    images: Any = None,
    columns: Sequence[str] = ("item_id", "description"),
) -> dict[str, str]:
    """Write an embedding-projector export of ``embeddings [N, D]`` into ``log_dir``.

    Args:
        log_dir: directory TensorBoard is pointed at (or a sub-directory of it).
        embeddings: ``[N, D]`` float.
        metadata: N rows, each with ``len(columns)`` values (e.g. ``(item id, description)``);
            tabs and newlines inside values become spaces.
        images: optional ``[N, H, W, C]`` images (pixels in [0, 255], an array or
            `atl_keras.data.SourceImages`) for the sprite; cells are at most `SPRITE_THUMBNAIL`
            pixels per side.
        columns: header of ``metadata.tsv``.
    Returns:
        Paths written: ``{"checkpoint", "metadata", "sprite" (if images), "config"}``.
    """
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {embeddings.shape}.")
    n = len(embeddings)
    if len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} rows but there are {n} embeddings; give one row each.")
    for row in metadata:
        if len(row) != len(columns):
            raise ValueError(f"metadata rows must have {len(columns)} values {tuple(columns)}, got {row!r}.")
    if images is not None and len(images) != n:
        raise ValueError(f"images has {len(images)} rows but there are {n} embeddings.")
    os.makedirs(log_dir, exist_ok=True)

    checkpoint = tf.train.Checkpoint(embedding=tf.Variable(embeddings, trainable=False))
    prefix = checkpoint.save(os.path.join(log_dir, "embedding.ckpt"))
    paths = {"checkpoint": prefix}

    metadata_path = os.path.join(log_dir, "metadata.tsv")
    with open(metadata_path, "w", encoding="utf-8") as f:
        f.write("\t".join(columns) + "\n")
        for row in metadata:
            f.write("\t".join(_tsv_cell(v) for v in row) + "\n")
    paths["metadata"] = metadata_path

    sprite_block = ""
    if images is not None:
        sprite = make_sprite(images)
        sprite_path = os.path.join(log_dir, "sprite.png")
        tf.io.write_file(sprite_path, tf.io.encode_png(sprite))
        paths["sprite"] = sprite_path
        h, w = _cell_shape(*(int(d) for d in np.shape(images)[1:3]), SPRITE_THUMBNAIL)
        sprite_block = (
            "  sprite {\n"
            '    image_path: "sprite.png"\n'
            f"    single_image_dim: {w}\n"
            f"    single_image_dim: {h}\n"
            "  }\n"
        )
    config_path = os.path.join(log_dir, "projector_config.pbtxt")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(
            "embeddings {\n"
            f'  tensor_name: "{TENSOR_NAME}"\n'
            '  metadata_path: "metadata.tsv"\n'
            f"{sprite_block}"
            "}\n"
        )
    paths["config"] = config_path
    return paths

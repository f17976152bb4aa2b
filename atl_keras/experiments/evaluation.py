"""Query/gallery settings of each protocol: splits, street-style queries, grid rows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from atl_keras.experiments.protocols import EVAL_SEED, PROTOCOLS, Protocol, Schedule

def query_gallery_split(labels: np.ndarray, seed: int = EVAL_SEED, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into disjoint query and gallery halves, stratified by label.

    Args:
        labels: ``[N]`` labels.
        seed: the shuffle within each label.
        limit: at most this many rows per half (taken evenly over labels), or None.
    Returns:
        ``(query_rows [Q], gallery_rows [G])`` sorted int64 row indices, disjoint; each label
        with ``n`` rows gives ``ceil(n / 2)`` queries and ``floor(n / 2)`` gallery rows.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    query, gallery = [], []
    per_class = None if limit is None else max(1, limit // max(1, len(classes)))
    for c in classes:
        rows = rng.permutation(np.flatnonzero(labels == c))
        half = (len(rows) + 1) // 2
        q, g = rows[:half], rows[half:]
        if per_class is not None:
            q, g = q[:per_class], g[:per_class]
        query.append(q)
        gallery.append(g)
    return np.sort(np.concatenate(query)).astype(np.int64), np.sort(np.concatenate(gallery)).astype(np.int64)


def street_style(images: np.ndarray, seed: int = EVAL_SEED) -> np.ndarray:
    """Street-photo versions of catalog-style images: clutter, warp, lighting, occlusion, noise.

    Per image (its own generator ``default_rng([seed, i])``, so the result for image ``i``
    does not depend on the others): a background of 2-5 random grey rectangles / ellipses
    under the item, an affine warp (rotation +-20 deg, scale 0.75-1.0, shift +-3 px), a
    brightness gain 0.6-1.2 and offset +-30, one occluding block covering 10-25% of the side
    length squared on a random edge with probability 0.6, and Gaussian noise (sigma 4-10).

    Args:
        images: uint8 ``[N, H, W, C]`` (C = 1 or 3), objects bright on a dark background
            (Fashion-MNIST) or on any background.
    Returns:
        uint8 ``[N, H, W, C]``.
    """
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"street_style expects uint8 [N, H, W, C] images, got {images.dtype} {images.shape}.")
    n, h, w, c = images.shape
    out = np.empty_like(images)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        channels = []
        # warp all channels with the same parameters
        angle = rng.uniform(-20, 20)
        scale = rng.uniform(0.75, 1.0)
        shift = rng.uniform(-3, 3, size=2)
        theta = np.deg2rad(angle)
        # inverse map output (x, y) -> input: centre, rotate by -theta, scale 1/scale, shift
        cos, sin = np.cos(theta) / scale, np.sin(theta) / scale
        cx, cy = (w - 1) / 2, (h - 1) / 2
        a, b = cos, sin
        d, e = -sin, cos
        tx, ty = cx + shift[0], cy + shift[1]
        coeffs = (a, b, tx - a * cx - b * cy, d, e, ty - d * cx - e * cy)
        for ch in range(c):
            layer = Image.fromarray(images[i, :, :, ch])
            channels.append(np.asarray(layer.transform((w, h), Image.Transform.AFFINE, coeffs,
                                                       Image.Resampling.BILINEAR), np.float32))
        item = np.stack(channels, axis=-1)
        clutter = Image.new("L", (w, h), int(rng.uniform(0, 60)))
        draw = ImageDraw.Draw(clutter)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.uniform(-0.2, 1.0, size=2) * (w, h)
            bw, bh = rng.uniform(0.15, 0.5, size=2) * (w, h)
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape([x0, y0, x0 + bw, y0 + bh], fill=int(rng.uniform(20, 140)))
        background = np.asarray(clutter, np.float32)[..., None]
        mask = np.clip(item.max(axis=-1, keepdims=True) / 40.0, 0.0, 1.0)  # item where it is lit
        pixels = mask * item + (1 - mask) * background
        pixels = pixels * rng.uniform(0.6, 1.2) + rng.uniform(-30, 30)
        if rng.random() < 0.6:
            side = rng.uniform(0.3, 0.5) * h
            edge = int(rng.integers(4))
            pos = rng.uniform(0, h - side)
            y0, x0 = [(0, pos), (pos, w - side), (h - side, pos), (pos, 0)][edge]
            y0, x0 = int(round(y0)), int(round(x0))
            pixels[y0 : y0 + int(side), x0 : x0 + int(side)] = rng.uniform(0, 255)
        pixels += rng.standard_normal(pixels.shape).astype(np.float32) * rng.uniform(4, 10)
        out[i] = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return out


@dataclass
class EvalSetting:
    """Query and gallery images of one evaluation (gallery always given here): uint8
    ``[N, H, W, C]`` arrays, or `atl_keras.data.SourceImages` for a streamed catalog."""

    name: str
    query_images: Any
    query_labels: np.ndarray
    gallery_images: Any
    gallery_labels: np.ndarray


def evaluation_settings(protocol: Protocol, data: Any, schedule: Schedule) -> list[EvalSetting]:
    """The evaluations of `protocol` built from a run's `RetrievalData` (``result.data``)."""
    test = data.test
    if protocol.name in ("shop", "variant_shop"):
        if test.gallery_images is None:
            raise ValueError("The synthetic-shop test set has no gallery; expected street -> catalog.")
        return [EvalSetting(protocol.name, test.query_images, np.asarray(test.query_labels),
                            test.gallery_images, np.asarray(test.gallery_labels))]
    if protocol.name == "catalog":  # a user's data: its query -> gallery protocol, else a split
        if test.gallery_images is not None:
            return [EvalSetting("catalog", test.query_images, np.asarray(test.query_labels),
                                test.gallery_images, np.asarray(test.gallery_labels))]
        labels = np.asarray(test.query_labels)
        q, g = query_gallery_split(labels, EVAL_SEED, schedule.eval_limit)
        return [EvalSetting("catalog", test.query_images[q], labels[q], test.query_images[g], labels[g])]
    if protocol.name == "fmnist":
        labels = np.asarray(test.query_labels)
        q, g = query_gallery_split(labels, EVAL_SEED, schedule.eval_limit)
        queries = test.query_images[q]
        gallery, gallery_labels = test.query_images[g], labels[g]
        return [
            EvalSetting("fmnist_clean", queries, labels[q], gallery, gallery_labels),
            EvalSetting("fmnist_street", street_style(queries, EVAL_SEED), labels[q], gallery, gallery_labels),
        ]
    raise ValueError(f"Unknown protocol {protocol.name!r}; choose from {list(PROTOCOLS)} or catalog.")


def grid_query_rows(num_queries: int, count: int, name: str) -> list[int]:
    """`count` fixed query rows of evaluation `name` (the same for every method and seed)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little"))
    return sorted(rng.choice(num_queries, size=min(count, num_queries), replace=False).tolist())

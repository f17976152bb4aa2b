"""Tiny SavedModels that honour the atl export contract, plus numpy references.

The exporter (``atl_keras/export.py``) writes ``saved_models/NAME/N/`` with the
signatures below; these fixtures build the same contract in pure TensorFlow so
the serving stack can be tested without training anything:

- ``serving_default``: ``{"images": tf.string [B]}`` -> ``{"embeddings": float32 [B, D]}``
- ``embed_pixels``: ``{"pixels": float32 [B, H, W, C]}`` -> ``{"embeddings": float32 [B, D]}``
- ``retrieve`` / ``retrieve_exact``: ``{"images": tf.string [B], "k": int32 []}`` ->
  ``{"ids": tf.string [B, k], "scores": float32 [B, k], "indices": int32 [B, k]}``

The model is ``embedding = l2_normalize(flatten(pixels / 255) @ W)`` and retrieval
is brute-force dot-product top-k against a fixed random gallery, so every output
has an independent numpy reference (:func:`reference_embed`, :func:`reference_retrieve`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import tempfile

import numpy as np
import tensorflow as tf
from PIL import Image

SIGNATURES = ("serving_default", "embed_pixels", "retrieve", "retrieve_exact")


@dataclasses.dataclass(frozen=True)
class FixtureModel:
    """What was written and the parameters needed to reproduce its outputs."""

    path: pathlib.Path
    name: str
    version: int
    projection: np.ndarray  # [H * W * C, D]
    gallery: np.ndarray  # [G, D], rows L2-normalised
    ids: tuple[str, ...]  # [G]
    image_shape: tuple[int, int, int]

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return reference_embed(pixels, self.projection)

    def retrieve(self, pixels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return reference_retrieve(self.embed(pixels), self.gallery, self.ids, k)


def reference_embed(pixels: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """numpy reference of the fixture model. pixels [B, H, W, C] in [0, 255] -> [B, D]."""
    flat = pixels.reshape(len(pixels), -1).astype(np.float64) / 255.0
    emb = flat @ projection.astype(np.float64)
    return (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def reference_retrieve(
    embeddings: np.ndarray, gallery: np.ndarray, ids: tuple[str, ...], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force with Python loops: for each query, the k gallery rows of highest dot product.

    Returns (ids [B, k] object, scores [B, k] float32, indices [B, k] int32).
    """
    out_ids, out_scores, out_idx = [], [], []
    for q in embeddings:
        scores = [float(np.dot(q, g)) for g in gallery]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
        out_idx.append(order)
        out_scores.append([scores[i] for i in order])
        out_ids.append([ids[i] for i in order])
    return (
        np.array(out_ids, dtype=object),
        np.array(out_scores, dtype=np.float32),
        np.array(out_idx, dtype=np.int32),
    )


def random_pixels(n: int, image_shape=(8, 8, 3), seed: int = 0) -> np.ndarray:
    """[n, H, W, C] uint8 images."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *image_shape), dtype=np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """One [H, W, C] uint8 image -> PNG bytes (lossless, so references are exact)."""
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


class _FixtureModule(tf.Module):
    def __init__(self, projection: np.ndarray, gallery: np.ndarray, ids, image_shape):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.projection = tf.Variable(projection, dtype=tf.float32, trainable=False)
        self.gallery = tf.Variable(gallery, dtype=tf.float32, trainable=False)
        self.ids = tf.Variable(list(ids), dtype=tf.string, trainable=False)

    def _embed(self, pixels):
        flat = tf.reshape(pixels / 255.0, [tf.shape(pixels)[0], -1])
        return tf.math.l2_normalize(tf.matmul(flat, self.projection), axis=1)

    def _decode(self, images):
        h, w, c = self.image_shape

        def one(data):
            img = tf.io.decode_image(data, channels=c, expand_animations=False)
            return tf.image.resize(tf.cast(img, tf.float32), [h, w])

        return tf.map_fn(one, images, fn_output_signature=tf.TensorSpec([h, w, c], tf.float32))

    def _retrieve(self, images, k):
        emb = self._embed(self._decode(images))
        scores, indices = tf.math.top_k(tf.matmul(emb, self.gallery, transpose_b=True), k=k)
        return {"ids": tf.gather(self.ids, indices), "scores": scores, "indices": indices}

    def signatures(self) -> dict:
        h, w, c = self.image_shape
        images = tf.TensorSpec([None], tf.string, name="images")
        k = tf.TensorSpec([], tf.int32, name="k")
        serving_default = tf.function(
            lambda images: {"embeddings": self._embed(self._decode(images))}, input_signature=[images]
        )
        embed_pixels = tf.function(
            lambda pixels: {"embeddings": self._embed(pixels)},
            input_signature=[tf.TensorSpec([None, h, w, c], tf.float32, name="pixels")],
        )
        retrieve = tf.function(lambda images, k: self._retrieve(images, k), input_signature=[images, k])
        retrieve_exact = tf.function(
            lambda images, k: self._retrieve(images, k), input_signature=[images, k]
        )
        return {
            "serving_default": serving_default.get_concrete_function(),
            "embed_pixels": embed_pixels.get_concrete_function(),
            "retrieve": retrieve.get_concrete_function(),
            "retrieve_exact": retrieve_exact.get_concrete_function(),
        }


def build_fixture_model(
    base_path: str | os.PathLike,
    version: int = 1,
    *,
    name: str = "atl",
    seed: int | None = None,
    image_shape: tuple[int, int, int] = (8, 8, 3),
    embedding_dim: int = 4,
    gallery_size: int = 12,
) -> FixtureModel:
    """Write ``base_path/<version>/`` atomically (temp dir ``.tmp-<version>-*`` + rename).

    The weights depend on ``seed`` (default: the version), so versions differ.
    """
    base = pathlib.Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(version if seed is None else seed)
    dim_in = int(np.prod(image_shape))
    projection = rng.normal(size=(dim_in, embedding_dim)).astype(np.float32)
    gallery = rng.normal(size=(gallery_size, embedding_dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    ids = tuple(f"item-{i:03d}" for i in range(gallery_size))

    module = _FixtureModule(projection, gallery, ids, image_shape)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base))
    tf.saved_model.save(module, str(tmp), signatures=module.signatures())
    assets = tmp / "assets"
    assets.mkdir(exist_ok=True)
    manifest = {
        "name": name,
        "version": version,
        "embedding_dim": embedding_dim,
        "gallery_size": gallery_size,
        "image_shape": list(image_shape),
        "signatures": list(SIGNATURES),
        "distance": "dot_product",
        "producer": "tests/serving_fixtures.py",
    }
    (assets / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (assets / "gallery_ids.txt").write_text("\n".join(ids) + "\n")
    final = base / str(version)
    os.rename(tmp, final)
    return FixtureModel(final, name, version, projection, gallery, ids, tuple(image_shape))


def replace_version(base_path: str | os.PathLike, version: int, *, seed: int, name: str = "atl") -> FixtureModel:
    """Replace ``base_path/<version>/`` as ``atl export --force`` does.

    The new version is written beside the base, the old directory is renamed to
    ``.old-<version>-*`` and the new one renamed into place (``atl_keras/export.py``).
    """
    base = pathlib.Path(base_path)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=base.parent))
    model = build_fixture_model(staging, version, name=name, seed=seed)
    final = base / str(version)
    os.rename(final, base / f".old-{version}-{os.urandom(4).hex()}")
    os.rename(model.path, final)
    os.rmdir(staging)
    return dataclasses.replace(model, path=final)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming ``width x height`` RGB pixels, without pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))

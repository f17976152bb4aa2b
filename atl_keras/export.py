"""SavedModel export: image model + ScaNN gallery index + id map + manifest, one version.

`export_model` writes `<export_base>/<version>/` exactly as TF Serving expects, so the
model and its index can never drift apart. Signatures:

- `serving_default`: `images` tf.string [B] (encoded JPEG/PNG/GIF/BMP) -> `embeddings` [B, D]
- `embed_pixels`:    `pixels` float32 [B, H, W, C] in [0, 255] -> `embeddings` [B, D]
- `retrieve`:        `images` tf.string [B], `k` int32 [] -> `ids` tf.string [B, k],
                     `scores` float32 [B, k] (dot product = cosine), `indices` int32 [B, k]
                     (ScaNN: the server needs ScaNN's ops; `import scann` before loading)
- `retrieve_exact`:  same, pure TensorFlow brute-force top-k

Stock TF Serving loads every function of a SavedModel, so an export holding ScaNN's
custom ops does not load there at all. `include_scann=False` writes the portable
variant (no `retrieve`, no ScaNN ops) that stock TF Serving serves via `retrieve_exact`.

Assets: `assets/gallery_ids.txt` (one id per line) and `assets/manifest.json`.
Writes go to a hidden temporary directory that is renamed to the version number only
once complete and verified, so a crash never leaves a half-written version.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from atl_keras.index import (
    ScannConfig,
    build_scann_searcher,
    scann_config_for,
    scann_ops,
    scann_recall,
)

MANIFEST_NAME = "manifest.json"
IDS_NAME = "gallery_ids.txt"
SIGNATURES = ("serving_default", "embed_pixels", "retrieve", "retrieve_exact")
PORTABLE_SIGNATURES = ("serving_default", "embed_pixels", "retrieve_exact")
#: Temporary export directories (`.tmp-*`, `.old-*`) left by a killed export are removed by
#: the next export into the same base once they are this old (a live export is never that slow).
STALE_TEMPORARY_SECONDS = 6 * 3600


class ExportError(ValueError):
    """The export was refused; nothing was written."""


@dataclass
class ExportResult:
    """Where a version was written and what its manifest says."""

    path: str
    version: int
    manifest: dict[str, Any]


def existing_versions(export_base: str) -> list[int]:
    """Integer version directories under `export_base`, ascending."""
    if not os.path.isdir(export_base):
        return []
    return sorted(
        int(name)
        for name in os.listdir(export_base)
        if name.isdigit() and os.path.isdir(os.path.join(export_base, name))
    )


def next_version(export_base: str) -> int:
    """One more than the largest existing version, or 1."""
    versions = existing_versions(export_base)
    return versions[-1] + 1 if versions else 1


def model_fingerprint(model: keras.Model) -> str:
    """sha256 over the model's weights (order, shapes and bytes)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.asarray(keras.ops.convert_to_numpy(weight))
        digest.update(weight.path.encode())
        digest.update(str(value.shape).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


class RetrievalModule(tf.Module):
    """The exported object: decode -> embed -> search, over one fixed gallery."""

    def __init__(
        self,
        model: keras.Model,
        gallery_embeddings: np.ndarray,
        gallery_ids: Sequence[str],
        scann_state: tf.Module | None,
        image_shape: tuple[int, int, int],
    ) -> None:
        super().__init__(name="atl_retrieval")
        self.model = model
        self.scann_state = scann_state
        self.gallery_embeddings = tf.Variable(
            gallery_embeddings.astype(np.float32), trainable=False, name="gallery_embeddings"
        )
        self.gallery_ids = tf.Variable(
            tf.constant(list(gallery_ids), dtype=tf.string), trainable=False, name="gallery_ids"
        )
        self.image_shape = tuple(int(x) for x in image_shape)
        height, width, channels = self.image_shape

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serving_default(images):
            return {"embeddings": self._embed(self._decode(images))}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, height, width, channels], tf.float32, name="pixels")
            ]
        )
        def embed_pixels(pixels):
            return {"embeddings": self._embed(pixels)}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.string, name="images"),
                tf.TensorSpec([], tf.int32, name="k"),
            ]
        )
        def retrieve(images, k):
            embeddings = self._embed(self._decode(images))
            searcher = scann_ops.searcher_from_module(self.scann_state)
            indices, scores = searcher.search_batched(embeddings, final_num_neighbors=k)
            return self._results(indices, scores)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.string, name="images"),
                tf.TensorSpec([], tf.int32, name="k"),
            ]
        )
        def retrieve_exact(images, k):
            embeddings = self._embed(self._decode(images))
            scores = tf.matmul(embeddings, self.gallery_embeddings, transpose_b=True)
            scores, indices = tf.math.top_k(scores, k=k)
            return self._results(indices, scores)

        self.serving_default = serving_default
        self.embed_pixels = embed_pixels
        self.retrieve_exact = retrieve_exact
        self.signature_names = SIGNATURES if scann_state is not None else PORTABLE_SIGNATURES
        if scann_state is not None:
            self.retrieve = retrieve

    def _decode(self, images: tf.Tensor) -> tf.Tensor:
        """Encoded images [B] -> float32 pixels [B, H, W, C] in [0, 255]."""
        height, width, channels = self.image_shape

        def decode_one(data):
            image = tf.io.decode_image(data, channels=channels, expand_animations=False)
            image = tf.ensure_shape(image, [None, None, channels])
            size = tf.shape(image)[:2]
            same = tf.reduce_all(tf.equal(size, [height, width]))
            image = tf.cast(image, tf.float32)
            return tf.cond(
                same,
                lambda: image,
                lambda: tf.image.resize(image, [height, width], antialias=True),
            )

        return tf.map_fn(
            decode_one,
            images,
            fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32),
        )

    def _embed(self, pixels: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.model(pixels, training=False), tf.float32)

    def _results(self, indices: tf.Tensor, scores: tf.Tensor) -> dict[str, tf.Tensor]:
        indices = tf.cast(indices, tf.int32)
        return {
            "ids": tf.gather(self.gallery_ids, indices),
            "scores": tf.cast(scores, tf.float32),
            "indices": indices,
        }

    def signatures(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.signature_names}


def _embed(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    if hasattr(model, "embed"):
        return np.asarray(model.embed(images, batch_size=batch_size), dtype=np.float32)
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)


def _validate_gallery(
    model: keras.Model, gallery_images: np.ndarray, gallery_ids: Sequence[Any]
) -> tuple[int, int, int]:
    images = np.asarray(gallery_images)
    if images.ndim != 4:
        raise ExportError(
            f"gallery_images must be [N, H, W, C] pixels, got shape {images.shape}."
        )
    if len(images) == 0:
        raise ExportError("The gallery is empty: give at least one gallery image.")
    if len(gallery_ids) != len(images):
        raise ExportError(
            f"{len(gallery_ids)} gallery ids for {len(images)} gallery images; "
            "give exactly one id per image."
        )
    expected = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
    if expected and all(d is not None for d in expected) and tuple(images.shape[1:]) != expected:
        raise ExportError(
            f"Gallery images have shape {images.shape[1:]}, the model expects {expected}."
        )
    for item in gallery_ids:
        text = str(item)
        if "\n" in text or text == "":
            raise ExportError(f"Gallery id {item!r} is empty or contains a newline.")
    return tuple(int(x) for x in images.shape[1:])


def export_model(
    model: keras.Model,
    gallery_images: np.ndarray,
    gallery_ids: Sequence[Any],
    export_base: str,
    version: int | None = None,
    *,
    query_images: np.ndarray | None = None,
    k: int = 10,
    min_recall: float = 0.95,
    scann_config: ScannConfig | None = None,
    force: bool = False,
    batch_size: int = 256,
    extra_manifest: dict[str, Any] | None = None,
    seed: int = 0,
    include_scann: bool = True,
) -> ExportResult:
    """Export `model` with a ScaNN index over `gallery_images [N, H, W, C]`.

    Args:
        model: a trained embedding model (`ATLModel` or any Keras model mapping pixels in
            [0, 255] to unit-norm embeddings [B, D]).
        gallery_images: catalog images; `gallery_ids` (length N) names each one.
        export_base: e.g. `saved_models/NAME`; the version lands in `export_base/<version>`.
        version: integer version; default the next one.
        query_images: held-out queries for measuring ScaNN recall@k against exact search;
            default a random sample of up to 1000 gallery images.
        min_recall: refuse the export (nothing written) when ScaNN's recall@k is lower.
            Pass 0 to accept any recall.
        force: replace an existing version directory.
        include_scann: False writes the portable variant for stock TF Serving (no
            `retrieve` signature, no ScaNN ops, no recall check).

    Returns:
        `ExportResult(path, version, manifest)`.
    """
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ExportError(f"version must be a positive integer, got {version!r}.")
    if k < 1:
        raise ExportError(f"k must be >= 1, got {k}.")
    if not 0.0 <= min_recall <= 1.0:
        raise ExportError(f"min_recall must be in [0, 1], got {min_recall}.")
    image_shape = _validate_gallery(model, gallery_images, gallery_ids)
    version = version if version is not None else next_version(export_base)
    final_path = os.path.join(export_base, str(version))
    if os.path.exists(final_path) and not force:
        raise ExportError(
            f"{final_path} already exists; choose another version or pass force=True "
            "(--force) to replace it."
        )

    gallery_ids = [str(item) for item in gallery_ids]
    gallery = _embed(model, np.asarray(gallery_images, dtype=np.float32), batch_size)
    if not np.all(np.isfinite(gallery)):
        raise ExportError("The model produced NaN/Inf gallery embeddings; check the model.")
    index_manifest: dict[str, Any] = {"index": "exact (retrieve_exact only)"}
    scann_state = None
    if include_scann:
        index_manifest, scann_state = _build_checked_index(
            model, gallery, query_images, k, min_recall, scann_config, batch_size, seed
        )

    module = RetrievalModule(model, gallery, gallery_ids, scann_state, image_shape)
    import atl_keras  # the package version, imported late to avoid a cycle

    manifest = {
        "name": os.path.basename(os.path.normpath(export_base)),
        "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "package_version": atl_keras.__version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "model_sha256": model_fingerprint(model),
        "model_class": type(model).__name__,
        "embedding_dim": int(gallery.shape[1]),
        "image_shape": list(image_shape),
        "gallery_size": int(len(gallery)),
        "score": "dot_product (cosine similarity of unit vectors; higher is closer)",
        **index_manifest,
        "signatures": list(module.signature_names),
        **(extra_manifest or {}),
    }
    _write_version(module, manifest, gallery_ids, export_base, version, force)
    return ExportResult(path=final_path, version=version, manifest=manifest)


def _build_checked_index(
    model: keras.Model,
    gallery: np.ndarray,
    query_images: np.ndarray | None,
    k: int,
    min_recall: float,
    scann_config: ScannConfig | None,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, Any], tf.Module]:
    """Build the ScaNN index and refuse it if its recall@k is below `min_recall`."""
    config = scann_config or scann_config_for(len(gallery), k)
    searcher = build_scann_searcher(gallery, config)
    if query_images is not None:
        queries = _embed(model, np.asarray(query_images, dtype=np.float32), batch_size)
        query_source = "held-out query images"
    else:
        rng = np.random.default_rng(seed)
        sample = rng.choice(len(gallery), size=min(1000, len(gallery)), replace=False)
        queries = gallery[np.sort(sample)]
        query_source = "gallery sample"
    recall_k = min(k, len(gallery))
    recall = scann_recall(searcher, queries, gallery, k=recall_k)
    if recall < min_recall:
        raise ExportError(
            f"ScaNN recall@{recall_k} against exact search is {recall:.4f}, below "
            f"min_recall={min_recall}. Search more leaves or a larger reorder_k "
            "(scann_config), or lower min_recall (--min-recall) to accept it. Nothing "
            "was written."
        )

    manifest = {
        "index": "scann",
        "scann_config": config.to_dict(),
        f"scann_recall_at_{recall_k}": recall,
        "scann_recall_queries": {"source": query_source, "count": int(len(queries))},
        "min_recall": min_recall,
    }
    return manifest, searcher.serialize_to_module()


def _write_version(
    module: RetrievalModule,
    manifest: dict[str, Any],
    gallery_ids: list[str],
    export_base: str,
    version: int,
    force: bool,
) -> None:
    """Save into a hidden temporary directory, then rename it to `export_base/version`."""
    os.makedirs(export_base, exist_ok=True)
    remove_stale_temporaries(export_base)
    tmp_path = os.path.join(export_base, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    try:
        tf.saved_model.save(module, tmp_path, signatures=module.signatures())
        assets = os.path.join(tmp_path, "assets")
        os.makedirs(assets, exist_ok=True)
        with open(os.path.join(assets, IDS_NAME), "w", encoding="utf-8") as f:
            f.write("\n".join(gallery_ids) + "\n")
        with open(os.path.join(assets, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        _publish(tmp_path, os.path.join(export_base, str(version)), force)
    finally:
        if os.path.exists(tmp_path):
            shutil.rmtree(tmp_path, ignore_errors=True)


def remove_stale_temporaries(export_base: str, max_age_seconds: float = STALE_TEMPORARY_SECONDS) -> list[str]:
    """Delete `.tmp-*` / `.old-*` directories older than `max_age_seconds` in `export_base`.

    They are what a killed export leaves behind (never a servable version: servers only load
    numeric directories). Younger ones may belong to an export still running and are kept.
    Returns the removed names.
    """
    removed = []
    now = time.time()
    for name in sorted(os.listdir(export_base)):
        path = os.path.join(export_base, name)
        if not name.startswith((".tmp-", ".old-")) or not os.path.isdir(path):
            continue
        try:
            age = now - os.path.getmtime(path)
        except FileNotFoundError:  # removed by a concurrent export
            continue
        if age > max_age_seconds:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _publish(tmp_path: str, final_path: str, force: bool) -> None:
    """Rename the finished export into place (replacing an old one only when forced)."""
    if os.path.exists(final_path):
        if not force:
            raise ExportError(f"{final_path} appeared during the export; not overwriting it.")
        trash = f"{os.path.dirname(final_path)}/.old-{os.path.basename(final_path)}-{uuid.uuid4().hex[:8]}"
        os.rename(final_path, trash)
        os.rename(tmp_path, final_path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp_path, final_path)


def load_manifest(version_path: str) -> dict[str, Any]:
    """The manifest of an exported version directory."""
    path = os.path.join(version_path, "assets", MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No {MANIFEST_NAME} in {version_path}/assets; not an atl export.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_export(version_path: str):
    """Load an exported version with `tf.saved_model.load` (ScaNN ops registered)."""
    return tf.saved_model.load(version_path)

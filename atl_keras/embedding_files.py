"""Sharded embedding files: what `atl embed` (`atl_keras.beam`) writes, what `atl index --embeddings` reads.

A folder (local or any ``tf.io.gfile`` file system) holding

- ``embeddings-SSSSS-of-NNNNN.tfrecord``: one ``tf.train.Example`` per embedded catalog row,
  carrying its own key with its vector (never "line N of one file is row N of another"):
  ``file``/``row`` (int64, the row's position in the catalog: the sort order),
  ``item_id``, ``image_id``, ``image`` (path), ``sha256`` (of the image bytes),
  ``metadata`` (one-line JSON object) and ``embedding`` (float ``[D]``). TFRecord frames
  every record with a CRC, so a damaged shard fails loudly when read.
- ``skipped-*.jsonl``: one JSON object per catalog row that gave no embedding (and why).
- ``manifest.json``, written last (its presence means the pipeline finished): the model
  (``model_sha256`` = `atl_keras.embedding.weights_fingerprint`), its ``preprocessing``,
  ``embedding_dim`` and the counts.

    rows, vectors = read_embedding_files("embeddings/")  # [CatalogRow] in catalog order, float32 [N, D]
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np

__all__ = [
    "EMBEDDINGS_PREFIX",
    "FORMAT",
    "MANIFEST_NAME",
    "SKIPPED_PREFIX",
    "encode_record",
    "read_embedding_files",
    "read_manifest",
    "write_manifest",
]

FORMAT = "atl-embeddings/1"
MANIFEST_NAME = "manifest.json"
EMBEDDINGS_PREFIX = "embeddings"
SKIPPED_PREFIX = "skipped"


def encode_record(row: dict[str, Any], vector: np.ndarray) -> bytes:
    """One serialized ``tf.train.Example`` for a catalog row (see the module docstring)."""
    import tensorflow as tf

    def text(value: Any) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(value).encode("utf-8")]))

    def integer(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    features = {
        "file": integer(row["file"]),
        "row": integer(row["row"]),
        "embedding": tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(vector, np.float32).tolist())),
        **{name: text(row[name]) for name in ("item_id", "image_id", "image", "sha256", "metadata")},
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (last: it marks the folder complete); temp file + rename."""
    import tensorflow as tf

    path = os.path.join(folder, MANIFEST_NAME)
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps({"format": FORMAT, **manifest}, indent=2, sort_keys=True) + "\n")
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_manifest(folder: str) -> dict[str, Any]:
    """The manifest of a finished embedding folder (`FileNotFoundError` / `ValueError` otherwise)."""
    import tensorflow as tf

    path = os.path.join(folder, MANIFEST_NAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"No {MANIFEST_NAME} in {folder!r}: not the output of `atl embed`, or its pipeline did not finish "
            "(run it again).")
    with tf.io.gfile.GFile(path, "r") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is format {manifest.get('format')!r}; this atl-keras reads {FORMAT!r}.")
    return manifest


def shard_paths(folder: str, prefix: str = EMBEDDINGS_PREFIX) -> list[str]:
    import tensorflow as tf

    return sorted(tf.io.gfile.glob(os.path.join(folder, f"{prefix}-*")))


def _records(paths: Iterable[str], dim: int) -> Iterable[Any]:
    import tensorflow as tf

    spec = {
        "file": tf.io.FixedLenFeature([], tf.int64),
        "row": tf.io.FixedLenFeature([], tf.int64),
        "embedding": tf.io.FixedLenFeature([dim], tf.float32),
        **{name: tf.io.FixedLenFeature([], tf.string) for name in ("item_id", "image_id", "image", "sha256", "metadata")},
    }
    dataset = tf.data.TFRecordDataset(list(paths)).batch(4096).map(lambda x: tf.io.parse_example(x, spec))
    for batch in dataset.as_numpy_iterator():
        yield batch


def _rows(batch: dict[str, np.ndarray]) -> list[Any]:
    from atl_keras.catalog_index import CatalogRow

    return [CatalogRow(image.decode("utf-8"), item.decode("utf-8"), image_id.decode("utf-8"),
                       metadata.decode("utf-8"), sha.decode("ascii"))
            for image, item, image_id, metadata, sha in zip(
                batch["image"], batch["item_id"], batch["image_id"], batch["metadata"], batch["sha256"])]


def read_embedding_files(folder: str) -> tuple[list[Any], np.ndarray, dict[str, Any]]:
    """``(rows, vectors float32 [N, D], manifest)`` of a finished embedding folder, in catalog order.

    ``rows`` are `atl_keras.catalog_index.CatalogRow` (image, item_id, image_id, metadata, sha256).

    Raises:
        FileNotFoundError: no manifest (unfinished) or no embedding shards.
        ValueError: a record's vector has the wrong size, or an image id appears twice.
    """
    import tensorflow as tf

    from atl_keras.index import aligned_empty

    manifest = read_manifest(folder)
    dim = int(manifest["embedding_dim"])
    paths = shard_paths(folder)
    if not paths:
        raise FileNotFoundError(f"No {EMBEDDINGS_PREFIX}-* shards in {folder!r}.")
    keys: list[np.ndarray] = []
    rows: list[Any] = []
    chunks: list[np.ndarray] = []
    try:
        for batch in _records(paths, dim):
            chunks.append(batch["embedding"])
            keys.append(np.stack([batch["file"], batch["row"]], axis=1))
            rows.extend(_rows(batch))
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(f"{folder}: a record is not an embedding row of {dim} floats (the manifest's "
                         f"embedding_dim): {error.message.splitlines()[0]}") from None
    except tf.errors.DataLossError as error:
        raise ValueError(f"{folder}: a shard is damaged ({error.message.splitlines()[0]}); embed the catalog "
                         "again.") from None
    key = np.concatenate(keys)
    order = np.lexsort((key[:, 1], key[:, 0]))  # by file, then row: the catalog's order
    vectors = aligned_empty((len(order), dim))
    stacked = np.concatenate(chunks)
    for start in range(0, len(order), 65536):
        vectors[start:start + 65536] = stacked[order[start:start + 65536]]
    del stacked
    rows = [rows[i] for i in order]
    seen: set[str] = set()
    for row in rows:
        if row.image_id in seen:
            raise ValueError(f"{folder}: image_id {row.image_id!r} appears twice; image ids must be unique.")
        seen.add(row.image_id)
    return rows, vectors, manifest

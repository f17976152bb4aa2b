"""TFRecord shards of a catalog, with the row index stored beside them.

    result = write_shards(read_catalog("shop.csv"), "data/shop-shards", rows_per_shard=4096)
    catalog = read_shards("data/shop-shards")      # Catalog whose rows stream from the shards
    # atl shards --catalog shop.csv --output data/shop-shards
    # atl train --dataset shards:data/shop-shards

Layout of ``DIR`` (any ``tf.io.gfile`` location: local, ``gs://``, ...)::

    shard-00000-of-00003.tfrecord   records: tf.train.Example {image: encoded file bytes,
    ...                                      item_id: bytes, label: int64, row: int64}
    rows.npz                        per row: shard int32, offset int64 (the record's first
                                    byte), length int32 (its data), label int64, domain and
                                    split codes (uint16)
    index.json                      format, row count, shard names and sizes, the item table
                                    (ids, descriptions, attributes), domain/split names and
                                    the rows skipped when writing

The image bytes are the source files' own (no re-encoding, so no quality loss; in-memory
images are PNG-encoded). Rows are written in catalog order. `ShardImages` reads a row with one
ranged read of its record, so P x K training (`atl_keras.data.streaming`) samples shards at
random without reading them whole; plain ``tf.data.TFRecordDataset`` (or Apache Beam) reads
them sequentially. The folder appears complete or not at all: shards are written into a
temporary sibling folder that is renamed at the end.

Rows whose file is missing, empty, not a JPEG/PNG/GIF/BMP, or declares more than
``max_pixels`` pixels are skipped and listed in ``index.json`` (``skipped``) and in the result.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf

from atl_keras.data.catalog import Catalog
from atl_keras.data.sources import TFRECORD_FRAME, ShardImages
from atl_keras.preprocessing import DEFAULT_MAX_PIXELS

__all__ = ["FORMAT", "ShardsResult", "read_shards", "write_shards"]

FORMAT = "atl-shards/1"
INDEX_FILE = "index.json"
ROWS_FILE = "rows.npz"
_MAX_NAMED = 5


@dataclass
class ShardsResult:
    """What `write_shards` wrote: ``rows`` written, ``skipped`` rows (``{"row", "source", "reason"}``)."""

    directory: str
    rows: int
    shards: list[str]
    bytes: int
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        line = f"{self.rows} rows in {len(self.shards)} shards ({self.bytes / 1e6:.1f} MB) in {self.directory}"
        if self.skipped:
            named = ", ".join(f"{s['source']!r} ({s['reason']})" for s in self.skipped[:_MAX_NAMED])
            more = f" and {len(self.skipped) - _MAX_NAMED} more" if len(self.skipped) > _MAX_NAMED else ""
            line += f"; {len(self.skipped)} rows skipped: {named}{more}"
        return line


def _problem(data: bytes | None, max_pixels: int | None) -> str | None:
    """Why these encoded bytes cannot be a training image (None: they can)."""
    from atl_keras.serving.image_header import image_dimensions

    if data is None:
        return "missing"
    if not data:
        return "empty"
    if not data.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")):
        return "not a JPEG, PNG, GIF or BMP file"
    size = image_dimensions(data)
    if max_pixels and size is not None and size[0] * size[1] > max_pixels:
        return f"declares {size[0]}x{size[1]} pixels, over max_pixels={max_pixels}"
    return None


def _read(path: str) -> bytes | None:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (tf.errors.NotFoundError, OSError):
        return None


def _encoded_rows(catalog: Catalog, threads: int) -> Iterator[bytes | None]:
    """Encoded bytes of every row, in order (None: unreadable)."""
    if catalog.image_paths is not None:
        with ThreadPoolExecutor(max(1, threads)) as pool:  # I/O bound: reads overlap
            yield from pool.map(_read, catalog.image_paths)
    elif catalog.image_records is not None:
        records = catalog.image_records
        ds = tf.data.Dataset.range(len(records)).map(records.read, num_parallel_calls=tf.data.AUTOTUNE)
        yield from ds.as_numpy_iterator()
    else:
        for image in catalog.images:  # type: ignore[union-attr]
            yield tf.io.encode_png(tf.constant(image)).numpy()


def _example(data: bytes, item_id: str, label: int, row: int) -> bytes:
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "item_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[item_id.encode()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "row": tf.train.Feature(int64_list=tf.train.Int64List(value=[row])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _codes(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    names, codes = np.unique(values.astype(str), return_inverse=True)
    return names.tolist(), codes.astype(np.uint16)


def write_shards(
    catalog: Catalog,
    directory: str | os.PathLike,
    rows_per_shard: int = 4096,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    threads: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> ShardsResult:
    """Write ``catalog`` as TFRecord shards + index into ``directory`` (see the module docstring).

    Args:
        catalog: any `Catalog` (files, shard records or in-memory images).
        directory: the folder to create (local or a ``tf.io.gfile`` URL).
        rows_per_shard: records per shard file (the last one holds the rest).
        max_pixels: skip rows whose header declares more pixels (None: no bound).
        overwrite: replace an existing ``directory`` (default: raise `FileExistsError`).
        threads: parallel file reads.
        progress: ``fn(rows_done, rows_total)`` after each shard.
    Raises:
        FileExistsError: ``directory`` exists and ``overwrite`` is False.
        ValueError: ``rows_per_shard < 1``, or no row could be read.
    """
    directory = os.fspath(directory).rstrip("/")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}.")
    if tf.io.gfile.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory!r} exists; choose another folder or pass overwrite=True.")
    n = len(catalog)
    num_shards = max(1, -(-n // rows_per_shard))
    names = [f"shard-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(tmp)
    try:
        shard = np.zeros(n, np.int32)
        offset = np.zeros(n, np.int64)
        length = np.zeros(n, np.int32)
        kept = np.zeros(n, bool)
        skipped: list[dict[str, Any]] = []
        sizes = [0] * num_shards
        rows = _encoded_rows(catalog, threads)
        describe = (lambda r: catalog.image_paths[r]) if catalog.image_paths is not None else (  # noqa: E731
            lambda r: f"row {r}")
        for s in range(num_shards):
            position = 0
            with tf.io.TFRecordWriter(os.path.join(tmp, names[s])) as writer:
                for row in range(s * rows_per_shard, min(n, (s + 1) * rows_per_shard)):
                    data = next(rows)
                    reason = _problem(data, max_pixels)
                    if reason:
                        skipped.append({"row": row, "source": describe(row), "reason": reason})
                        continue
                    record = _example(data, catalog.item_ids[catalog.labels[row]], int(catalog.labels[row]), row)
                    writer.write(record)
                    shard[row], offset[row], length[row], kept[row] = s, position, len(record), True
                    position += TFRECORD_FRAME[0] + len(record) + TFRECORD_FRAME[1]
            sizes[s] = position
            if progress is not None:
                progress(min(n, (s + 1) * rows_per_shard), n)
        if not kept.any():
            raise ValueError(f"None of the {n} rows could be read; {skipped[:1]}.")
        rows_kept = np.flatnonzero(kept)
        domain_names, domain_codes = _codes(catalog.domains[rows_kept])
        split_names, split_codes = _codes(catalog.splits[rows_kept])
        buffer = io.BytesIO()
        np.savez(buffer, shard=shard[rows_kept], offset=offset[rows_kept], length=length[rows_kept],
                 label=catalog.labels[rows_kept], domain=domain_codes, split=split_codes)
        with tf.io.gfile.GFile(os.path.join(tmp, ROWS_FILE), "wb") as f:
            f.write(buffer.getvalue())
        index = {
            "format": FORMAT,
            "rows": int(len(rows_kept)),
            "shards": [{"name": name, "bytes": size} for name, size in zip(names, sizes)],
            "item_ids": list(catalog.item_ids),
            "descriptions": list(catalog.descriptions),
            "item_attributes": catalog.item_attributes,
            "domains": domain_names,
            "splits": split_names,
            "skipped": skipped,
        }
        with tf.io.gfile.GFile(os.path.join(tmp, INDEX_FILE), "w") as f:
            f.write(json.dumps(index, default=str))
        if tf.io.gfile.exists(directory):
            tf.io.gfile.rmtree(directory)
        tf.io.gfile.rename(tmp, directory)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        raise
    return ShardsResult(directory, int(len(rows_kept)), names, int(sum(sizes)), skipped)


def read_shards(directory: str | os.PathLike) -> Catalog:
    """The `Catalog` of a shard folder: its rows' images are `ShardImages` records (nothing
    is read but ``index.json`` and ``rows.npz``)."""
    directory = os.fspath(directory).rstrip("/")
    index_path = os.path.join(directory, INDEX_FILE)
    if not tf.io.gfile.exists(index_path):
        raise FileNotFoundError(f"No {INDEX_FILE} in {directory!r}; write shards with `atl shards` first.")
    with tf.io.gfile.GFile(index_path, "r") as f:
        index = json.loads(f.read())
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}.")
    with tf.io.gfile.GFile(os.path.join(directory, ROWS_FILE), "rb") as f:
        arrays = np.load(io.BytesIO(f.read()))
        rows = {key: arrays[key] for key in arrays.files}
    if len(rows["label"]) != index["rows"]:
        raise ValueError(f"{directory}: {ROWS_FILE} has {len(rows['label'])} rows, {INDEX_FILE} says {index['rows']}.")
    records = ShardImages(directory, [s["name"] for s in index["shards"]], [s["bytes"] for s in index["shards"]],
                          rows["shard"], rows["offset"], rows["length"])
    return Catalog(
        item_ids=index["item_ids"],
        descriptions=index["descriptions"],
        labels=rows["label"],
        domains=np.asarray(index["domains"], dtype=str)[rows["domain"]],
        splits=np.asarray(index["splits"], dtype=str)[rows["split"]],
        item_attributes=index.get("item_attributes"),
        image_records=records,
    )

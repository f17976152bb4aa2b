"""Where the encoded image of each catalog row lives: files or TFRecord shard records.

A source is a compact, in-memory *index* (a few dozen bytes per row, no pixels) plus a
graph function ``read(row) -> encoded bytes`` that ``tf.data`` maps call:

    files = FileImages(["/data/a.jpg", "gs://bucket/b.png", ...])   # tf.io.gfile paths
    records = ShardImages("shards/", names, shard, offset, length)   # see atl_keras.data.shards
    contents = files.read(tf.constant(3, tf.int64))                    # scalar tf.string

- `FileImages` keeps the paths as one byte string (the common prefix taken out) and int64
  offsets: ``len(path) - len(prefix) + 8`` bytes per row, held once in numpy and once as
  the tensor the pipeline reads (``tf.strings.substr`` cuts a path out per row).
- `ShardImages` keeps ``(shard int32, offset int64, length int32)`` per row and reads one
  record with a ``tf.data.FixedLengthRecordDataset`` positioned on it (a ranged read, so
  object stores serve it too): random access into shards without reading them whole.

``subset(rows)`` gives the source of some rows (e.g. the training split); ``describe(row)``
names a row in messages.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np
import tensorflow as tf

__all__ = ["FileImages", "ImageSource", "ShardImages", "TFRECORD_FRAME", "index_table"]

#: Bytes a TFRecord adds before a record's data (uint64 length + uint32 crc) and after it (crc).
TFRECORD_FRAME = (12, 4)


def index_table(values: np.ndarray | bytes | list) -> tf.Variable:
    """An index array (or byte string) held ONCE in memory for ``tf.data`` functions.

    A constant captured by a ``tf.data`` function is copied into the dataset's graph each time
    the graph is serialised (optimisation, iterator creation): ~4 extra copies measured with
    1M rows. A captured variable is passed by reference. Read it with ``tf.gather``.
    """
    with tf.init_scope():
        return tf.Variable(values, trainable=False)


class ImageSource(Protocol):
    """N rows of encoded images (see the module docstring)."""

    def __len__(self) -> int: ...

    def read(self, row: tf.Tensor) -> tf.Tensor:
        """Encoded bytes (scalar tf.string) of ``row`` (int64 scalar); graph ops only."""
        ...

    def subset(self, rows: np.ndarray) -> "ImageSource": ...

    def describe(self, row: int) -> str: ...

    @property
    def nbytes(self) -> int:
        """Bytes of the in-memory index (numpy arrays; the tensors the pipeline reads add as much)."""
        ...


class FileImages:
    """Image files (local or any ``tf.io.gfile`` file system), one per row.

    Args:
        paths: ``N`` file paths (str or os.PathLike).
    """

    def __init__(self, paths: Sequence[str | os.PathLike] | None = None, *,
                 _packed: tuple[str, bytes, np.ndarray] | None = None) -> None:
        if _packed is not None:
            self._prefix, self._blob, self._offsets = _packed
        else:
            if paths is None or isinstance(paths, (str, bytes, os.PathLike)):
                raise TypeError(f"paths must be a sequence of file paths, got {paths!r}.")
            # Two passes over the paths, no per-row Python objects kept: 1M paths cost ~path + 8 bytes each.
            prefix = os.fsencode(paths[0]) if len(paths) > 1 else b""
            for p in paths:
                encoded = os.fsencode(p)
                while not encoded.startswith(prefix):
                    prefix = prefix[: len(os.path.commonprefix([prefix, encoded]))]
            cut = len(prefix)
            self._offsets = np.zeros(len(paths) + 1, np.int64)
            blob = bytearray()
            for i, p in enumerate(paths):
                blob += os.fsencode(p)[cut:]
                self._offsets[i + 1] = len(blob)
            self._blob = bytes(blob)
            self._prefix = os.fsdecode(prefix)
        self._tensors: tuple[tf.Tensor, tf.Tensor] | None = None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def nbytes(self) -> int:
        return len(self._blob) + self._offsets.nbytes + len(self._prefix)

    def path(self, row: int) -> str:
        """The path of ``row``."""
        start, stop = self._offsets[row], self._offsets[row + 1]
        return self._prefix + os.fsdecode(self._blob[start:stop])

    def describe(self, row: int) -> str:
        return self.path(row)

    def paths(self) -> list[str]:
        """All paths (a Python list: ~100 bytes per row; for small catalogs and messages)."""
        return [self.path(i) for i in range(len(self))]

    def subset(self, rows: np.ndarray) -> "FileImages":
        rows = np.asarray(rows, np.int64).reshape(-1)
        starts, stops = self._offsets[rows], self._offsets[rows + 1]
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(stops - starts, out=offsets[1:])
        blob = b"".join(self._blob[a:b] for a, b in zip(starts.tolist(), stops.tolist()))
        return FileImages(_packed=(self._prefix, blob, offsets))

    def path_tensor(self, row: tf.Tensor) -> tf.Tensor:
        """The path of ``row`` (int64 scalar) as a scalar tf.string (graph ops)."""
        if self._tensors is None:
            # shared by every pipeline built on this source
            self._tensors = (index_table(self._blob), index_table(self._offsets))
        blob, offsets = self._tensors
        start, stop = tf.unstack(tf.gather(offsets, tf.stack([row, row + 1])))
        suffix = tf.strings.substr(blob.value(), start, stop - start)
        return tf.strings.join([self._prefix, suffix]) if self._prefix else suffix

    def read(self, row: tf.Tensor) -> tf.Tensor:
        return tf.io.read_file(self.path_tensor(row))


class ShardImages:
    """Encoded images stored as records of TFRecord shards (written by `atl_keras.data.write_shards`).

    Each record is a serialized ``tf.train.Example`` whose ``image`` feature holds the encoded
    file bytes. Row ``i`` is the record that starts ``offset[i]`` bytes into shard file
    ``names[shard[i]]`` (the record's framing included) and is ``length[i]`` bytes long
    (its data only).

    Args:
        directory: folder of the shard files (local or a ``tf.io.gfile`` URL).
        names: shard file names; ``sizes``: their byte sizes (for the ranged read).
        shard, offset, length: ``[N]`` per row.
    """

    def __init__(self, directory: str, names: Sequence[str], sizes: Sequence[int],
                 shard: np.ndarray, offset: np.ndarray, length: np.ndarray) -> None:
        self.directory = os.fspath(directory)
        self.names = [str(n) for n in names]
        self.sizes = np.asarray(sizes, np.int64)
        self.shard = np.asarray(shard, np.int32)
        self.offset = np.asarray(offset, np.int64)
        self.length = np.asarray(length, np.int32)
        n = len(self.shard)
        if len(self.sizes) != len(self.names) or len(self.offset) != n or len(self.length) != n:
            raise ValueError("ShardImages needs one size per shard name and one offset and length per row.")
        self._tensors: tuple[tf.Tensor, ...] | None = None

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def nbytes(self) -> int:
        return self.shard.nbytes + self.offset.nbytes + self.length.nbytes

    def describe(self, row: int) -> str:
        return f"{self.names[self.shard[row]]}@{self.offset[row]}"

    def subset(self, rows: np.ndarray) -> "ShardImages":
        rows = np.asarray(rows, np.int64).reshape(-1)
        return ShardImages(self.directory, self.names, self.sizes, self.shard[rows], self.offset[rows],
                           self.length[rows])

    def read(self, row: tf.Tensor) -> tf.Tensor:
        if self._tensors is None:
            paths = [os.path.join(self.directory, name) for name in self.names]
            self._tensors = tuple(index_table(values) for values in (
                paths, self.sizes, self.shard, self.offset, self.length))
        paths, sizes, shard, offset, length = self._tensors
        s = tf.gather(shard, row)
        start = tf.gather(offset, row) + TFRECORD_FRAME[0]
        size = tf.cast(tf.gather(length, row), tf.int64)
        record = tf.data.FixedLengthRecordDataset(
            tf.gather(paths, s), record_bytes=size, header_bytes=start,
            footer_bytes=tf.gather(sizes, s) - start - size
        ).get_single_element()
        features = tf.io.parse_single_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})
        return features["image"]

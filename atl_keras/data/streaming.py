"""Streaming P x K training input: batches read and decoded from files or shards per step.

    source = FileImages(train.image_paths)                    # or read_shards(dir).image_source
    skipped = SkippedRows()
    ds = pk_stream_dataset(source, train.labels, item_text, Preprocessing(224), p=16, k=4,
                           seed=0, augment=make_augmenter(), skipped=skipped)
    model.fit(ds, steps_per_epoch=..., callbacks=[SkippedRowsWarning(skipped, source)])

Memory holds the index only: per row a label (int64) and the source's entry (a path or a
shard offset); text embeddings stay per *item* ``[M, T]`` and are gathered by label in the
graph. Pixels exist only for the batches in flight (``prefetch``).

Each step ``b`` draws the same rows as `atl_keras.data.sampler.pk_dataset` for the same
labels and seed (`pk_index_dataset`: a pure function of ``(seed, b)``), then reads, decodes
(`atl_keras.preprocessing.decode_image`, the one preprocessing shared with the export and
serving) and augments them inside ``tf.data`` parallel maps (``AUTOTUNE``, ``deterministic``).
No Python generator: the pipeline runs in TensorFlow's threads and under ``tf.distribute``.

``batch_rows=(first, count)`` builds the pipeline of rows ``[first, first + count)`` of every
global batch only: a worker of a multi-worker run reads and decodes just its replicas' rows
(see `atl_keras.distribute.distribute_batch_function`).

Bad rows (missing, 0 bytes, undecodable, or a header declaring more than ``max_pixels``) never
stop training: the failed read is dropped (``ignore_errors`` on a per-step inner dataset) and
its slot takes another image of the same label in the batch (or, if none of that label's K
images could be read, another label's image and label), so every batch stays ``P x K``.
Each failure is counted in `SkippedRows` (tf.Variables updated by the pipeline), which
`SkippedRowsWarning` summarises as one warning per epoch.
"""

from __future__ import annotations

import warnings
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from atl_keras.data.sampler import pk_index_dataset
from atl_keras.data.sources import ImageSource, index_table
from atl_keras.preprocessing import DEFAULT_MAX_PIXELS, Preprocessing, decode_bounded

__all__ = ["SkippedRows", "SkippedRowsWarning", "decode_source", "pk_stream_dataset", "stream_images"]

_AUTOTUNE = tf.data.AUTOTUNE
#: Seed offset of the augmentation (as `pk_dataset`: same augmentation for the same seed).
_AUGMENT_SEED_OFFSET = 1_000_003


class SkippedRows:
    """Counts rows the pipeline could not read; remembers the last ``keep`` of them.

    ``count`` counts failed *reads* (a bad row drawn twice counts twice); ``rows()`` lists the
    distinct rows among the last ``keep`` failures.
    """

    def __init__(self, keep: int = 8) -> None:
        with tf.init_scope():
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_reads")
            self.recent = tf.Variable(tf.fill([keep], tf.constant(-1, tf.int64)), trainable=False,
                                      name="skipped_rows")
        self.keep = keep

    def record(self, rows: tf.Tensor) -> tf.Operation:
        """Add the failed ``rows`` (int64 ``[n]``) (graph op, called by the pipeline)."""
        n = tf.shape(rows, out_type=tf.int64)[0]
        start = self.count.assign_add(n) - n
        slots = tf.math.floormod(start + tf.range(n, dtype=tf.int64), self.keep)
        return self.recent.scatter_nd_update(slots[:, None], rows)

    def total(self) -> int:
        return int(self.count.numpy())

    def rows(self) -> list[int]:
        return sorted({int(r) for r in self.recent.numpy() if r >= 0})

    def summary(self, source: ImageSource | None = None, since: int = 0) -> str | None:
        """One line about the failures after the first ``since`` (None when there were none)."""
        failed = self.total() - since
        if failed <= 0:
            return None
        named = ", ".join(repr(source.describe(r)) if source is not None else str(r) for r in self.rows())
        return (f"{failed} image reads failed (missing, empty, undecodable or over the pixel budget) and were "
                f"replaced by other images of the same label; recent bad rows: {named}. Fix or remove "
                "these rows from the catalog.")


class SkippedRowsWarning(keras.callbacks.Callback):
    """Warns once per epoch (``warnings.warn``) when the pipeline skipped rows during it."""

    def __init__(self, skipped: SkippedRows, source: ImageSource | None = None) -> None:
        super().__init__()
        self.skipped, self.source, self._seen = skipped, source, 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        message = self.skipped.summary(self.source, since=self._seen)
        self._seen = self.skipped.total()
        if message:
            warnings.warn(f"epoch {epoch + 1}: {message}", stacklevel=2)


def _loader(source: ImageSource, preprocessing: Preprocessing, max_pixels: int | None) -> Callable:
    def load(slot: tf.Tensor, row: tf.Tensor):
        return slot, decode_bounded(source.read(row), preprocessing, max_pixels)

    return load


def stream_images(
    source: ImageSource,
    preprocessing: Preprocessing,
    rows: np.ndarray | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tf.data.Dataset:
    """``(row int64, image uint8 [H, W, C])`` for ``rows`` (default all) in order; bad rows dropped."""
    rows = np.arange(len(source), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    return (
        tf.data.Dataset.from_tensor_slices(rows)
        .map(lambda row: _loader(source, preprocessing, max_pixels)(row, row),
             num_parallel_calls=_AUTOTUNE, deterministic=True)
        .ignore_errors(log_warning=False)
    )


def decode_source(
    source: ImageSource,
    image_size: int | tuple[int, int],
    channels: int = 3,
    strict: bool = False,
    resize: str = "pad",
    pad_value: int = 255,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``source`` decoded into memory: ``(uint8 [n_kept, H, W, C], kept bool [N])``,
    as `atl_keras.data.images.decode_images` does for paths (one warning naming the bad rows,
    or `ImageDecodeError` when ``strict``)."""
    from atl_keras.data.images import _report

    prep = Preprocessing(image_size, channels=channels, resize=resize, pad_value=pad_value)
    kept = np.zeros(len(source), bool)
    images = np.zeros((len(source), *prep.image_shape), np.uint8)
    for rows, batch in stream_images(source, prep).batch(batch_size).prefetch(1).as_numpy_iterator():
        images[rows] = batch
        kept[rows] = True
    _report(_Described(source), ~kept, strict)
    return (images if kept.all() else images[kept]), kept


class _Described:
    """``source.describe`` as a read-only sequence (what `images._report` indexes)."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, row: int) -> str:
        return self.source.describe(int(row))


def _fill_slots(slots: tf.Tensor, images: tf.Tensor, count: int, k: int, image_shape) -> tuple[tf.Tensor, tf.Tensor]:
    """Scatter the read ``images`` to their ``slots`` (of ``count``); every missing slot takes a
    read image of its own K-block, else the first read image. Returns ``(images [count, ...],
    source_slot int64 [count])``."""
    present = _present(slots, count)
    placed = tf.scatter_nd(slots[:, None], images, [count, *image_shape])
    blocks = tf.reshape(present, [count // k, k])
    first_in_block = tf.argmax(tf.cast(blocks, tf.int8), axis=1, output_type=tf.int64)
    block_start = tf.range(count // k, dtype=tf.int64) * k
    fallback = tf.argmax(tf.cast(present, tf.int8), output_type=tf.int64)
    block_source = tf.where(tf.reduce_any(blocks, axis=1), block_start + first_in_block, fallback)
    own = tf.range(count, dtype=tf.int64)
    source_slot = tf.where(present, own, tf.repeat(block_source, k))
    return tf.gather(placed, source_slot), source_slot


def _present(slots: tf.Tensor, count: int) -> tf.Tensor:
    """bool ``[count]``: which of the ``count`` slots were read (``slots`` int64 ``[n]``)."""
    return tf.scatter_nd(slots[:, None], tf.ones_like(slots, tf.bool), [count])


def _read_batch(slots: tf.Tensor, images: tf.Tensor, count: int, k: int, image_shape) -> tuple[tf.Tensor, tf.Tensor]:
    """`_fill_slots`, without touching the pixels when every slot was read (the usual batch):
    the scatter + gather copies of a ``[count, H, W, C]`` batch cost more than the per-step
    read itself. Returns ``(images [count, ...], source_slot int64 [count])``."""
    own = tf.range(count, dtype=tf.int64)
    return tf.cond(tf.equal(tf.shape(slots, out_type=tf.int64)[0], count),
                   lambda: (images, own),
                   lambda: _fill_slots(slots, images, count, k, image_shape))


def pk_stream_dataset(
    source: ImageSource,
    labels: np.ndarray,
    item_text: np.ndarray | None,
    preprocessing: Preprocessing,
    p: int = 8,
    k: int = 4,
    seed: int = 0,
    augment: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    batch_rows: tuple[int, int] | None = None,
    skipped: SkippedRows | None = None,
) -> tf.data.Dataset:
    """Infinite P x K batches read from ``source``: ``(images float32 [B, H, W, C], {"label":
    int64 [B], "text_embedding": float32 [B, T]})`` (no text key when ``item_text`` is None).

    Args:
        source: `FileImages` / `ShardImages` of the ``N`` training rows.
        labels: ``[N]`` integer labels (item indices; they index ``item_text``).
        item_text: per-*item* text embeddings ``[M, T]`` (gathered by label), or None.
        preprocessing: decode + resize (`atl_keras.preprocessing.Preprocessing`).
        p, k, seed: as `pk_dataset`: batch ``b`` holds the same rows for the same seed.
        augment: ``fn(images float32 [B, H, W, C], seed int64 [2])``, as in `pk_dataset`.
        max_pixels: rows whose header declares more pixels are skipped (None: no bound).
        batch_rows: ``(first, count)``: only these rows of each global batch (B = count);
            ``first`` and ``count`` must be multiples of ``k`` (whole labels).
        skipped: where failed reads are counted (a fresh `SkippedRows` when None).
    """
    labels = np.asarray(labels)
    if len(labels) != len(source):
        raise ValueError(f"labels ({len(labels)}) and source ({len(source)} rows) differ in length.")
    indices = pk_index_dataset(labels, p=p, k=k, seed=seed)
    first, count = (0, p * k) if batch_rows is None else (int(batch_rows[0]), int(batch_rows[1]))
    if first % k or count % k or count < k or first + count > p * k:
        raise ValueError(f"batch_rows={batch_rows} must cut whole labels (multiples of k={k}) out of "
                         f"the batch of {p * k} rows.")
    if item_text is not None:
        item_text = np.asarray(item_text, np.float32)
        if item_text.ndim != 2 or (len(labels) and labels.max() >= len(item_text)):
            raise ValueError(f"item_text must be per item [M, T] with M > every label, got shape {item_text.shape}.")
    skipped = skipped if skipped is not None else SkippedRows()
    label_table = index_table(labels.astype(np.int64))
    text_table = None if item_text is None else index_table(item_text)
    shape = preprocessing.image_shape
    load = _loader(source, preprocessing, max_pixels)
    # Follows the (possibly empty) batch of read rows, so `take(1)` never finds nothing, even
    # when every read failed. Zero rows: nothing is copied.
    nothing_read = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int64), tf.zeros([0, *shape], tf.uint8)))
    augment_seed = tf.constant(int(seed) + _AUGMENT_SEED_OFFSET, tf.int64)

    def make_batch(step: tf.Tensor, idx: tf.Tensor):
        rows = idx[first : first + count]
        slots, images = (
            tf.data.Dataset.from_tensor_slices((tf.range(count, dtype=tf.int64), rows))
            .map(load, num_parallel_calls=_AUTOTUNE, deterministic=True)
            .ignore_errors(log_warning=False)  # a failed read drops its slot; `_read_batch` refills it
            .batch(count)
            .concatenate(nothing_read)
            .take(1)
            .get_single_element()
        )
        images, source_slot = _read_batch(slots, images, count, k, shape)
        missing = tf.boolean_mask(rows, tf.logical_not(_present(slots, count)))
        with tf.control_dependencies([skipped.record(missing)]):
            x = tf.cast(images, tf.float32)
        if augment is not None:
            x = augment(x, tf.stack([augment_seed, step]))
        x = tf.ensure_shape(x, [count, *shape])
        batch_labels = tf.gather(label_table, tf.gather(rows, source_slot))
        target = {"label": batch_labels}
        if text_table is not None:
            target["text_embedding"] = tf.gather(text_table, batch_labels)
        return x, target

    return indices.enumerate().map(make_batch, num_parallel_calls=_AUTOTUNE, deterministic=True).prefetch(_AUTOTUNE)

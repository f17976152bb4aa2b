"""Streaming P x K input: same batches as the in-memory sampler, slices, bad rows, index size."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from atl_keras.data.images import decode_images
from atl_keras.data.sampler import pk_dataset
from atl_keras.data.sources import FileImages
from atl_keras.data.streaming import (SkippedRows, SkippedRowsWarning, _fill_slots, _read_batch, pk_stream_dataset,
                                      stream_images)
from atl_keras.preprocessing import Preprocessing

SIZE = 12
PREP = Preprocessing((SIZE, SIZE))


def write_images(folder, items: int = 6, per_item: int = 3, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``items * per_item`` small JPEG/PNG files of varied sizes; labels int64 ``[N]``."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths, labels = [], []
    for item in range(items):
        for j in range(per_item):
            h, w = int(rng.integers(10, 20)), int(rng.integers(10, 20))
            path = os.path.join(folder, f"item{item:02d}_{j}.{'png' if j % 2 else 'jpg'}")
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            paths.append(path)
            labels.append(item)
    return paths, np.asarray(labels, np.int64)


def huge_png(path: str, side: int = 100_000) -> str:
    """A few dozen bytes whose IHDR declares ``side x side`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                + chunk(b"IEND", b""))
    return path


def take(ds: tf.data.Dataset, n: int) -> list:
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(n)]


def test_streamed_batches_equal_in_memory_pk_dataset(tmp_path):
    paths, labels = write_images(tmp_path)
    text = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    images, kept = decode_images(paths, SIZE)
    assert kept.all()
    memory = take(pk_dataset(images, labels, text[labels], p=3, k=2, seed=7), 4)
    streamed = take(pk_stream_dataset(FileImages(paths), labels, text, PREP, p=3, k=2, seed=7), 4)
    for (xm, ym), (xs, ys) in zip(memory, streamed):
        np.testing.assert_array_equal(ys["label"], ym["label"])  # same P x K layout, same rows
        np.testing.assert_array_equal(xs, xm)  # the one preprocessing: identical pixels
        np.testing.assert_array_equal(ys["text_embedding"], ym["text_embedding"])
        assert xs.dtype == np.float32 and xs.shape == (6, SIZE, SIZE, 3)


def test_augmented_stream_is_deterministic(tmp_path):
    from atl_keras.data.augment import make_augmenter

    paths, labels = write_images(tmp_path)
    images, _ = decode_images(paths, SIZE)
    make = lambda: pk_stream_dataset(FileImages(paths), labels, None, PREP, p=2, k=3, seed=1,  # noqa: E731
                                     augment=make_augmenter())
    first, again = take(make(), 2), take(make(), 2)
    memory = take(pk_dataset(images, labels, p=2, k=3, seed=1, augment=make_augmenter()), 2)
    for a, b, m in zip(first, again, memory):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[0], m[0], atol=1e-3)  # the same augmentation as in memory
        assert set(a[1]) == {"label"}


def test_batch_rows_cut_whole_labels_out_of_the_global_batch(tmp_path):
    paths, labels = write_images(tmp_path)
    source = FileImages(paths)
    full = take(pk_stream_dataset(source, labels, None, PREP, p=4, k=2, seed=3), 3)
    part = take(pk_stream_dataset(source, labels, None, PREP, p=4, k=2, seed=3, batch_rows=(4, 4)), 3)
    for (xf, yf), (xp, yp) in zip(full, part):
        np.testing.assert_array_equal(yp["label"], yf["label"][4:8])
        np.testing.assert_array_equal(xp, xf[4:8])
    with pytest.raises(ValueError, match="whole labels"):
        pk_stream_dataset(source, labels, None, PREP, p=4, k=2, batch_rows=(1, 4))


def test_bad_rows_are_replaced_counted_and_summarised(tmp_path):
    paths, labels = write_images(tmp_path, items=4, per_item=3)
    bad = {
        1: str(tmp_path / "missing.jpg"),
        3: str(tmp_path / "empty.jpg"),
        4: str(tmp_path / "garbage.jpg"),
        6: huge_png(str(tmp_path / "huge.png")),
        9: str(tmp_path / "missing2.png"),
        10: str(tmp_path / "missing3.png"),
        11: str(tmp_path / "missing4.png"),  # every image of item 3 is bad
    }
    open(tmp_path / "empty.jpg", "wb").close()
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)
    for row, path in bad.items():
        paths[row] = path
    good = [i for i in range(len(paths)) if i not in bad]
    images, _ = decode_images([paths[i] for i in good], SIZE)
    by_row = dict(zip(good, images))
    source = FileImages(paths)
    skipped = SkippedRows()
    ds = pk_stream_dataset(source, labels, None, PREP, p=4, k=3, seed=0, skipped=skipped)
    for x, y in take(ds, 6):
        assert x.shape == (12, SIZE, SIZE, 3)
        for block in range(4):
            block_labels = y["label"][block * 3:(block + 1) * 3]
            assert len(set(block_labels.tolist())) == 1  # K images of one label per block
            # every image is a good image of its label
            for image in x[block * 3:(block + 1) * 3]:
                assert any(np.array_equal(image, by_row[r]) for r in good if labels[r] == block_labels[0])
        assert 3 not in y["label"]  # no image of item 3 could be read: its block took another label's
    # each draw of a bad row was counted (P = 4 of 4 labels: item 3's three bad rows every step)
    assert skipped.total() >= 6 * 3
    assert set(skipped.rows()) <= set(bad)
    message = skipped.summary(source)
    assert "image reads failed" in message and "recent bad rows" in message
    assert any(os.path.basename(bad[r]) in message for r in skipped.rows())
    callback = SkippedRowsWarning(skipped, source)
    with pytest.warns(UserWarning, match="epoch 1: .* image reads failed"):
        callback.on_epoch_end(0)
    assert skipped.summary(source, since=skipped.total()) is None


def test_a_batch_with_every_read_failed_keeps_its_shape_and_counts_every_row(tmp_path):
    paths = [str(tmp_path / f"missing{i}.jpg") for i in range(8)]
    labels = np.repeat(np.arange(4), 2)
    skipped = SkippedRows(keep=16)
    batches = take(pk_stream_dataset(FileImages(paths), labels, None, PREP, p=2, k=2, seed=0, skipped=skipped), 3)
    for x, y in batches:
        assert x.shape == (4, SIZE, SIZE, 3) and not x.any()  # nothing read: zeros, never a crash
        assert len(set(y["label"].tolist())) == 1  # every slot took the first slot's label
    # every failed read is counted, the first slot's too: 4 per batch (the pipeline reads ahead)
    assert skipped.total() >= 3 * 4 and skipped.total() % 4 == 0
    assert set(skipped.rows()) <= set(range(8))


@pytest.mark.parametrize("read", [[0, 1, 2, 3, 4, 5], [0, 2, 3, 5], [1], []])
def test_read_batch_equals_the_slot_fill_and_leaves_a_full_batch_untouched(read):
    rng = np.random.default_rng(len(read))
    count, k, shape = 6, 3, (2, 2, 3)
    slots = tf.constant(read, tf.int64)
    images = tf.constant(rng.integers(0, 256, (len(read), *shape)), tf.uint8)
    got, got_source = _read_batch(slots, images, count, k, shape)
    want, want_source = _fill_slots(slots, images, count, k, shape)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(got_source.numpy(), want_source.numpy())
    if len(read) == count:
        np.testing.assert_array_equal(got.numpy(), images.numpy())
        np.testing.assert_array_equal(got_source.numpy(), np.arange(count))


def test_stream_images_yields_good_rows_in_order(tmp_path):
    paths, labels = write_images(tmp_path, items=2, per_item=2)
    paths[1] = str(tmp_path / "nope.jpg")
    rows = [int(r) for r, _ in stream_images(FileImages(paths), PREP).as_numpy_iterator()]
    assert rows == [0, 2, 3]


def test_file_index_is_compact_and_round_trips(tmp_path):
    paths = [f"/data/catalog/images/{i // 7:06d}/{i % 7}.jpg" for i in range(10_000)]
    source = FileImages(paths)
    assert len(source) == 10_000 and source.path(1234) == paths[1234]
    per_row = source.nbytes / len(source)
    assert per_row < 8 + 16 + 2  # offset + the path's suffix after the common prefix
    subset = source.subset(np.array([5, 9_999, 0]))
    assert subset.paths() == [paths[5], paths[9_999], paths[0]]
    tensor_paths = [subset.path_tensor(tf.constant(i, tf.int64)).numpy().decode() for i in range(3)]
    assert tensor_paths == subset.paths()
    assert FileImages(["only.jpg"]).path(0) == "only.jpg"
    with pytest.raises(TypeError, match="sequence of file paths"):
        FileImages("one.jpg")

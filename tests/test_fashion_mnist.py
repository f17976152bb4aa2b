"""Fashion-MNIST reader: IDX parsing against files written here, plus the real Debian files."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from atl_keras.data import fashion_mnist as fm
from atl_keras.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist, read_idx


def write_idx(path: str, array: np.ndarray, compress: bool = True) -> None:
    """Independent IDX writer: 0x0000, type byte, ndim byte, big-endian uint32 dims, data."""
    type_byte = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = struct.pack(">HBB", 0, type_byte, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


def make_split(directory, split: str, n: int, seed: int = 0, compress: bool = True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    images_stem, labels_stem = fm.SPLIT_FILES[split]
    suffix = ".gz" if compress else ""
    write_idx(os.path.join(directory, images_stem + suffix), images, compress)
    write_idx(os.path.join(directory, labels_stem + suffix), labels, compress)
    return images, labels


@pytest.mark.parametrize("split", ["train", "test"])
def test_reads_idx_fixture(tmp_path, split):
    images, labels = make_split(tmp_path, split, n=7, seed=3)
    data = load_fashion_mnist(split, data_dir=tmp_path)
    assert data.images.dtype == np.uint8 and data.images.shape == (7, 28, 28, 1)
    assert data.labels.dtype == np.int64 and data.labels.shape == (7,)
    np.testing.assert_array_equal(data.images[..., 0], images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.class_names == list(CLASS_NAMES) and len(data.descriptions) == 10
    assert len(data) == 7


def test_reads_uncompressed_idx(tmp_path):
    images, labels = make_split(tmp_path, "test", n=3, compress=False)
    data = load_fashion_mnist("test", data_dir=tmp_path)
    np.testing.assert_array_equal(data.images[..., 0], images)


def test_read_idx_other_dtype_is_big_endian(tmp_path):
    array = (np.arange(6) - 2).astype(">i4").reshape(2, 3)
    write_idx(str(tmp_path / "x.gz"), array)
    out = read_idx(tmp_path / "x.gz", expected_ndim=2)
    np.testing.assert_array_equal(out, [[-2, -1, 0], [1, 2, 3]])


def test_item_descriptions():
    data = fm.FashionMNIST(np.zeros((0, 28, 28, 1), np.uint8), np.zeros(0, np.int64), list(CLASS_NAMES),
                           list(fm.CLASS_DESCRIPTIONS))
    assert data.item_descriptions([0, 9, 0]) == [fm.CLASS_DESCRIPTIONS[0], fm.CLASS_DESCRIPTIONS[9],
                                                 fm.CLASS_DESCRIPTIONS[0]]
    with pytest.raises(ValueError, match="0..9"):
        data.item_descriptions([10])


def test_descriptions_are_distinct_and_related_classes_share_words():
    texts = fm.CLASS_DESCRIPTIONS
    assert len(set(texts)) == 10 and all(10 < len(t) < 200 for t in texts)

    def words(label: int) -> set[str]:
        return set(texts[label].lower().replace(",", "").replace(".", "").split())

    def overlap(a: int, b: int) -> float:
        return len(words(a) & words(b)) / len(words(a) | words(b))

    tshirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, boot = range(10)
    # Similar products read more alike than unrelated ones (what the adaptive margin relies on).
    assert overlap(tshirt, shirt) > overlap(tshirt, sandal)
    assert overlap(sneaker, boot) > overlap(sneaker, shirt)
    assert overlap(sandal, sneaker) > overlap(sandal, bag)


def test_corrupt_files_are_clear_errors(tmp_path):
    make_split(tmp_path, "test", n=4)
    images_path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(images_path.read_bytes())
    images_path.write_bytes(gzip.compress(raw[:-10]))  # truncated data
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_fashion_mnist("test", data_dir=tmp_path)
    images_path.write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))  # bad magic
    with pytest.raises(ValueError, match="not an IDX file"):
        load_fashion_mnist("test", data_dir=tmp_path)
    images_path.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_fashion_mnist("test", data_dir=tmp_path)
    # Labels file with the images' 3-D header.
    make_split(tmp_path, "test", n=4)
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.zeros((4, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="3 dimensions in its IDX header, expected 1"):
        load_fashion_mnist("test", data_dir=tmp_path)


def test_image_label_count_mismatch(tmp_path):
    make_split(tmp_path, "train", n=5)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        load_fashion_mnist("train", data_dir=tmp_path)


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", data_dir=tmp_path)
    # Nothing anywhere: the search list and the fix are in the message.
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "nope"))
    monkeypatch.setattr(fm, "_dpkg_dirs", lambda: [])
    monkeypatch.setattr(fm, "_keras_cache_dir", lambda: str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*data_dir="):
        load_fashion_mnist("test")
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation", data_dir=tmp_path)


def test_search_order_debian_then_dpkg_then_keras_cache(tmp_path, monkeypatch):
    debian, dpkg_dir, cache = tmp_path / "debian", tmp_path / "dpkg", tmp_path / "cache"
    for d in (dpkg_dir, cache):
        d.mkdir()
    make_split(dpkg_dir, "test", n=2, seed=1)
    make_split(cache, "test", n=3, seed=2)
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(debian))  # absent -> dpkg -L is asked
    monkeypatch.setattr(fm, "_dpkg_dirs", lambda: [str(dpkg_dir)])
    monkeypatch.setattr(fm, "_keras_cache_dir", lambda: str(cache))
    assert len(load_fashion_mnist("test")) == 2
    monkeypatch.setattr(fm, "_dpkg_dirs", lambda: [])
    assert len(load_fashion_mnist("test")) == 3
    debian.mkdir()
    make_split(debian, "test", n=4)
    assert len(load_fashion_mnist("test")) == 4


@pytest.mark.skipif(not os.path.isdir(fm.DEBIAN_DIR), reason="Debian package dataset-fashion-mnist not installed")
def test_real_debian_files():
    for split, n in (("train", 60000), ("test", 10000)):
        data = load_fashion_mnist(split)
        assert data.images.shape == (n, 28, 28, 1) and data.images.dtype == np.uint8
        assert data.labels.shape == (n,) and data.labels.min() == 0 and data.labels.max() == 9
        assert np.bincount(data.labels).tolist() == [n // 10] * 10  # balanced classes

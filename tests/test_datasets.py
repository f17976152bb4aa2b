"""Dataset specs: every reader becomes train / validation / test with disjoint items."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
from PIL import Image

from atl_keras.data.datasets import load_retrieval_data
from atl_keras.data.fashion_mnist import CLASS_NAMES


def item_sets(data):
    train = set(data.train_labels.tolist())
    val = set(data.validation.query_labels.tolist())
    test = set(data.test.query_labels.tolist())
    if data.test.gallery_labels is not None:
        test |= set(data.test.gallery_labels.tolist())
        val |= set(data.validation.gallery_labels.tolist())
    return train, val, test


def test_synthetic_shop_is_street_to_catalog_on_unseen_items():
    data = load_retrieval_data("synthetic-shop", synthetic_items=60, seed=1)
    train, val, test = item_sets(data)
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert data.test.protocol == "street->catalog" == data.validation.protocol
    assert len(data.test.gallery_ids) == len(data.test.gallery_images)
    assert set(data.test.query_labels.tolist()) == set(data.test.gallery_labels.tolist())
    assert data.image_shape == (32, 32, 3)
    assert all(data.descriptions[i] for i in train)


def test_synthetic_shop_unseen_categories_only_in_test():
    data = load_retrieval_data("synthetic-shop", synthetic_items=60, unseen_classes=("boot",), seed=1)
    catalog_items = set(data.test.query_labels.tolist())
    train, _, _ = item_sets(data)
    boot_items = {i for i, text in enumerate(data.descriptions) if text and "boot" in text.lower()}
    assert boot_items and not (boot_items & train)
    assert boot_items & catalog_items


@pytest.mark.skipif(
    not __import__("os").path.exists("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_unseen_classes_protocol():
    held_out = ("Sandal", "Shirt", "Bag", "Ankle boot")
    data = load_retrieval_data("fashion-mnist", unseen_classes=held_out, validation_size=500)
    held = {CLASS_NAMES.index(name) for name in held_out}
    assert set(data.train_labels.tolist()).isdisjoint(held)
    assert set(data.validation.query_labels.tolist()).isdisjoint(held)
    assert set(data.test.query_labels.tolist()) == held
    assert data.test.protocol == "leave-one-out" and len(data.test.query_images) == 4000


def write_catalog(tmp_path, domains: bool):
    rng = np.random.default_rng(0)
    rows = []
    for item in range(30):
        for view in range(4):
            name = f"img_{item}_{view}.png"
            Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(tmp_path / name)
            domain = ("catalog" if view < 2 else "street") if domains else "catalog"
            rows.append({"image": name, "item_id": f"sku-{item}", "description": f"product {item % 7}",
                         "domain": domain})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.append({"image": "broken.png", "item_id": "sku-0", "description": "product 0", "domain": "catalog"})
    path = tmp_path / "shop.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "item_id", "description", "domain"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_catalog_with_two_domains_skips_the_corrupt_image(tmp_path):
    path = write_catalog(tmp_path, domains=True)
    with pytest.warns(UserWarning, match="broken.png"):
        data = load_retrieval_data(f"catalog:{path}", image_size=16, stream=False)
    train, val, test = item_sets(data)
    assert not (train & val) and not (train & test) and not (val & test)
    assert data.test.protocol == "street->catalog"
    assert data.train_images.shape[1:] == (16, 16, 3)


def test_csv_catalog_streams_training_rows_and_keeps_evaluation_rows_as_files(tmp_path):
    from atl_keras.data.source_images import SourceImages
    from atl_keras.data.sources import FileImages

    path = write_catalog(tmp_path, domains=True)
    with pytest.warns(UserWarning, match="broken.png"):
        memory = load_retrieval_data(f"catalog:{path}", image_size=16, stream=False)
    with warnings.catch_warnings(record=True):  # broken.png warns again if it is an evaluation row
        warnings.simplefilter("always")
        data = load_retrieval_data(f"catalog:{path}", image_size=16)
    assert data.train_images is None and isinstance(data.train_source, FileImages)
    assert data.image_shape == (16, 16, 3) == memory.image_shape
    # the index keeps every training row (a bad one is skipped when read); labels as in memory
    assert len(data.train_source) == len(data.train_labels) >= len(memory.train_labels)
    assert set(data.train_labels.tolist()) == set(memory.train_labels.tolist())
    # evaluation rows stay files: the same rows, labels and (decoded) pixels as in memory
    for streamed, decoded in ((data.test, memory.test), (data.validation, memory.validation)):
        assert isinstance(streamed.query_images, SourceImages)
        assert streamed.query_images.shape == decoded.query_images.shape
        np.testing.assert_array_equal(streamed.query_images.decode(), decoded.query_images)
        np.testing.assert_array_equal(streamed.gallery_images.decode(), decoded.gallery_images)
        np.testing.assert_array_equal(streamed.query_labels, decoded.query_labels)
        np.testing.assert_array_equal(streamed.gallery_labels, decoded.gallery_labels)
        assert streamed.gallery_ids == decoded.gallery_ids


def test_catalog_rows_have_the_image_ids_atl_index_gives_them(tmp_path):
    """One image id everywhere: the evaluation sets (and so the TensorBoard projector and
    `atl export`) name a catalog row as `atl index` does: its image path as written."""
    from atl_keras.catalog_index import read_index_catalog

    path = write_catalog(tmp_path, domains=True)
    with pytest.warns(UserWarning, match="broken.png"):
        data = load_retrieval_data(f"catalog:{path}", image_size=16, stream=False)
    indexed = {row.image_id for row in read_index_catalog(str(path))}
    ids = data.test.gallery_ids
    assert ids and set(ids) <= indexed and all(i.endswith(".png") for i in ids)
    assert not [i for i in ids if "#" in i]


def test_csv_catalog_strict_mode_names_the_file(tmp_path):
    path = write_catalog(tmp_path, domains=True)
    with pytest.raises(ValueError, match="broken.png"):
        load_retrieval_data(f"catalog:{path}", image_size=16, strict=True)


def test_single_domain_catalog_uses_leave_one_out(tmp_path):
    path = write_catalog(tmp_path, domains=False)
    with pytest.warns(UserWarning):
        data = load_retrieval_data(f"catalog:{path}", image_size=16)
    assert data.test.protocol == "leave-one-out" and data.test.gallery_images is None


@pytest.mark.parametrize("spec, message", [
    ("nope", "Unknown dataset"),
    ("catalog:", "Give the catalog file"),
    ("deepfashion-inshop:", "Give the dataset root"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        load_retrieval_data(spec)

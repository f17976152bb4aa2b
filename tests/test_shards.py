"""TFRecord shards: write_shards / read_shards round trip, ranged reads, streaming, bad rows, CLI."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from atl_keras import cli
from atl_keras.data.catalog import Catalog, read_catalog
from atl_keras.data.sampler import pk_dataset
from atl_keras.data.shards import read_shards, write_shards
from atl_keras.data.streaming import pk_stream_dataset
from atl_keras.preprocessing import Preprocessing
from tests.test_distribute import write_image_catalog
from tests.test_streaming import huge_png


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory) -> str:
    return write_image_catalog(str(tmp_path_factory.mktemp("shop")), items=10, per_item=4)


def test_round_trip_keeps_rows_items_and_bytes(catalog_file, tmp_path):
    catalog = read_catalog(catalog_file)
    result = write_shards(catalog, tmp_path / "shards", rows_per_shard=7)
    assert result.rows == 40 and len(result.shards) == 6 and not result.skipped
    back = read_shards(tmp_path / "shards")
    assert back.item_ids == catalog.item_ids and back.descriptions == catalog.descriptions
    np.testing.assert_array_equal(back.labels, catalog.labels)
    np.testing.assert_array_equal(back.splits, catalog.splits)
    np.testing.assert_array_equal(back.domains, catalog.domains)
    records = back.image_records
    for row in (0, 6, 7, 39):  # first/last record of a shard: ranged reads land on record bounds
        with open(catalog.image_paths[row], "rb") as f:
            assert records.read(tf.constant(row, tf.int64)).numpy() == f.read()
    # plain sequential readers see tf.train.Examples in catalog order
    names = sorted(n for n in os.listdir(tmp_path / "shards") if n.endswith(".tfrecord"))
    first = next(iter(tf.data.TFRecordDataset(str(tmp_path / "shards" / names[0]))))
    example = tf.train.Example.FromString(first.numpy())
    assert example.features.feature["item_id"].bytes_list.value[0].decode() == catalog.row_item_ids[0]
    # the evaluation decode of shard rows equals the files'
    images, kept = back.subset(np.arange(5)).load_images(16)
    expected, _ = catalog.subset(np.arange(5)).load_images(16)
    assert kept.all()
    np.testing.assert_array_equal(images, expected)


def test_streaming_from_shards_equals_in_memory_batches(catalog_file, tmp_path):
    catalog = read_catalog(catalog_file).split("train")
    write_shards(catalog, tmp_path / "shards", rows_per_shard=5)
    back = read_shards(tmp_path / "shards")
    images, _ = catalog.load_images(16)
    memory = list(pk_dataset(images, catalog.labels, p=3, k=2, seed=2).take(3))
    streamed = list(pk_stream_dataset(back.image_source(), back.labels, None, Preprocessing(16), p=3, k=2,
                                      seed=2).take(3))
    for (xm, ym), (xs, ys) in zip(memory, streamed):
        np.testing.assert_array_equal(ys["label"], ym["label"])
        np.testing.assert_array_equal(xs, xm)


def test_bad_rows_are_skipped_and_listed_and_nothing_half_written(catalog_file, tmp_path):
    catalog = read_catalog(catalog_file)
    paths = list(catalog.image_paths)
    paths[1] = str(tmp_path / "missing.png")
    open(tmp_path / "empty.jpg", "wb").close()
    paths[2] = str(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    paths[3] = str(tmp_path / "text.jpg")
    paths[4] = huge_png(str(tmp_path / "huge.png"))
    bad = Catalog(catalog.item_ids, catalog.descriptions, catalog.labels, catalog.domains, catalog.splits,
                  image_paths=paths)
    result = write_shards(bad, tmp_path / "shards", rows_per_shard=16)
    assert result.rows == 36 and [s["row"] for s in result.skipped] == [1, 2, 3, 4]
    reasons = [s["reason"] for s in result.skipped]
    assert reasons[:3] == ["missing", "empty", "not a JPEG, PNG, GIF or BMP file"] and "over max_pixels" in reasons[3]
    assert "4 rows skipped" in result.summary() and "missing.png" in result.summary()
    assert len(read_shards(tmp_path / "shards")) == 36
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shards(bad, tmp_path / "shards")
    assert sorted(os.listdir(tmp_path)) == ["empty.jpg", "huge.png", "shards", "text.jpg"]  # no tmp folder left
    with pytest.raises(FileNotFoundError, match="atl shards"):
        read_shards(tmp_path / "nothing")


def test_in_memory_catalog_is_png_encoded(tmp_path):
    from atl_keras.data.synthetic_shop import make_synthetic_shop

    shop = make_synthetic_shop(num_items=6, street_per_item=1)
    write_shards(shop, tmp_path / "shards")
    images, kept = read_shards(tmp_path / "shards").load_images(shop.images.shape[1])
    assert kept.all()
    np.testing.assert_array_equal(images, shop.images)  # PNG is lossless


def test_cli_writes_shards_and_trains_from_them(catalog_file, tmp_path, capsys):
    out = tmp_path / "shards"
    assert cli.main(["shards", "--dataset", f"catalog:{catalog_file}", "--output", str(out),
                     "--rows-per-shard", "16"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 40 rows in 3 shards" in printed and f"--dataset shards:{out}" in printed
    assert cli.main(["shards", "--dataset", f"catalog:{catalog_file}", "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    from atl_keras.train import TrainConfig, run_training

    result = run_training(TrainConfig(
        dataset=f"shards:{out}", image_size=16, text_encoder="hashing", text_cache_dir=str(tmp_path / "cache"),
        p=2, k=2, epochs=1, steps_per_epoch=2, ks=(1, 3), embedding_dim=8, output_dir=str(tmp_path / "run"),
        projector_size=0, validation_size=0), verbose=0)
    assert result.data.train_images is None and np.isfinite(result.history["loss"]).all()

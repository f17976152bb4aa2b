"""`atl calibrate` and `atl dedupe` on a real export, photos read from files."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from atl_keras.cli import calibrate, dedupe
from atl_keras.export import export_model
from atl_keras.search import RetrievalIndex


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255.0)(inputs))
    return keras.Model(inputs, keras.layers.UnitNormalization()(keras.layers.Dense(16)(x)))


def write_png(path, pixels) -> str:
    tf.io.write_file(str(path), tf.io.encode_png(tf.cast(np.clip(pixels, 0, 255), tf.uint8)))
    return str(path)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    rng = np.random.default_rng(0)
    gallery = rng.integers(0, 256, size=(40, 12, 12, 1)).astype(np.float32)
    gallery[39] = np.clip(gallery[3] + 2, 0, 255)  # a near-duplicate listing of item 3
    ids = [f"sku-{i}" for i in range(40)]
    model = tiny_model()
    result = export_model(model, gallery, ids, str(root / "models" / "shop"), include_scann=False)
    rows = ["image,item_id"]
    for n in range(60):  # 30 photos of catalog products, 30 of products not in the catalog
        if n % 2 == 0:
            item = (n // 2) % 39
            pixels = gallery[item] + rng.normal(0, 25, size=gallery[item].shape)
            rows.append(f"{write_png(root / f'q{n}.png', pixels)},sku-{item}")
        else:
            rows.append(f"{write_png(root / f'q{n}.png', rng.integers(0, 256, size=(12, 12, 1)))},")
    (root / "labelled.csv").write_text("\n".join(rows) + "\n")
    return root, result


def test_calibrate_cli_writes_threshold_curve_and_plot(shop, capsys):
    root, result = shop
    out, plot = root / "calibration.json", root / "pr.png"
    assert calibrate.main(["--index", result.path, "--queries", str(root / "labelled.csv"), "--output", str(out),
                           "--plot", str(plot), "--target-precision", "0.9"]) == 0
    printed = capsys.readouterr().out
    calibration = json.loads(out.read_text())
    assert calibration["threshold"] is not None and calibration["precision"] >= 0.9
    assert calibration["num_queries"] == 60 and calibration["num_in_gallery"] == 30
    assert "match threshold" in printed and plot.read_bytes().startswith(b"\x89PNG")
    # the export's own model embedded the photos: the same as the Keras model
    index = RetrievalIndex.load(result.path)
    photos = [str(root / "q0.png")]
    pixels = tf.io.decode_png(tf.io.read_file(photos[0]), channels=1)[None].numpy().astype(np.float32)
    np.testing.assert_allclose(index.embed_queries(photos), np.asarray(tiny_model()(pixels)), atol=1e-5)


def test_dedupe_cli_finds_the_near_duplicate_listing(shop, capsys):
    root, result = shop
    assert dedupe.main(["--index", result.path, "--threshold", "0.995", "--output", str(root / "dups.json")]) == 0
    groups = json.loads((root / "dups.json").read_text())["groups"]
    assert [g["item_ids"] for g in groups] == [["sku-3", "sku-39"]]
    assert dedupe.main(["--index", result.path]) == 2
    assert "no match threshold" in capsys.readouterr().err


def test_match_threshold_flag_reads_numbers_and_calibration_files(tmp_path):
    import argparse

    from atl_keras.cli.index import match_threshold

    (tmp_path / "c.json").write_text(json.dumps({"threshold": 0.81}))
    (tmp_path / "bad.json").write_text(json.dumps({"threshold": None}))
    assert match_threshold(argparse.Namespace(match_threshold="0.5")) == 0.5
    assert match_threshold(argparse.Namespace(match_threshold=str(tmp_path / "c.json"))) == 0.81
    with pytest.raises(ValueError, match="no calibrated threshold"):
        match_threshold(argparse.Namespace(match_threshold=str(tmp_path / "bad.json")))
    with pytest.raises(ValueError, match="neither a number"):
        match_threshold(argparse.Namespace(match_threshold="nope"))

"""Export: SavedModel signatures agree with the Keras model; ScaNN recall gate; atomicity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from atl_keras.export import (
    STALE_TEMPORARY_SECONDS,
    ExportError,
    existing_versions,
    export_model,
    load_export,
    load_manifest,
    next_version,
)
from atl_keras.index import ScannConfig

IMAGE_SHAPE = (12, 12, 1)


def tiny_model(seed: int = 0) -> keras.Model:
    """Pixels [B, 12, 12, 1] in [0, 255] -> unit vectors [B, 8]."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(IMAGE_SHAPE)
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(8)(x)
    return keras.Model(inputs, keras.layers.UnitNormalization()(x))


def images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *IMAGE_SHAPE)).astype(np.float32)


def png_bytes(batch: np.ndarray) -> list[bytes]:
    return [tf.io.encode_png(tf.cast(image, tf.uint8)).numpy() for image in batch]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    gallery = images(300, seed=1)
    ids = [f"item-{i:03d}" for i in range(len(gallery))]
    base = str(tmp_path_factory.mktemp("exports") / "tiny")
    result = export_model(model, gallery, ids, base, query_images=images(50, seed=2))
    return model, gallery, ids, result, load_export(result.path)


def test_export_writes_version_one_with_manifest_and_ids(exported):
    _, gallery, ids, result, _ = exported
    assert result.version == 1 and os.path.basename(result.path) == "1"
    manifest = load_manifest(result.path)
    assert manifest["gallery_size"] == len(gallery)
    assert manifest["embedding_dim"] == 8
    assert manifest["image_shape"] == list(IMAGE_SHAPE)
    assert manifest["scann_recall_at_10"] >= 0.95
    assert len(manifest["model_sha256"]) == 64
    with open(os.path.join(result.path, "assets", "gallery_ids.txt"), encoding="utf-8") as f:
        assert f.read().split("\n")[:-1] == ids


def test_signatures_match_keras_model_within_1e5(exported):
    model, _, _, _, loaded = exported
    queries = images(7, seed=3)
    expected = model.predict(queries, verbose=0)
    from_pixels = loaded.signatures["embed_pixels"](pixels=tf.constant(queries))["embeddings"]
    from_png = loaded.signatures["serving_default"](images=tf.constant(png_bytes(queries)))
    np.testing.assert_allclose(from_pixels.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(from_png["embeddings"].numpy(), expected, atol=1e-5)


def test_decoding_resizes_other_sizes_and_converts_rgb(exported):
    _, _, _, _, loaded = exported
    rgb = np.random.default_rng(0).integers(0, 256, size=(30, 20, 3)).astype(np.uint8)
    jpeg = tf.io.encode_jpeg(tf.constant(rgb)).numpy()
    out = loaded.signatures["serving_default"](images=tf.constant([jpeg]))["embeddings"]
    assert out.shape == (1, 8)
    np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=1), 1.0, atol=1e-5)


def test_retrieve_exact_and_scann_agree_with_brute_force(exported):
    model, gallery, ids, _, loaded = exported
    queries = images(5, seed=4)
    q = model.predict(queries, verbose=0)
    g = model.predict(gallery, verbose=0)
    scores = q @ g.T
    k = 6
    for name in ("retrieve_exact", "retrieve"):
        out = loaded.signatures[name](images=tf.constant(png_bytes(queries)), k=tf.constant(k))
        assert out["ids"].shape == (5, k) and out["scores"].shape == (5, k)
        for row in range(5):
            expected = np.sort(scores[row])[::-1][:k]
            np.testing.assert_allclose(out["scores"].numpy()[row], expected, atol=1e-5)
            got_ids = [x.decode() for x in out["ids"].numpy()[row]]
            assert got_ids == [ids[i] for i in out["indices"].numpy()[row]]


def test_recall_threshold_is_enforced_and_nothing_is_written(tmp_path):
    model = tiny_model()
    gallery = images(2000, seed=5)
    crude = ScannConfig(
        num_leaves=200,
        num_leaves_to_search=1,
        training_sample_size=2000,
        dimensions_per_block=4,
        reorder_k=0,
    )
    base = str(tmp_path / "gated")
    with pytest.raises(ExportError, match="recall@10"):
        export_model(model, gallery, list(range(2000)), base, scann_config=crude)
    assert existing_versions(base) == []
    assert not os.path.exists(base) or os.listdir(base) == []
    # The same crude index is accepted when the user lowers the bar explicitly.
    result = export_model(model, gallery, list(range(2000)), base, scann_config=crude, min_recall=0.0)
    assert result.manifest["scann_recall_at_10"] < 0.95


def test_existing_version_needs_force(tmp_path):
    model = tiny_model()
    gallery = images(20)
    base = str(tmp_path / "m")
    export_model(model, gallery, list(range(20)), base)
    assert next_version(base) == 2
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, gallery, list(range(20)), base, version=1)
    other = tiny_model(seed=7)
    result = export_model(other, gallery, list(range(20)), base, version=1, force=True)
    assert load_manifest(result.path)["model_sha256"] == result.manifest["model_sha256"]
    assert existing_versions(base) == [1]
    assert [n for n in os.listdir(base) if n.startswith(".")] == []


@pytest.mark.parametrize(
    "gallery, ids, message",
    [
        (np.zeros((0, *IMAGE_SHAPE), np.float32), [], "empty"),
        (np.zeros((3, *IMAGE_SHAPE), np.float32), ["a", "b"], "one id per image"),
        (np.zeros((3, 10, 10, 1), np.float32), ["a", "b", "c"], "expects"),
        (np.zeros((3, 12, 12), np.float32), ["a", "b", "c"], r"\[N, H, W, C\]"),
        (np.zeros((2, *IMAGE_SHAPE), np.float32), ["a", "b\nc"], "newline"),
    ],
)
def test_bad_gallery_is_refused_clearly(tmp_path, gallery, ids, message):
    with pytest.raises(ExportError, match=message):
        export_model(tiny_model(), gallery, ids, str(tmp_path / "bad"))
    assert existing_versions(str(tmp_path / "bad")) == []


def test_export_killed_midway_leaves_no_version_directory(tmp_path):
    """SIGKILL while the SavedModel is being written: no `N/` directory appears."""
    base = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import tensorflow as tf
        from test_export import tiny_model, images
        from atl_keras import export as ex

        original_save = tf.saved_model.save
        def slow_save(*args, **kwargs):
            original_save(*args, **kwargs)
            print("SAVED", flush=True)
            time.sleep(60)  # killed here: SavedModel written, not yet published
        tf.saved_model.save = slow_save
        ex.export_model(tiny_model(), images(50), list(range(50)), {str(base)!r})
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline and "SAVED" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "SAVED" in line, "the export subprocess never reached the save"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert existing_versions(str(base)) == []
    leftovers = os.listdir(base)
    assert leftovers and all(name.startswith(".tmp-") for name in leftovers)
    assert next_version(str(base)) == 1
    # the next export removes leftovers older than STALE_TEMPORARY_SECONDS, keeps younger ones
    stale_time = time.time() - STALE_TEMPORARY_SECONDS - 60
    for name in leftovers:
        os.utime(base / name, (stale_time, stale_time))
    (base / ".tmp-7-running").mkdir()
    export_model(tiny_model(), images(20), list(range(20)), str(base))
    assert sorted(os.listdir(base)) == [".tmp-7-running", "1"]


STOCK_LOADER = """
import sys, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf  # no `import scann`: a stock TF Serving process has no ScaNN ops
assert "scann" not in sys.modules
with tf.compat.v1.Session(graph=tf.Graph()) as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], sys.argv[1])
    print("SIGNATURES", sorted(meta.signature_def))
"""


def test_portable_export_loads_without_scann_ops_like_stock_tf_serving(tmp_path):
    """Stock TF Serving loads the whole graph: only the portable variant loads there."""
    model = tiny_model()
    gallery = images(40)
    full = export_model(model, gallery, list(range(40)), str(tmp_path / "full"))
    portable = export_model(
        model, gallery, list(range(40)), str(tmp_path / "portable"), include_scann=False
    )
    assert portable.manifest["signatures"] == ["serving_default", "embed_pixels", "retrieve_exact"]
    assert portable.manifest["index"].startswith("exact")

    ok = subprocess.run(
        [sys.executable, "-c", STOCK_LOADER, portable.path], capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "retrieve_exact" in ok.stdout and "'retrieve'" not in ok.stdout
    refused = subprocess.run(
        [sys.executable, "-c", STOCK_LOADER, full.path], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode != 0 and "Scann" in refused.stderr

    loaded = load_export(portable.path)
    queries = images(3, seed=9)
    out = loaded.signatures["retrieve_exact"](images=tf.constant(png_bytes(queries)), k=tf.constant(4))
    expected = load_export(full.path).signatures["retrieve_exact"](
        images=tf.constant(png_bytes(queries)), k=tf.constant(4)
    )
    np.testing.assert_array_equal(out["indices"].numpy(), expected["indices"].numpy())

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
    assert any(name.startswith(".tmp-") for name in leftovers)
    assert all(name.startswith((".tmp-", ".reserved-")) for name in leftovers)
    assert next_version(str(base)) == 1  # the dead export's reservation does not count
    # the next export removes leftovers older than STALE_TEMPORARY_SECONDS, keeps younger ones
    stale_time = time.time() - STALE_TEMPORARY_SECONDS - 60
    for name in leftovers:
        if name.startswith(".tmp-"):
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


# ------------------------------------------------------------------ preprocessing parity
PARITY_SHAPE = (24, 24, 3)


def parity_model() -> keras.Model:
    """Pixels [B, 24, 24, 3] -> unit vectors [B, 16]; spatially sensitive (no pooling)."""
    keras.utils.set_random_seed(11)
    inputs = keras.Input(PARITY_SHAPE)
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(6, 3, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16)(x)
    return keras.Model(inputs, keras.layers.UnitNormalization()(x))


def non_square_photos(tmp_path) -> list[str]:
    """A wide PNG (40x17) and a tall JPEG (15x37): smooth colour ramps with a few blobs."""
    rng = np.random.default_rng(5)
    paths = []
    for (h, w), fmt in (((17, 40), "png"), ((37, 15), "jpg")):
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
        image += rng.normal(0, 20, size=image.shape)
        image = np.clip(image, 0, 255).astype(np.uint8)
        data = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image, quality=95)
        path = str(tmp_path / f"photo.{fmt}")
        tf.io.write_file(path, data)
        paths.append(path)
    return paths


@pytest.mark.parametrize("resize, pad_value", [("pad", 255), ("pad", 0), ("stretch", 255)])
def test_non_square_photo_embeds_the_same_through_training_decode_and_every_signature(tmp_path, resize, pad_value):
    """Train/serve skew: the training decode and each exported signature agree (cosine >= 0.9999)."""
    from atl_keras.data.images import decode_images
    from atl_keras.preprocessing import Preprocessing

    model = parity_model()
    paths = non_square_photos(tmp_path)
    pixels, kept = decode_images(paths, PARITY_SHAPE[:2], resize=resize, pad_value=pad_value)
    assert kept.all()
    trained = model.predict(pixels.astype(np.float32), verbose=0)  # what training/evaluation embed
    others = np.random.default_rng(0).integers(0, 256, size=(30, *PARITY_SHAPE)).astype(np.float32)
    gallery = np.concatenate([pixels.astype(np.float32), others])
    prep = Preprocessing(PARITY_SHAPE[:2], channels=3, resize=resize, pad_value=pad_value)
    result = export_model(
        model, gallery, [f"g{i}" for i in range(len(gallery))], str(tmp_path / "parity"),
        min_recall=0.0, preprocessing=prep, portable_export_base=str(tmp_path / "parity-portable"),
    )
    assert result.manifest["preprocessing"]["resize"] == resize
    assert result.manifest["preprocessing"]["pad_value"] == pad_value
    encoded = tf.constant([open(p, "rb").read() for p in paths])
    for path in (result.path, result.portable_path):
        loaded = load_export(path)
        served = loaded.signatures["serving_default"](images=encoded)["embeddings"].numpy()
        assert np.min(np.sum(served * trained, axis=1)) >= 0.9999
        from_pixels = loaded.signatures["embed_pixels"](pixels=tf.constant(pixels, tf.float32))["embeddings"].numpy()
        assert np.min(np.sum(from_pixels * trained, axis=1)) >= 0.9999
        names = ["retrieve_exact"] + (["retrieve"] if "retrieve" in loaded.signatures else [])
        for name in names:
            out = loaded.signatures[name](images=encoded, k=tf.constant(1))
            assert out["indices"].numpy()[:, 0].tolist() == [0, 1], name  # its own gallery copy
            assert np.min(out["scores"].numpy()[:, 0]) >= 0.9999, name


# --------------------------------------------------------------------- the honest gate
def tight_clusters(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors in a few tight clusters: trained embeddings have thousands of near-ties."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, size=n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def large_tight_gallery():
    """12k items (above ScaNN's brute-force threshold), D = 8 like `tiny_model`'s output."""
    return tight_clusters(12_000, 8, clusters=30, spread=0.02, seed=3)


def test_gate_uses_set_recall_and_refuses_a_bad_index_with_nothing_written(tmp_path, large_tight_gallery):
    from atl_keras.export import IndexOptions, export_embeddings

    gallery = large_tight_gallery
    ids = [f"item-{i}" for i in range(len(gallery))]
    base = str(tmp_path / "gate")
    crude = IndexOptions(leaves_to_search=1, quantize=True, reorder=10, num_queries=300)
    # min_recall 0.9, not 0.95: the crude index's tie-aware recall reads 0.96 here but read
    # 0.94 once on another machine (ScaNN's partitioning is not bit-identical across hosts).
    with pytest.raises(ExportError, match=r"set recall@10 .*tie-aware") as info:
        export_embeddings(tiny_model(), gallery, ids, base, index_options=crude, min_recall=0.9)
    set_recall = float(str(info.value).split("exact search is ")[1].split(" ")[0])
    tie_aware = float(str(info.value).split("tie-aware ")[1].split(")")[0])
    assert tie_aware >= 0.9 > 0.5 > set_recall  # the old (tie-aware) gate would have accepted it
    assert existing_versions(base) == [] and os.listdir(base) == []


def test_export_tunes_the_index_to_the_recall_target_and_records_it(tmp_path, large_tight_gallery):
    from atl_keras.export import IndexOptions, export_embeddings
    from atl_keras.index import ScannConfig

    gallery = large_tight_gallery
    ids = [f"item-{i}" for i in range(len(gallery))]
    result = export_embeddings(
        tiny_model(), gallery, ids, str(tmp_path / "tuned"), index_options=IndexOptions(num_queries=300)
    )
    manifest = load_manifest(result.path)
    assert manifest["recall"]["set_recall"] >= 0.95
    assert manifest["recall"]["queries"]["count"] == 300
    config = ScannConfig.from_dict(manifest["scann_config"])
    assert not config.brute_force and config.num_leaves_to_search < config.num_leaves
    tuning = manifest["index_tuning"]
    assert tuning["chosen"]["leaves_to_search"] == config.num_leaves_to_search
    assert {c["scoring"] for c in tuning["candidates"]} == {"exact", "ah"}
    # independent check of the recorded recall: the exported index itself against numpy brute force
    from atl_keras.index import scann_ops

    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(gallery), size=300, replace=False))
    searcher = scann_ops.searcher_from_module(tf.saved_model.load(result.path).searcher_state)
    found, _ = searcher.search_batched(gallery[rows], final_num_neighbors=11, **config.search_kwargs)
    hits = 0
    for row, result_row in zip(rows, np.asarray(found)):
        scores = gallery @ gallery[row]
        scores[row] = -np.inf
        truth = set(np.argsort(-scores, kind="stable")[:10].tolist())
        hits += len(truth & set([i for i in result_row.tolist() if i != row][:10]))
    # the recorded recall is the exported index's (the truth here is a different float32 sum
    # order than the gate's, which flips a near-tie or two)
    assert hits / 3000 == pytest.approx(manifest["recall"]["set_recall"], abs=0.002)


# ------------------------------------------------------------------- version reservation
def test_a_version_being_written_is_not_picked_again(tmp_path):
    """Two exports into one base: the second gets the next number (before: both took 1)."""
    from atl_keras.export import reserve_version

    base = str(tmp_path / "concurrent")
    with reserve_version(base) as held:  # a live export holding version 1
        assert held == 1
        second = export_model(tiny_model(), images(20), list(range(20)), base)
    assert second.version == 2
    assert sorted(os.listdir(base)) == ["2"]


def test_explicit_version_held_by_another_export_fails_before_the_work(tmp_path, monkeypatch):
    from atl_keras import export as ex

    calls = []
    monkeypatch.setattr(ex, "_embed", lambda *a, **k: calls.append(1) or np.zeros((1, 8), np.float32))
    base = str(tmp_path / "held")
    with ex.reserve_version(base, 1):
        with pytest.raises(ExportError, match="Another export is writing version 1"):
            ex.export_model(tiny_model(), images(20), list(range(20)), base, version=1)
    assert calls == []  # refused before embedding anything
    assert os.listdir(base) == []


CONCURRENT_EXPORT = """
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
sys.path.insert(0, {tests!r})
from test_export import tiny_model, images
from atl_keras import export as ex
base, me, other = sys.argv[1], sys.argv[2], sys.argv[3]
original = ex._embed
def slow_embed(*args, **kwargs):
    time.sleep(2.0)  # the work: long enough for both exports to overlap
    return original(*args, **kwargs)
ex._embed = slow_embed
model, gallery = tiny_model(), images(30)
open(me, "w").close()
deadline = time.time() + 120
while not os.path.exists(other) and time.time() < deadline:
    time.sleep(0.01)
print("VERSION", ex.export_model(model, gallery, list(range(30)), base).version, flush=True)
"""


def test_two_exports_started_together_get_distinct_versions(tmp_path):
    base = str(tmp_path / "together")
    script = CONCURRENT_EXPORT.format(tests=os.path.dirname(__file__))
    ready = [str(tmp_path / "a.ready"), str(tmp_path / "b.ready")]
    procs = [
        subprocess.Popen([sys.executable, "-c", script, base, ready[i], ready[1 - i]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outputs]
    versions = sorted(int(out.split("VERSION")[1]) for out, _ in outputs)
    assert versions == [1, 2]
    assert existing_versions(base) == [1, 2]


# ------------------------------------------------------------------ main + portable pair
def test_pair_is_published_together_with_the_same_version(tmp_path):
    base, portable = str(tmp_path / "shop"), str(tmp_path / "shop-portable")
    export_model(tiny_model(), images(20), list(range(20)), portable)  # the portable base is ahead
    result = export_model(tiny_model(), images(20), list(range(20)), base, portable_export_base=portable)
    assert result.version == 2 and result.portable_path == os.path.join(portable, "2")
    assert load_manifest(result.portable_path)["signatures"] == list(
        ("serving_default", "embed_pixels", "retrieve_exact")
    )
    assert existing_versions(base) == [2] and existing_versions(portable) == [1, 2]
    assert [n for n in os.listdir(base) + os.listdir(portable) if n.startswith(".")] == []


KILLED_PAIR = """
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
sys.path.insert(0, {tests!r})
from test_export import tiny_model, images
from atl_keras import export as ex
original = ex._publish
def publish_then_hang(*args, **kwargs):
    original(*args, **kwargs)
    print("PUBLISHED", args[1], flush=True)
    time.sleep(120)  # killed here: the main version is in place, its portable twin is not
ex._publish = publish_then_hang
ex.export_model(tiny_model(), images(30), list(range(30)), sys.argv[1], portable_export_base=sys.argv[2])
"""


def test_pair_half_published_by_a_killed_export_is_repaired_by_the_next(tmp_path):
    base, portable = str(tmp_path / "shop"), str(tmp_path / "shop-portable")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PAIR.format(tests=os.path.dirname(__file__)), base, portable],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = ""
        deadline = time.time() + 180
        while time.time() < deadline and "PUBLISHED" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "PUBLISHED" in line, "the export never reached the publish"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert existing_versions(base) == [1] and existing_versions(portable) == []
    result = export_model(tiny_model(), images(20), list(range(20)), base, portable_export_base=portable)
    assert existing_versions(portable) == [1, 2] and existing_versions(base) == [1, 2]
    assert load_manifest(os.path.join(portable, "1"))["gallery_size"] == 30  # the killed export's twin
    assert "retrieve_exact" in load_export(os.path.join(portable, "1")).signatures
    assert result.version == 2
    assert [n for n in os.listdir(base) + os.listdir(portable) if n.startswith(".pair-")] == []


def test_adaptive_leaf_search_is_exported_and_served_as_measured(tmp_path):
    """An index with adaptive leaf search (spill threshold) keeps it in the SavedModel: `retrieve`
    returns what the ScaNN state searched with the manifest's config returns, and the recorded
    recall is that of the exported index."""
    from scann.proto import scann_pb2

    from atl_keras.index import scann_ops

    model = tiny_model()
    gallery = images(3000, seed=6)
    adaptive = ScannConfig(num_leaves=40, num_leaves_to_search=8, training_sample_size=3000,
                           scoring="exact", spherical=True, spill_threshold=0.05)
    result = export_model(model, gallery, [f"i{i}" for i in range(3000)], str(tmp_path / "a"),
                          scann_config=adaptive, min_recall=0.0)
    manifest = load_manifest(result.path)
    config = ScannConfig.from_dict(manifest["scann_config"])
    assert config == adaptive and config.search_kwargs["leaves_to_search"] == -1
    loaded = tf.saved_model.load(result.path)
    state = scann_pb2.ScannConfig.FromString(loaded.searcher_state.scann_config.numpy()[0])
    spilling = state.partitioning.query_spilling
    assert spilling.spilling_type == spilling.ADDITIVE and spilling.max_spill_centers == 8
    assert spilling.spilling_threshold == pytest.approx(0.05)
    queries = images(20, seed=7)
    served = loaded.signatures["retrieve"](images=tf.constant(png_bytes(queries)), k=tf.constant(10))
    searcher = scann_ops.searcher_from_module(loaded.searcher_state)
    embeddings = model.predict(queries, verbose=0)
    direct, _ = searcher.search_batched(embeddings, final_num_neighbors=10, **config.search_kwargs)
    np.testing.assert_array_equal(served["indices"].numpy(), np.asarray(direct))
    # adaptive search sits between one leaf and all 8 on the exported tree
    truth = np.argsort(-(embeddings @ model.predict(gallery, verbose=0).T), axis=1, kind="stable")[:, :10]
    hits = [np.mean([len(set(a) & set(t)) for a, t in zip(np.asarray(found), truth)]) for found in (
        searcher.search_batched(embeddings, final_num_neighbors=10, leaves_to_search=1)[0], direct,
        searcher.search_batched(embeddings, final_num_neighbors=10, leaves_to_search=8)[0])]
    assert hits[0] <= hits[1] <= hits[2]

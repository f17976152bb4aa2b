"""The training recipe: determinism, mixed precision, resumable runs, observability exports."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from atl_keras.data.sampler import pk_dataset
from atl_keras.losses import AdaptiveTripletLoss
from atl_keras.metrics import retrieval_metrics
from atl_keras.model import ATLModel
from atl_keras.projector import TENSOR_NAME, make_sprite, write_projector
from atl_keras.train import TrainConfig, run_training
from tests.conftest import REPO_ROOT


def _tiny(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        dataset="synthetic-shop", synthetic_items=40, image_size=16, text_encoder="hashing",
        text_cache_dir=str(tmp_path / "cache"), p=4, k=2, epochs=2, steps_per_epoch=4,
        ks=(1, 5), embedding_dim=8, output_dir=str(tmp_path / "run"), projector_size=30,
    )
    values.update(overrides)
    return TrainConfig(**values)


# ------------------------------------------------------------------------------ config
def test_config_validation():
    with pytest.raises(ValueError, match="Unknown strategy 'gpus'"):
        TrainConfig(strategy="gpus")
    with pytest.raises(ValueError, match="save_freq must be 'epoch' or a number of steps"):
        TrainConfig(save_freq=0)
    with pytest.raises(ValueError, match="logical_cpus must be >= 0"):
        TrainConfig(logical_cpus=-1)
    assert TrainConfig(save_freq="5").save_freq == 5
    # Every field is type- and range-checked (YAML / config.json give any type).
    for bad, message in [
        (dict(epochs="five"), "epochs must be an integer, got 'five'"),
        (dict(epochs=2.5), "epochs must be an integer, got 2.5"),
        (dict(p=[1, 2]), "p must be an integer (or null), got [1, 2]"),
        (dict(image_size=0), "image_size must be >= 8, got 0"),
        (dict(ks=[1, 0]), "ks must be a non-empty list of integers >= 1"),
        (dict(ks=5), "ks must be a list of integers, got 5"),
        (dict(augment="yes"), "augment must be true or false"),
        (dict(learning_rate=float("nan")), "learning_rate must be a finite number"),
        (dict(min_margin=0.5, max_margin=0.1), "max_margin (0.1) must be >= min_margin (0.5)"),
        (dict(mining="hardest"), "Unknown mining 'hardest'"),
        (dict(backbone="vgg99"), "Unknown backbone 'vgg99'"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(output_dir=" "), "output_dir must not be empty"),
    ]:
        with pytest.raises(ValueError) as error:
            TrainConfig(**bad)
        assert message in str(error.value), (bad, str(error.value))
    assert TrainConfig(ks=[1, 5], unseen_classes=["tops"], p=np.int64(4)).ks == (1, 5)
    config = TrainConfig()
    assert (config.strategy, config.cross_replica_mining, config.mixed_precision,
            config.deterministic, config.save_freq) == ("auto", True, False, True, "epoch")


# ---------------------------------------------------------------------------- projector
def test_write_projector_files_are_consistent(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(7, 5)).astype(np.float32)
    images = rng.integers(0, 256, size=(7, 6, 4, 3)).astype(np.uint8)
    rows = [(f"item_{i}", f"red\tdress\nno {i}") for i in range(7)]
    paths = write_projector(str(tmp_path), embeddings, rows, images)

    reader = tf.train.load_checkpoint(str(tmp_path))
    np.testing.assert_array_equal(reader.get_tensor(TENSOR_NAME), embeddings)
    with open(paths["metadata"], encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "item_id\tdescription"
    assert lines[1:] == [f"item_{i}\tred dress no {i}" for i in range(7)]
    sprite = tf.io.decode_png(tf.io.read_file(paths["sprite"])).numpy()
    assert sprite.shape == (3 * 6, 3 * 4, 3)  # ceil(sqrt(7)) = 3 cells per side
    np.testing.assert_array_equal(sprite[6:12, 4:8], images[4])  # row-major: image 4 at (1, 1)
    assert np.all(sprite[12:, 4:] == 255)  # unused cells
    config = open(paths["config"], encoding="utf-8").read()
    assert f'tensor_name: "{TENSOR_NAME}"' in config and 'metadata_path: "metadata.tsv"' in config
    assert "single_image_dim: 4\n    single_image_dim: 6" in config  # width, height

    with pytest.raises(ValueError, match="metadata has 2 rows but there are 7"):
        write_projector(str(tmp_path), embeddings, rows[:2])
    assert make_sprite(np.zeros((1, 2, 2, 1))).shape == (2, 2, 1)


def test_large_images_become_small_sprite_cells(tmp_path):
    """224-px images: 64-px cells (area-shrunk, aspect kept), one image at a time, and the
    config's single_image_dim says the cell size TensorBoard must cut."""
    from atl_keras.projector import SPRITE_THUMBNAIL

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 224, 112, 3)).astype(np.uint8)
    images[2] = 40  # a flat image stays flat after shrinking
    sprite = make_sprite(images)
    assert SPRITE_THUMBNAIL == 64 and sprite.shape == (3 * 64, 3 * 32, 3)
    assert np.all(sprite[0:64, 64:96] == 40)  # image 2 at (0, 2)
    expected = tf.image.resize(images[4].astype(np.float32), (64, 32), method="area", antialias=True).numpy()
    np.testing.assert_array_equal(sprite[64:128, 32:64], np.clip(np.rint(expected), 0, 255).astype(np.uint8))
    paths = write_projector(str(tmp_path), rng.normal(size=(5, 3)), [(str(i), "") for i in range(5)], images)
    assert "single_image_dim: 32\n    single_image_dim: 64" in open(paths["config"], encoding="utf-8").read()
    assert make_sprite(images, thumbnail=None).shape == (3 * 224, 3 * 112, 3)


# ------------------------------------------------------------------ determinism + outputs
def test_same_seed_gives_identical_metrics_and_loadable_outputs(tmp_path):
    first = run_training(_tiny(tmp_path, output_dir=str(tmp_path / "a")), verbose=0)
    second = run_training(_tiny(tmp_path, output_dir=str(tmp_path / "b")), verbose=0)
    assert first.test_metrics == second.test_metrics
    assert first.history["loss"] == second.history["loss"]
    from tensorflow.python.framework import config as tf_config

    assert not tf_config.is_op_determinism_enabled()  # restored after each run
    # Observability: triplet statistics tracked as metrics; outputs load.
    assert {"loss", "fraction_active", "mean_active_margin", "val_recall_at_1"} <= set(first.history)
    assert all(0.0 <= v <= 1.0 for v in first.history["fraction_active"])
    out = first.output_dir
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["initial_epoch"] == 0 and metrics["epochs_run"] == [0, 1]
    assert isinstance(keras.models.load_model(os.path.join(out, "model.keras")), ATLModel)
    projector = os.path.join(out, "logs", "projector")
    reader = tf.train.load_checkpoint(projector)
    n = reader.get_tensor(TENSOR_NAME).shape[0]
    assert n == min(30, len(first.data.test.index_images))
    assert len(open(os.path.join(projector, "metadata.tsv")).read().splitlines()) == n + 1
    assert not os.path.exists(os.path.join(out, "backup"))  # deleted after a finished run


# ----------------------------------------------------------------------- mixed precision
def test_mixed_precision_still_converges():
    previous = keras.config.dtype_policy().name
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 12)
    images = rng.uniform(0, 60, size=(len(labels), 12, 12, 1)).astype(np.float32)
    for i, label in enumerate(labels):  # class = a bright 3x6 bar at one of 8 places
        r, c = divmod(int(label), 2)
        images[i, 3 * r : 3 * r + 3, 6 * c : 6 * c + 6] += 180
    text = np.eye(8, 4, dtype=np.float32)[labels % 4]
    try:
        keras.config.set_dtype_policy("mixed_bfloat16")
        model = ATLModel("small_cnn", (12, 12, 1), 16)
        model.compile(keras.optimizers.Adam(3e-3), loss=AdaptiveTripletLoss(0.1, 0.4, mining="batch_hard"))
        assert model.projection.compute_dtype == "bfloat16"
        history = model.fit(pk_dataset(images, labels, text, p=4, k=4, seed=0),
                            steps_per_epoch=25, epochs=2, verbose=0)
        embeddings = model.embed(images)
    finally:
        keras.config.set_dtype_policy(previous)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    after = retrieval_metrics(embeddings, labels, ks=(1,))["recall_at_1"]
    assert after > 0.9  # chance: 11 of the 95 other images match, ~0.12
    assert keras.config.dtype_policy().name == previous


# --------------------------------------------------------------------- resumable (SIGKILL)
def _train_command(tmp_path) -> list[str]:
    return [
        sys.executable, "-m", "atl_keras.cli", "train", "--dataset", "synthetic-shop",
        "--synthetic-items", "80", "--image-size", "16", "--text-encoder", "hashing",
        "--text-cache-dir", str(tmp_path / "cache"), "--p", "4", "--k", "2",
        "--epochs", "3", "--steps-per-epoch", "40", "--save-freq", "4",
        "--embedding-dim", "8", "--output", str(tmp_path / "run"), "--projector-size", "20",
        "--mixed-precision", "--quiet",
    ]


def test_killed_run_resumes_from_backup(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    metadata = tmp_path / "run" / "backup" / "training_metadata.json"
    proc = subprocess.Popen(_train_command(tmp_path), cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                state = json.loads(metadata.read_text())
            except (OSError, ValueError):
                state = None
            if state and state["epoch"] >= 1 and state["batch"] > 0:  # inside epoch >= 1
                killed_at = state
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert killed_at is not None, f"no mid-epoch backup appeared:\n{proc.stderr.read()[-3000:]}"
    assert not (tmp_path / "run" / "model.keras").exists()

    rerun = subprocess.run(_train_command(tmp_path), cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed"] and metrics["initial_epoch"] >= 1  # did not start from epoch 0
    assert metrics["epochs_run"] == list(range(metrics["initial_epoch"], 3))
    assert metrics["dtype_policy"] == "mixed_bfloat16"
    with open(out / "training_log.csv", newline="") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs[-1] == 2 and sorted(set(epochs)) == [0, 1, 2]
    # Every file in the output directory loads.
    assert isinstance(keras.models.load_model(str(out / "model.keras")), ATLModel)
    for name in ("metrics.json", "config.json"):
        json.loads((out / name).read_text())
    assert tf.train.load_checkpoint(str(out / "logs" / "projector")).get_tensor(TENSOR_NAME).shape[0] == 20
    assert not (out / "backup").exists()
    leftovers = [p for p in os.listdir(out) if p.endswith((".tmp", ".keras")) and p != "model.keras"]
    assert leftovers == []


# ------------------------------------------------------------------------------ a user's small catalog
def _tensorboard_tags(log_dir) -> dict[str, list[int]]:
    """tag -> steps of the scalars in a TensorBoard event directory."""
    tags: dict[str, list[int]] = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(int(event.step))
    return tags


def test_small_catalog_piped_trains_with_validation_at_the_ks_that_fit(tmp_path):
    """`atl train --dataset catalog:shop.csv | cat` on 40 products with the default ks
    1,10,20: validation is scored at the ks that fit (not dropped), the log has plain
    per-epoch lines (no ANSI progress bar), and TensorBoard has per-step scalars and no
    query counts."""
    from tests.test_distribute import write_image_catalog

    catalog = write_image_catalog(str(tmp_path / "shop"), items=40, per_item=6)  # 3 street + 3 catalog photos
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "atl_keras.cli", "train", "--dataset", f"catalog:{catalog}", "--image-size", "16",
         "--text-encoder", "hashing", "--text-cache-dir", str(tmp_path / "cache"), "--epochs", "2",
         "--steps-per-epoch", "10", "--embedding-dim", "8", "--projector-size", "0", "--output", str(run)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "validating at ks 1,10 only" in result.stderr, result.stderr
    assert "\x1b[" not in result.stdout and "\b" not in result.stdout and "\r" not in result.stdout
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("10/10 - ")]
    assert len(epoch_lines) == 2 and all("val_recall_at_10:" in line for line in epoch_lines), result.stdout
    with open(run / "training_log.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        for key in ("val_recall_at_1", "val_recall_at_10", "val_map_at_r"):
            assert np.isfinite(float(row[key])), (key, row)
        assert not [k for k in row if "num_queries" in k or "recall_at_20" in k]
    tags = _tensorboard_tags(run / "logs" / "train")
    assert sorted(set(tags["batch_loss"])) == [10, 20]  # every 10 steps, counted across epochs
    validation = _tensorboard_tags(run / "logs" / "validation")  # Keras files val_* metrics here
    assert validation["epoch_recall_at_10"] == [0, 1]
    assert not [tag for tag in [*tags, *validation] if "num_queries" in tag]

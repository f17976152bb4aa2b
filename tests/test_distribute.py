"""tf.distribute: cross-replica mining equals one-device training, replica slicing, multi-worker.

Multi-replica checks run in subprocesses: logical CPU devices (`logical_cpu_devices(2)`) and
MultiWorkerMirroredStrategy must be configured before TensorFlow initialises.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from atl_keras.distribute import (
    check_pk_divisible,
    distribute_batches,
    gather_replicas,
    get_strategy,
    mixed_precision_policy,
    worker_info,
)
from tests.conftest import REPO_ROOT

PYTHON = sys.executable
TIMEOUT = 300


def _run_script(code: str, timeout: int = TIMEOUT, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter from the repo root; returns the JSON after 'RESULT '."""
    proc = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------- in-process units
def test_check_pk_divisible():
    assert check_pk_divisible(8, 4, 2) == 16
    assert check_pk_divisible(8, 4, 1) == 32
    with pytest.raises(ValueError, match=r"p=6 labels.*4 replicas.*divisible by 4.*p=4 or p=8"):
        check_pk_divisible(6, 4, 4)
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        check_pk_divisible(4, 4, 0)


def test_gather_is_identity_without_replicas():
    x = {"a": tf.constant([1.0, 2.0]), "b": tf.constant([3], tf.int64)}
    out = gather_replicas(x)
    assert out is x
    strategy = get_strategy("one_device")
    result = strategy.run(lambda v: gather_replicas(v), args=(tf.constant([1.0, 2.0]),))
    np.testing.assert_array_equal(np.asarray(result), [1.0, 2.0])


def test_single_replica_helpers():
    strategy = get_strategy("one_device")
    ds = tf.data.Dataset.from_tensors(tf.zeros([4, 2]))
    assert distribute_batches(strategy, ds) is ds
    assert worker_info(strategy) == ("worker", 0, True)
    assert mixed_precision_policy(strategy) == "mixed_bfloat16"  # CPU: bfloat16, no loss scaling
    with pytest.raises(ValueError, match="Unknown strategy 'gpu'"):
        get_strategy("gpu")


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        get_strategy("multi_worker")


# ------------------------------------------------- 2 replicas vs one device (subprocess)
EQUIVALENCE = r"""
import json
from atl_keras.distribute import logical_cpu_devices
logical_cpu_devices(2)
import keras, numpy as np, tensorflow as tf
from atl_keras.data.sampler import pk_dataset
from atl_keras.distribute import distribute_batches, get_strategy
from atl_keras.losses import AdaptiveTripletLoss
from atl_keras.model import ATLModel

SHAPE = (8, 8, 1)
rng = np.random.default_rng(0)
labels = np.repeat(np.arange(12), 4).astype(np.int64)
images = rng.uniform(0, 255, size=(len(labels), *SHAPE)).astype(np.float32)
text = rng.normal(size=(12, 8)).astype(np.float32)[labels]

def build(strategy, mining, cross, frozen=False):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = ATLModel("small_cnn", SHAPE, 8, cross_replica_mining=cross)
        model.backbone.trainable = not frozen  # frozen: BatchNormalization in inference mode
        model.compile(keras.optimizers.SGD(0.5), loss=AdaptiveTripletLoss(0.1, 0.8, mining=mining))
    return model

def batches(strategy):
    return distribute_batches(strategy, pk_dataset(images, labels, text, p=4, k=4, seed=3))

def gradients(strategy, model):
    x, y = next(iter(batches(strategy)))
    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            # training=False: BatchNormalization uses moving statistics, so rows are embedded
            # independently and only the loss (mining) couples them across replicas.
            loss = model.compute_loss(y=y, y_pred=model(x, training=False))
        return loss, tape.gradient(loss, model.trainable_variables)
    loss, grads = strategy.run(step, args=(x, y))
    loss = strategy.reduce("SUM", loss, axis=None)                 # each replica holds L / R
    grads = [strategy.reduce("SUM", g, axis=None) for g in grads]  # what Keras applies
    return float(loss), [np.asarray(g) for g in grads]

def rel(a, b):
    return max(float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12)) for x, y in zip(a, b))

one, two = get_strategy("one_device"), get_strategy("mirrored")
out = {"replicas": two.num_replicas_in_sync}

# Replica r receives rows [r * B/R, (r + 1) * B/R) of each global batch.
x_global, y_global = next(iter(pk_dataset(images, labels, text, p=4, k=4, seed=3)))
x_two, y_two = next(iter(batches(two)))
parts = two.experimental_local_results(y_two["label"])
out["slices_ok"] = bool(np.array_equal(np.concatenate([np.asarray(p) for p in parts]), y_global["label"].numpy())
                        and all(len(p) == 8 for p in parts))

for mining, try_off in (("batch_hard", False), ("semi_hard", True)):
    ref = build(one, mining, True)
    init = ref.get_weights()
    res = {}
    res["loss_one"], g_one = gradients(one, ref)
    for cross in (True, False) if try_off else (True,):
        m = build(two, mining, cross)
        m.set_weights(init)
        res[f"loss_two_{cross}"], g_two = gradients(two, m)
        res[f"grad_rel_{cross}"] = rel(g_one, g_two)
    out[mining] = res

weights = {}
for name, strategy in (("one", one), ("two", two)):
    m = build(strategy, "semi_hard", True, frozen=True)
    m.set_weights(init)
    h = m.fit(batches(strategy), steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
    weights[name] = m.get_weights()
    out[f"fit_loss_{name}"] = h.history["loss"][0]
out["fit_weight_rel"] = rel(weights["one"], weights["two"])
out["fit_weight_moved"] = max(float(np.max(np.abs(a - b))) for a, b in zip(init, weights["one"]))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def equivalence() -> dict:
    return _run_script(EQUIVALENCE)


def test_replica_slices_are_contiguous(equivalence):
    assert equivalence["replicas"] == 2
    assert equivalence["slices_ok"]


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_cross_replica_mining_matches_one_device(equivalence, mining):
    res = equivalence[mining]
    assert res["loss_two_True"] == pytest.approx(res["loss_one"], rel=1e-5)
    assert res["grad_rel_True"] < 1e-5  # max over variables of ||g2 - g1|| / ||g1||


def test_without_cross_replica_mining_results_differ(equivalence):
    res = equivalence["semi_hard"]
    assert abs(res["loss_two_False"] - res["loss_one"]) > 1e-3 * res["loss_one"]
    assert res["grad_rel_False"] > 1e-2


def test_fit_on_two_replicas_gives_one_device_weights(equivalence):
    assert equivalence["fit_weight_moved"] > 1e-4  # the steps did change the weights
    assert equivalence["fit_weight_rel"] < 1e-4
    assert equivalence["fit_loss_two"] == pytest.approx(equivalence["fit_loss_one"], rel=1e-5)


# ------------------------------------------------------------ multi-worker (2 processes)
WORKER = r"""
import json, sys
from atl_keras.train import TrainConfig, run_training
config = json.loads(sys.argv[1])
result = run_training(TrainConfig(**{**config, "ks": tuple(config["ks"])}), verbose=0)
print("RESULT " + json.dumps({"output_dir": result.output_dir, "replicas": result.replicas,
                              "loss": result.history["loss"]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, config: dict, workers: int = 2) -> list[dict]:
    """Run `script` (argv[1] = JSON `config`) as a cluster of `workers` processes on 127.0.0.1;
    returns each worker's JSON after 'RESULT ', in task order."""
    ports = [_free_port() for _ in range(workers)]
    procs = []
    try:
        for index in range(workers):
            tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                         "task": {"type": "worker", "index": index}}
            procs.append(subprocess.Popen(
                [PYTHON, "-c", script, json.dumps(config)], cwd=REPO_ROOT,
                env={**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "3"},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for proc, (stdout, stderr) in zip(procs, outputs):
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"worker failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def test_multi_worker_training_keeps_workers_identical(tmp_path):
    import keras

    config = dict(
        dataset="synthetic-shop", synthetic_items=40, image_size=16, text_encoder="hashing",
        text_cache_dir=str(tmp_path / "cache"), p=4, k=2, epochs=1, steps_per_epoch=3,
        ks=[1, 5], embedding_dim=8, output_dir=str(tmp_path / "run"), projector_size=0,
        strategy="multi_worker",
    )
    results = run_workers(WORKER, config)
    assert [r["replicas"] for r in results] == [2, 2]
    chief, other = results
    assert chief["output_dir"] == config["output_dir"]  # the chief writes the shared outputs
    assert other["output_dir"] == os.path.join(config["output_dir"], "workers", "worker-1")
    assert chief["loss"] == pytest.approx(other["loss"], rel=1e-6)  # global loss on both
    models = [keras.models.load_model(os.path.join(r["output_dir"], "model.keras")) for r in results]
    # Trainable weights get the same all-reduced updates on every worker. (BatchNormalization's
    # moving statistics are per replica, as in Keras' MirroredStrategy: not compared.)
    assert len(models[0].trainable_weights) == len(models[1].trainable_weights) > 0
    for a, b in zip(models[0].trainable_weights, models[1].trainable_weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------ streamed files under tf.distribute
def write_image_catalog(folder, items: int = 24, per_item: int = 4, size: int = 20) -> str:
    """A CSV catalog of small PNG files (street + catalog rows per item); returns its path."""
    import csv

    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for item in range(items):
        colour = rng.integers(0, 256, 3)
        for view in range(per_item):
            pixels = np.clip(colour + rng.normal(0, 25, (size, size - 4, 3)), 0, 255).astype(np.uint8)
            name = f"{item:03d}_{view}.png"
            Image.fromarray(pixels).save(os.path.join(folder, name))
            rows.append({"image": name, "item_id": f"sku-{item}", "description": f"colour {item % 5}",
                         "domain": "catalog" if view % 2 else "street"})
    path = os.path.join(folder, "shop.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


STREAMED_MIRRORED = r"""
import json, sys
from atl_keras.distribute import logical_cpu_devices
logical_cpu_devices(2)
import numpy as np, tensorflow as tf
from atl_keras.data.catalog import read_catalog
from atl_keras.data.sampler import pk_dataset
from atl_keras.data.streaming import pk_stream_dataset
from atl_keras.distribute import distribute_batch_function, distribute_batches, get_strategy
from atl_keras.preprocessing import Preprocessing
from atl_keras.train import TrainConfig, run_training

train = read_catalog(sys.argv[1]).split("train")
prep = Preprocessing((16, 16))
images, kept = train.load_images(16)
strategy = get_strategy("mirrored")
memory = iter(distribute_batches(strategy, pk_dataset(images, train.labels, p=4, k=2, seed=5)))
streamed = iter(distribute_batch_function(
    strategy, lambda first, count: pk_stream_dataset(train.image_source(), train.labels, None, prep, p=4, k=2,
                                                     seed=5, batch_rows=(first, count)), 8))
same = []
for _ in range(3):
    (xm, ym), (xs, ys) = next(memory), next(streamed)
    for a, b, xa, xb in zip(strategy.experimental_local_results(ym["label"]),
                            strategy.experimental_local_results(ys["label"]),
                            strategy.experimental_local_results(xm), strategy.experimental_local_results(xs)):
        same.append(bool(np.array_equal(a, b) and np.array_equal(xa, xb) and len(a) == 4))
config = TrainConfig(dataset="catalog:" + sys.argv[1], image_size=16, text_encoder="hashing",
                     text_cache_dir=sys.argv[2] + "/cache", p=4, k=2, epochs=1, steps_per_epoch=3, ks=(1, 5),
                     embedding_dim=8, output_dir=sys.argv[2] + "/run", projector_size=0, strategy="mirrored")
result = run_training(config, verbose=0)
print("RESULT " + json.dumps({"kept": bool(kept.all()), "same": same, "replicas": result.replicas,
                              "streamed": result.data.train_images is None, "loss": result.history["loss"]}))
"""


@pytest.mark.slow
def test_mirrored_training_streams_files_with_the_in_memory_replica_layout(tmp_path):
    catalog = write_image_catalog(str(tmp_path / "shop"))
    proc = subprocess.run(
        [PYTHON, "-c", STREAMED_MIRRORED, catalog, str(tmp_path)], cwd=REPO_ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True, timeout=TIMEOUT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["kept"] and result["same"] == [True] * 6  # 3 steps x 2 replicas: same rows, same pixels
    assert result["replicas"] == 2 and result["streamed"]
    assert np.isfinite(result["loss"]).all()


STREAMED_WORKER = r"""
import json, sys
from atl_keras.distribute import get_strategy
strategy = get_strategy("multi_worker")
import numpy as np
from atl_keras.data.catalog import read_catalog
from atl_keras.data.streaming import pk_stream_dataset
from atl_keras.distribute import distribute_batch_function
from atl_keras.preprocessing import Preprocessing
from atl_keras.train import TrainConfig, run_training

config = json.loads(sys.argv[1])
train = read_catalog(config["dataset"].partition(":")[2]).split("train")
prep = Preprocessing((16, 16))
it = iter(distribute_batch_function(
    strategy, lambda first, count: pk_stream_dataset(train.image_source(), train.labels, None, prep, p=4, k=2,
                                                     seed=5, batch_rows=(first, count)), 8))
local = [[np.asarray(t).tolist() for t in strategy.experimental_local_results(next(it)[1]["label"])]
         for _ in range(2)]
result = run_training(TrainConfig(**{**config, "ks": tuple(config["ks"])}), verbose=0)
print("RESULT " + json.dumps({"local": local, "replicas": result.replicas, "loss": result.history["loss"],
                              "streamed": result.data.train_images is None}))
"""


@pytest.mark.slow
def test_multi_worker_training_streams_files_each_worker_its_rows(tmp_path):
    from atl_keras.data.catalog import read_catalog
    from atl_keras.data.sampler import pk_index_dataset

    catalog = write_image_catalog(str(tmp_path / "shop"))
    config = dict(
        dataset=f"catalog:{catalog}", image_size=16, text_encoder="hashing", text_cache_dir=str(tmp_path / "cache"),
        p=4, k=2, epochs=1, steps_per_epoch=3, ks=[1, 5], embedding_dim=8, output_dir=str(tmp_path / "run"),
        projector_size=0, strategy="multi_worker",
    )
    results = run_workers(STREAMED_WORKER, config)
    train = read_catalog(catalog).split("train")
    expected = [train.labels[b] for b in pk_index_dataset(train.labels, p=4, k=2, seed=5).take(2).as_numpy_iterator()]
    for step in range(2):  # worker w holds replica w's rows [4w, 4w + 4) of the global batch: whole labels
        assert results[0]["local"][step] == [expected[step][:4].tolist()]
        assert results[1]["local"][step] == [expected[step][4:].tolist()]
    assert [r["replicas"] for r in results] == [2, 2] and all(r["streamed"] for r in results)
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)

"""Proxy losses: float64 numpy loop references (values and gradients), PyTorch Metric
Learning's ProxyAnchor values (committed JSON), numerics, config round trips, and training
through `ATLModel` (fit, save/load, learning-rate multiplier, mixed precision, 2 replicas)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from atl_keras.data.sampler import pk_dataset
from atl_keras.model import ATLModel
from atl_keras.proxies import ProxyHead, strip_proxies
from atl_keras.losses import (
    AdaptiveProxyLoss,
    ProxyAnchorLoss,
    adaptive_proxy_loss,
    proxy_anchor_loss,
)
from atl_keras.margins import class_margin_matrix
from tests.conftest import REPO_ROOT

PML_REFERENCE = REPO_ROOT / "tests" / "data" / "proxy_anchor_pml.json"
SUBPROCESS_TIMEOUT = 900  # seconds; ~45 s on an idle 2-core machine, much more when it is shared


# ----------------------------------------------------------------- loop references (float64)
def _unit(v: np.ndarray) -> np.ndarray:
    n = math.sqrt(sum(x * x for x in v))
    return v / n if n > 0 else v


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum(x * y for x, y in zip(_unit(a), _unit(b))))


def reference_margin(g_y: np.ndarray, g_c: np.ndarray, lo: float, hi: float, distance: str,
                     missing: float | None) -> float:
    """ATL's mapping for one class pair, from the definition."""
    if not np.any(g_y) or not np.any(g_c):
        return (lo + hi) / 2 if missing is None else missing
    c = _cos(g_y, g_c)
    d = {"squared_l2": 2 - 2 * c, "l2": math.sqrt(max(2 - 2 * c, 0.0)), "cosine": 1 - c}[distance]
    d_max = {"squared_l2": 4.0, "l2": 2.0, "cosine": 2.0}[distance]
    return lo + (hi - lo) * max(d, 0.0) / d_max


def reference_adaptive(labels, f, p, margin_of, s) -> float:
    """mean_i -log(e^{s cos(f_i, p_y)} / (e^{s cos(f_i, p_y)} + sum_{c != y} e^{s (cos + m_yc)}))."""
    total = 0.0
    for i, y in enumerate(labels):
        positive = math.exp(s * _cos(f[i], p[y]))
        denominator = positive
        for c in range(len(p)):
            if c != y:
                denominator += math.exp(s * (_cos(f[i], p[c]) + margin_of(y, c)))
        total += -math.log(positive / denominator)
    return total / len(labels)


def reference_proxy_anchor(labels, f, p, delta, alpha) -> float:
    """ProxyAnchor (Kim et al. 2020) with PML's divisors, term by term."""
    pos_total, neg_total, with_positive = 0.0, 0.0, 0
    for c in range(len(p)):
        pos = [math.exp(-alpha * (_cos(f[i], p[c]) - delta)) for i in range(len(f)) if labels[i] == c]
        neg = [math.exp(alpha * (_cos(f[i], p[c]) + delta)) for i in range(len(f)) if labels[i] != c]
        if pos:
            with_positive += 1
            pos_total += math.log(1 + sum(pos))
        neg_total += math.log(1 + sum(neg))
    return pos_total / max(with_positive, 1) + neg_total / len(p)


def numeric_gradient(fn, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (fn(up) - fn(down)) / (2 * eps)
    return grad


def tf_value_and_grads(fn, f: np.ndarray, p: np.ndarray, dtype=tf.float64):
    fv, pv = tf.Variable(f.astype(dtype.as_numpy_dtype)), tf.Variable(p.astype(dtype.as_numpy_dtype))
    with tf.GradientTape() as tape:
        value = fn(fv, pv)
    gf, gp = tape.gradient(value, [fv, pv])
    return float(value), gf.numpy(), gp.numpy()


def _problem(seed: int, batch: int = 8, classes: int = 6, dim: int = 5, text_dim: int = 4):
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.permutation(classes)[: batch // 2], 2).astype(np.int64)
    f = rng.normal(size=(batch, dim))
    p = rng.normal(size=(classes, dim))
    g = rng.normal(size=(classes, text_dim)).astype(np.float32)
    return labels, f, p, g


# ------------------------------------------------------------------ adaptive proxy loss
@pytest.mark.parametrize("precompute", [True, False])
@pytest.mark.parametrize("distance", ["squared_l2", "l2", "cosine"])
def test_adaptive_proxy_matches_loop_reference_values_and_gradients(distance, precompute):
    labels, f, p, g = _problem(0)
    g[3] = 0.0  # class 3 has no description: its pairs get the midpoint margin
    loss = AdaptiveProxyLoss(class_text_embeddings=g, min_margin=0.1, max_margin=0.6, scale=8.0,
                             distance=distance, precompute_margins=precompute)

    def margin_of(y, c):
        return reference_margin(g[y].astype(np.float64), g[c].astype(np.float64), 0.1, 0.6, distance, None)

    def ours(fv, pv):
        return adaptive_proxy_loss(labels, fv, pv, loss.batch_margins(labels), scale=8.0)

    value, gf, gp = tf_value_and_grads(ours, f, p)
    expected = reference_adaptive(labels, f, p, margin_of, 8.0)
    assert value == pytest.approx(expected, abs=1e-5)
    np.testing.assert_allclose(gf, numeric_gradient(lambda x: reference_adaptive(labels, x, p, margin_of, 8.0), f), atol=1e-5)
    np.testing.assert_allclose(gp, numeric_gradient(lambda x: reference_adaptive(labels, f, x, margin_of, 8.0), p), atol=1e-5)


def test_adaptive_proxy_float32_loss_class_matches_reference():
    labels, f, p, g = _problem(1)
    loss = AdaptiveProxyLoss(class_text_embeddings=g, scale=16.0)
    y = {"label": tf.constant(labels), "text_embedding": tf.constant(g[labels])}
    value = float(loss(y, tf.constant(f, tf.float32), proxies=tf.constant(p, tf.float32)))

    def margin_of(yy, c):
        return reference_margin(g[yy].astype(np.float64), g[c].astype(np.float64), 0.05, 0.4, "squared_l2", None)

    assert value == pytest.approx(reference_adaptive(labels, f, p, margin_of, 16.0), abs=1e-5)


def test_margin_matrix_and_constant_margin_sources():
    labels, f, p, g = _problem(2)
    matrix = class_margin_matrix(g, 0.1, 0.5)
    for y in range(len(g)):
        for c in range(len(g)):
            if y != c:
                assert matrix[y, c] == pytest.approx(
                    reference_margin(g[y].astype(np.float64), g[c].astype(np.float64), 0.1, 0.5, "squared_l2", None), abs=1e-6)
    f32, p32 = tf.constant(f, tf.float32), tf.constant(p, tf.float32)
    by_text = AdaptiveProxyLoss(class_text_embeddings=g, min_margin=0.1, max_margin=0.5)(labels, f32, proxies=p32)
    by_matrix = AdaptiveProxyLoss(margin_matrix=matrix)(labels, f32, proxies=p32)
    assert float(by_text) == pytest.approx(float(by_matrix), abs=1e-5)
    # min == max margin is the constant-margin (plain additive-margin normalised softmax) loss
    flat = AdaptiveProxyLoss(class_text_embeddings=g, min_margin=0.3, max_margin=0.3)(labels, f32, proxies=p32)
    constant = AdaptiveProxyLoss(margin=0.3)(labels, f32, proxies=p32)
    assert float(flat) == pytest.approx(float(constant), abs=1e-6)
    expected = reference_adaptive(labels, f, p, lambda y, c: 0.3, 16.0)
    assert float(constant) == pytest.approx(expected, abs=1e-5)
    zero = AdaptiveProxyLoss(margin=0.0, scale=1.0)(labels, f32, proxies=p32)  # plain softmax CE
    logits = np.array([[_cos(fi, pc) for pc in p] for fi in f])
    ce = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(f)), labels])
    assert float(zero) == pytest.approx(ce, abs=1e-5)


def test_adaptive_proxy_sample_weight():
    labels, f, p, g = _problem(3)
    loss = AdaptiveProxyLoss(margin=0.2)
    weights = np.linspace(0.0, 2.0, len(labels))
    per_sample = [reference_adaptive(labels[i : i + 1], f[i : i + 1], p, lambda y, c: 0.2, 16.0) for i in range(len(f))]
    value = loss(labels, tf.constant(f, tf.float32), tf.constant(weights, tf.float32), proxies=tf.constant(p, tf.float32))
    assert float(value) == pytest.approx(float(np.sum(weights * per_sample) / len(f)), abs=1e-5)


# --------------------------------------------------------------------------- ProxyAnchor
@pytest.mark.parametrize("seed,classes,delta,alpha", [(0, 6, 0.1, 32.0), (1, 12, 0.3, 8.0)])
def test_proxy_anchor_matches_loop_reference_values_and_gradients(seed, classes, delta, alpha):
    labels, f, p, _ = _problem(seed, classes=classes)  # with 12 classes, 8 have no sample

    def ours(fv, pv):
        return proxy_anchor_loss(labels, fv, pv, margin=delta, alpha=alpha)

    value, gf, gp = tf_value_and_grads(ours, f, p)
    assert value == pytest.approx(reference_proxy_anchor(labels, f, p, delta, alpha), abs=1e-5)
    np.testing.assert_allclose(gf, numeric_gradient(lambda x: reference_proxy_anchor(labels, x, p, delta, alpha), f), atol=1e-5)
    np.testing.assert_allclose(gp, numeric_gradient(lambda x: reference_proxy_anchor(labels, f, x, delta, alpha), p), atol=1e-5)


def test_proxy_anchor_matches_pytorch_metric_learning():
    reference = json.loads(PML_REFERENCE.read_text())
    assert reference["pytorch_metric_learning"].startswith("2.9")
    for case in reference["cases"]:
        labels = np.asarray(case["labels"], np.int64)
        f = np.asarray(case["embeddings"], np.float32)
        p = np.asarray(case["proxies"], np.float32)
        loss = ProxyAnchorLoss(margin=case["margin"], alpha=case["alpha"], num_classes=len(p))
        fv, pv = tf.Variable(f), tf.Variable(p)
        with tf.GradientTape() as tape:
            value = loss({"label": tf.constant(labels)}, fv, proxies=pv)
        gf, gp = tape.gradient(value, [fv, pv])
        assert float(value) == pytest.approx(case["loss"], abs=1e-4), case["name"]
        np.testing.assert_allclose(gf.numpy(), case["grad_embeddings"], atol=1e-4, err_msg=case["name"])
        np.testing.assert_allclose(gp.numpy(), case["grad_proxies"], atol=1e-4, err_msg=case["name"])


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("make", [
    lambda g: AdaptiveProxyLoss(class_text_embeddings=g, precompute_margins=False),
    lambda g: AdaptiveProxyLoss(class_text_embeddings=np.zeros_like(g)),  # no descriptions at all
    lambda g: ProxyAnchorLoss(),
])
def test_finite_at_identical_embeddings_zero_rows_and_absent_classes(make):
    _, _, _, g = _problem(4, classes=50)
    labels = np.array([7, 7, 7, 7], np.int64)  # 49 of 50 classes absent
    same = np.tile(np.array([[1.0, 2.0, 3.0, 4.0, 5.0]], np.float32), (4, 1))
    cases = {
        "identical embeddings and proxies": (same, np.tile(same[:1], (50, 1))),
        "zero embedding rows and proxies": (np.zeros((4, 5), np.float32), np.zeros((50, 5), np.float32)),
        "embedding equals its proxy": (same, np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32)),
    }
    cases["embedding equals its proxy"][1][7] = same[0]
    for name, (f, p) in cases.items():
        fv, pv = tf.Variable(f), tf.Variable(p)
        with tf.GradientTape() as tape:
            value = make(g)(labels, fv, proxies=pv)
        grads = tape.gradient(value, [fv, pv])
        assert np.isfinite(float(value)), name
        assert all(np.all(np.isfinite(x.numpy())) for x in grads), name


def test_large_scale_does_not_overflow():
    labels, f, p, g = _problem(5)
    for loss in (AdaptiveProxyLoss(margin=0.5, scale=200.0), ProxyAnchorLoss(alpha=500.0)):
        fv = tf.Variable(f.astype(np.float32))
        with tf.GradientTape() as tape:
            value = loss(labels, fv, proxies=tf.constant(p, tf.float32))
        assert np.isfinite(float(value)) and np.all(np.isfinite(tape.gradient(value, fv).numpy()))


# -------------------------------------------------------------------------- configuration
def test_get_config_round_trips():
    _, f, p, g = _problem(6)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int64)
    losses = [
        AdaptiveProxyLoss(class_text_embeddings=g, min_margin=0.1, max_margin=0.7, scale=12.0,
                          distance="cosine", missing_text_margin=0.2),
        AdaptiveProxyLoss(margin_matrix=class_margin_matrix(g)),
        AdaptiveProxyLoss(margin=0.25, scale=30.0),
        ProxyAnchorLoss(margin=0.2, alpha=16.0, num_classes=6),
    ]
    for loss in losses:
        clone = keras.losses.deserialize(json.loads(json.dumps(keras.losses.serialize(loss))))
        assert type(clone) is type(loss)
        assert json.dumps(clone.get_config()) == json.dumps(loss.get_config())
        args = (labels, tf.constant(f, tf.float32))
        assert float(clone(*args, proxies=p)) == pytest.approx(float(loss(*args, proxies=p)), abs=1e-6)
    head = ProxyHead(6, 5, learning_rate_multiplier=25.0, name="h")
    assert ProxyHead.from_config(head.get_config()).get_config() == head.get_config()


def test_clear_errors():
    _, f, p, g = _problem(7)
    with pytest.raises(ValueError, match="exactly one margin source"):
        AdaptiveProxyLoss()
    with pytest.raises(ValueError, match="exactly one margin source"):
        AdaptiveProxyLoss(class_text_embeddings=g, margin=0.1)
    with pytest.raises(ValueError, match="square"):
        AdaptiveProxyLoss(margin_matrix=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="needs the class proxies.*num_proxies"):
        AdaptiveProxyLoss(margin=0.1)(np.zeros(2, np.int64), f[:2])
    with pytest.raises(ValueError, match="margins for 6 classes but got 4 proxies"):
        AdaptiveProxyLoss(class_text_embeddings=g)(np.zeros(2, np.int64), f[:2], proxies=p[:4])
    with pytest.raises(ValueError, match="sample_weight"):
        ProxyAnchorLoss()(np.zeros(2, np.int64), f[:2], np.ones(2), proxies=p)
    with pytest.raises(ValueError, match="learning_rate_multiplier"):
        ProxyHead(4, 3, learning_rate_multiplier=0.0)
    model = ATLModel("small_cnn", (8, 8, 1), 5)
    model.compile("adam", loss=ProxyAnchorLoss())
    with pytest.raises(ValueError, match="num_proxies"):
        model.compute_loss(y=np.zeros(2, np.int64), y_pred=tf.constant(f[:2], tf.float32))


# --------------------------------------------------------------------- training through ATLModel
def _pk_problem(classes: int = 10, per_class: int = 4, shape=(8, 8, 1)):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class).astype(np.int64)
    images = rng.uniform(0, 255, size=(len(labels), *shape)).astype(np.float32)
    text = rng.normal(size=(classes, 6)).astype(np.float32)
    return images, labels, text


@pytest.mark.parametrize("make_loss", [
    lambda text: AdaptiveProxyLoss(class_text_embeddings=text),
    lambda text: ProxyAnchorLoss(num_classes=len(text)),
])
def test_fit_save_load_and_strip(tmp_path, make_loss):
    images, labels, text = _pk_problem()
    model = ATLModel("small_cnn", (8, 8, 1), 6, num_proxies=len(text), proxy_learning_rate_multiplier=10.0)
    assert any(w is model.proxy_head.scaled_proxies for w in model.trainable_weights)
    model.compile(keras.optimizers.Adam(1e-3), loss=make_loss(text))
    history = model.fit(pk_dataset(images, labels, text[labels], p=4, k=2, seed=0), epochs=2,
                        steps_per_epoch=3, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.proxy_head.proxies, model.proxy_head.proxies, atol=0)
    np.testing.assert_allclose(loaded.embed(images[:5]), model.embed(images[:5]), atol=1e-6)
    assert type(loaded.loss) is type(model.loss)
    stripped = strip_proxies(model)
    assert stripped.proxy_head is None and stripped.num_proxies == 0
    assert len(stripped.weights) == len(model.weights) - 1
    np.testing.assert_allclose(stripped.embed(images[:5]), model.embed(images[:5]), atol=1e-6)


def test_learning_rate_multiplier_scales_the_proxy_step():
    """Adam's first step moves every coordinate by ~lr: the proxies by ~mu * lr."""
    images, labels, text = _pk_problem()
    moves = {}
    for mu in (1.0, 10.0):
        keras.utils.set_random_seed(0)
        model = ATLModel("small_cnn", (8, 8, 1), 6, num_proxies=len(text), proxy_learning_rate_multiplier=mu)
        model.compile(keras.optimizers.Adam(1e-3, epsilon=1e-12), loss=AdaptiveProxyLoss(class_text_embeddings=text))
        before = np.asarray(model.proxy_head.proxies)
        model.fit(pk_dataset(images, labels, text[labels], p=4, k=2, seed=0), epochs=1, steps_per_epoch=1, verbose=0)
        moved = np.abs(np.asarray(model.proxy_head.proxies) - before)
        moves[mu] = np.max(moved)
    assert moves[1.0] == pytest.approx(1e-3, rel=1e-3)
    assert moves[10.0] == pytest.approx(1e-2, rel=1e-3)


def test_mixed_precision_keeps_proxies_and_loss_float32():
    images, labels, text = _pk_problem()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = ATLModel("small_cnn", (8, 8, 1), 6, num_proxies=len(text))
        assert model.proxy_head.scaled_proxies.dtype == "float32"
        model.compile(keras.optimizers.Adam(1e-3), loss=AdaptiveProxyLoss(class_text_embeddings=text))
        history = model.fit(pk_dataset(images, labels, text[labels], p=4, k=2, seed=0), epochs=1,
                            steps_per_epoch=2, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        x, y = next(iter(pk_dataset(images, labels, text[labels], p=4, k=2, seed=0)))
        assert model.compute_loss(y=y, y_pred=model(x)).dtype == "float32"
    finally:
        keras.config.set_dtype_policy(previous)


MIRRORED = r"""
import json
from atl_keras.distribute import logical_cpu_devices
logical_cpu_devices(2)
import keras, numpy as np, tensorflow as tf
from atl_keras.data.sampler import pk_dataset
from atl_keras.distribute import distribute_batches, get_strategy
from atl_keras.model import ATLModel
from atl_keras.losses import AdaptiveProxyLoss, ProxyAnchorLoss

rng = np.random.default_rng(0)
labels = np.repeat(np.arange(8), 4).astype(np.int64)
images = rng.uniform(0, 255, size=(len(labels), 8, 8, 1)).astype(np.float32)
text = rng.normal(size=(8, 6)).astype(np.float32)
out = {}
for name, make in (("adaptive", lambda: AdaptiveProxyLoss(class_text_embeddings=text)),
                   ("anchor", lambda: ProxyAnchorLoss(num_classes=8))):
    grads = {}
    for strategy_name in ("one_device", "mirrored"):
        strategy = get_strategy(strategy_name)
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = ATLModel("small_cnn", (8, 8, 1), 6, num_proxies=8, proxy_learning_rate_multiplier=5.0)
            model.compile(keras.optimizers.Adam(1e-3), loss=make())
        if strategy_name == "mirrored":
            out["mirrored_proxies"] = type(model.proxy_head.scaled_proxies.value).__name__
        x, y = next(iter(distribute_batches(strategy, pk_dataset(images, labels, text[labels], p=4, k=2, seed=1))))
        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = model.compute_loss(y=y, y_pred=model(x, training=False))
            return loss, tape.gradient(loss, [model.proxy_head.scaled_proxies])[0]
        loss, g = strategy.run(step, args=(x, y))
        if strategy.num_replicas_in_sync > 1:
            loss, g = strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", g, axis=None)
        grads[strategy_name] = (float(loss), np.asarray(g))
        history = model.fit(distribute_batches(strategy, pk_dataset(images, labels, text[labels], p=4, k=2, seed=1)),
                            epochs=1, steps_per_epoch=2, verbose=0)
        out[f"{name}_{strategy_name}_fit"] = float(history.history["loss"][-1])
    out[f"{name}_loss"] = [grads["one_device"][0], grads["mirrored"][0]]
    out[f"{name}_grad_diff"] = float(np.max(np.abs(grads["one_device"][1] - grads["mirrored"][1])))
print("RESULT " + json.dumps(out))
"""


def test_two_replicas_mirror_proxies_and_match_one_device():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MIRRORED)], cwd=REPO_ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert "Mirrored" in out["mirrored_proxies"]
    for name in ("adaptive", "anchor"):
        one, two = out[f"{name}_loss"]
        assert two == pytest.approx(one, abs=1e-5)
        assert out[f"{name}_grad_diff"] < 1e-5
        assert np.isfinite(out[f"{name}_mirrored_fit"])


JAX = r"""
import json, numpy as np
import keras
from atl_keras.losses import AdaptiveProxyLoss, ProxyAnchorLoss
rng = np.random.default_rng(0)
labels = np.array([0, 0, 2, 2, 3, 3], np.int64)
f = rng.normal(size=(6, 4)).astype(np.float32)
p = rng.normal(size=(5, 4)).astype(np.float32)
g = rng.normal(size=(5, 3)).astype(np.float32)
print("RESULT " + json.dumps({"backend": keras.backend.backend(),
    "adaptive": float(AdaptiveProxyLoss(class_text_embeddings=g)(labels, f, proxies=p)),
    "anchor": float(ProxyAnchorLoss()(labels, f, proxies=p))}))
"""


def test_same_values_on_the_jax_backend():
    pytest.importorskip("jax")
    proc = subprocess.run([sys.executable, "-c", JAX], cwd=REPO_ROOT,
                          env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"},
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["backend"] == "jax"
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 2, 2, 3, 3], np.int64)
    f = rng.normal(size=(6, 4)).astype(np.float32)
    p = rng.normal(size=(5, 4)).astype(np.float32)
    g = rng.normal(size=(5, 3)).astype(np.float32)
    assert out["adaptive"] == pytest.approx(float(AdaptiveProxyLoss(class_text_embeddings=g)(labels, f, proxies=p)), abs=1e-5)
    assert out["anchor"] == pytest.approx(float(ProxyAnchorLoss()(labels, f, proxies=p)), abs=1e-5)


def test_train_config_trains_proxy_losses(tmp_path):
    from atl_keras.train import TrainConfig, run_training

    for loss, source in (("adaptive_proxy", "text"), ("adaptive_proxy", "permuted"), ("proxy_anchor", "text")):
        config = TrainConfig(
            dataset="synthetic-shop", synthetic_items=40, image_size=16, text_encoder="hashing",
            text_cache_dir=str(tmp_path / "cache"), p=4, k=2, epochs=1, steps_per_epoch=3,
            ks=(1, 5), embedding_dim=8, output_dir=str(tmp_path / f"{loss}-{source}"), projector_size=0,
            loss=loss, margin_source=source,
        )
        result = run_training(config, verbose=0)
        if source == "permuted":  # the weak-label margin tables plug in as a [C, C] margin matrix
            assert result.model.loss.margin_matrix.shape == (result.model.num_proxies,) * 2
        assert result.model.num_proxies == len(np.unique(result.data.train_labels))
        assert np.isfinite(result.history["loss"]).all()
        assert 0.0 <= result.test_metrics["recall_at_1"] <= 1.0

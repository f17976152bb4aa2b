"""Fit logs of proxy losses carry proxy statistics, never the (meaningless) triplet ones (issue 15)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from atl_keras.losses import TripletLoss
from atl_keras.model import ATLModel
from atl_keras.losses import AdaptiveProxyLoss, ProxyAnchorLoss

C, K, SIZE = 6, 4, 12


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(C), K).astype(np.int64)  # [C * K]
    images = rng.uniform(0, 255, (len(labels), SIZE, SIZE, 3)).astype(np.float32)
    images += (labels * 30.0)[:, None, None, None]  # classes differ in brightness: learnable
    return images, labels


def _model(loss, num_proxies: int = C):
    keras.utils.set_random_seed(0)
    model = ATLModel("small_cnn", input_shape=(SIZE, SIZE, 3), embedding_dim=8, num_proxies=num_proxies)
    model.compile(keras.optimizers.Adam(1e-3), loss=loss)
    return model


def _reference_proxy_accuracy(model: ATLModel, images: np.ndarray, labels: np.ndarray) -> float:
    emb = model.embed(images).astype(np.float64)  # [B, D], unit rows
    proxies = np.asarray(model.proxy_head.proxies, np.float64)  # [C, D]
    hits = 0
    for row, label in zip(emb, labels):  # loop: nearest proxy by cosine
        cos = [row @ p / np.linalg.norm(p) for p in proxies]
        hits += int(np.argmax(cos) == label)
    return hits / len(labels)


@pytest.mark.parametrize("loss", [AdaptiveProxyLoss(margin=0.1), ProxyAnchorLoss()], ids=["adaptive_proxy", "proxy_anchor"])
def test_proxy_fit_logs_proxy_accuracy_and_no_triplet_statistics(loss):
    images, labels = _data()
    model = _model(loss)
    history = model.fit(images, labels, batch_size=len(labels), epochs=2, verbose=0)
    assert "proxy_accuracy" in history.history
    assert not {"fraction_active", "mean_active_margin"} & set(history.history)
    assert all(0.0 <= v <= 1.0 for v in history.history["proxy_accuracy"])
    logs = model.evaluate(images, labels, batch_size=len(labels), verbose=0, return_dict=True)
    assert set(logs) == {"loss", "proxy_accuracy"}
    assert logs["proxy_accuracy"] == pytest.approx(_reference_proxy_accuracy(model, images, labels), abs=1e-6)


def test_triplet_fit_keeps_triplet_statistics_and_logs_no_proxy_accuracy():
    images, labels = _data()
    model = _model(TripletLoss(margin=0.2), num_proxies=C)  # a head, but a triplet loss
    history = model.fit(images, labels, batch_size=len(labels), epochs=1, verbose=0)
    assert {"fraction_active", "mean_active_margin"} <= set(history.history)
    assert "proxy_accuracy" not in history.history

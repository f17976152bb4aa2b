"""`ATLModel` on the JAX backend: `fit` for a few steps with the triplet loss, ATL, a
proxy loss and a loss named by string; and a functional `MetricModel` with an ATL head
(nested target dict) beside a `ProxyHead` (issue 24). Keras picks its backend once per process, so the run is a
subprocess with ``KERAS_BACKEND=jax``; it needs ``jax`` (the package's test extra)."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import run_under_jax

pytest.importorskip("jax", reason="the JAX backend check needs jax (pip install .[test])")


SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    import atl_keras as atl

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 4).astype(np.int32)
    centres = rng.uniform(0, 255, size=(8, 8, 8, 1))
    x = np.clip(centres[labels] + 40 * rng.normal(size=(32, 8, 8, 1)), 0, 255).astype(np.float32)
    text = rng.normal(size=(8, 5)).astype(np.float32)[labels]
    y = {"label": labels, "text_embedding": text}
    out = {}
    cases = [("triplet", atl.TripletLoss(mining="semi_hard"), 0),
             ("atl", atl.AdaptiveTripletLoss(mining="batch_hard"), 0),
             ("adaptive_proxy", atl.AdaptiveProxyLoss(class_text_embeddings=text[::4]), 8),
             ("by_name", "TripletLoss", 0)]
    for name, loss, proxies in cases:
        keras.utils.set_random_seed(0)
        model = atl.ATLModel("small_cnn", input_shape=(8, 8, 1), embedding_dim=8, num_proxies=proxies)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
        before = [np.array(w) for w in model.get_weights()]
        history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        moved = max(float(np.abs(np.array(a) - b).max()) for a, b in zip(model.get_weights(), before))
        evaluated = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
        out[name] = {"loss": history.history["loss"], "moved": moved, "evaluate": float(evaluated["loss"])}

    # A functional MetricModel: ATL head (nested target dict) + ProxyHead cosines, by name.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    embedding = keras.layers.UnitNormalization()(keras.layers.Dense(8)(flat))
    head = atl.ProxyHead(8, 8, seed=0)
    model = atl.MetricModel(inputs, {"embedding": embedding, "proxy": head(embedding)})
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss={"embedding": "AdaptiveTripletLoss",
                        "proxy": atl.ProxyAnchorLoss(from_cosines=True)},
                  loss_weights={"embedding": 1.0, "proxy": 0.5})
    before = np.array(head.proxies)
    history = model.fit(x, {"embedding": y, "proxy": labels}, batch_size=16, epochs=3,
                        shuffle=False, verbose=0)
    out["metric_model"] = {"loss": history.history["loss"],
                           "moved": float(np.abs(np.array(head.proxies) - before).max()),
                           "evaluate": float(model.evaluate(x, {"embedding": y, "proxy": labels},
                                                            batch_size=16, verbose=0))}
    print("RESULT:" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def jax_fit() -> dict:
    return run_under_jax(SCRIPT, timeout=900)


@pytest.mark.parametrize("name", ["triplet", "atl", "adaptive_proxy", "by_name", "metric_model"])
def test_atl_model_fits_under_jax(jax_fit, name):
    result = jax_fit[name]
    losses = result["loss"]
    assert len(losses) == 3 and all(v == v and v >= 0 for v in losses), losses
    assert result["moved"] > 1e-4  # the optimiser updated the weights
    assert result["evaluate"] == result["evaluate"]  # test_step runs too (finite)

"""The losses on the JAX backend, against the float64 loop reference.

Keras picks its backend once per process, so the checks run in a subprocess with
``KERAS_BACKEND=jax`` (atl_keras still imports TensorFlow for its data and export
modules; the loss math runs in JAX). Needs ``jax`` (the package's test extra).
"""

from __future__ import annotations

import os
import textwrap

import pytest

from tests.conftest import run_under_jax

pytest.importorskip("jax", reason="the JAX backend check needs jax (pip install .[test])")

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent(
    """
    import itertools, json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.path.insert(0, %(tests)r)
    import numpy as np
    import keras, jax
    assert keras.backend.backend() == "jax", keras.backend.backend()
    import reference_triplets as ref
    import test_losses as spec  # the batches of the TensorFlow reference tests
    import atl_keras as atl
    from atl_keras.losses import MINING_MODES

    out = {"backend": keras.backend.backend(), "errors": {}}
    configs = list(itertools.product(MINING_MODES, spec.DISTANCE_KINDS, (False, True)))
    worst = {config: 0.0 for config in configs}
    for i, (batch_kind, seed) in enumerate(spec.REFERENCE_BATCHES):
        labels, emb, text = spec.make_batch(batch_kind, seed)
        labels = labels.astype(np.int32)  # JAX without x64 has no int64

        def threshold(kind):
            return 0.3 * spec.max_distance(kind) if i %% 2 else None

        # One jax.jit program per batch holds the losses of all 18 configurations (mining,
        # kind, soft are static): 4 XLA compilations. Op-by-op eager JAX compiles every
        # ops.cond / ops.switch again on each call and took 10x longer.
        def all_losses(labels, emb, text):
            return [(atl.triplet_loss(labels, emb, 0.3, mining, kind, soft),
                     atl.adaptive_triplet_loss(labels, emb, text, 0.05, 0.6, mining, kind,
                                               threshold(kind), soft))
                    for mining, kind, soft in configs]

        values = jax.jit(all_losses)(labels, emb, text)
        for (mining, kind, soft), (plain, adaptive) in zip(configs, values):
            want = ref.reference_loss(labels, emb, mining, kind, soft, margin=0.3)
            error = abs(float(plain) - want)
            want = ref.reference_loss(labels, emb, mining, kind, soft, text=text,
                                      min_margin=0.05, max_margin=0.6,
                                      semantic_threshold=threshold(kind))
            error = max(error, abs(float(adaptive) - want))
            worst[mining, kind, soft] = max(worst[mining, kind, soft], error)
    out["errors"] = {f"{mining}/{kind}/{soft}": e for (mining, kind, soft), e in worst.items()}

    # jax.jit of value-and-grad: one compilation for label batches of other items / K /
    # a label with two texts / more positives than any slot.
    def pk(seed, k, per_row_text=False):
        rng = np.random.default_rng(seed)
        labels = np.repeat(rng.choice(10**6, 32 // k, replace=False), k).astype(np.int32)
        emb = rng.normal(size=(32, 6)).astype(np.float32)
        text = rng.normal(size=(32 // k, 5)).astype(np.float32)[np.arange(32) // k]
        if per_row_text:
            text[::k] += 1.0
        return labels, emb, text

    batches = [pk(1, 4), pk(2, 4), pk(3, 8), pk(4, 32), pk(5, 4, True)]
    out["compiles"] = {}
    for mining in MINING_MODES:
        loss = atl.AdaptiveTripletLoss(mining=mining)
        step = jax.jit(jax.value_and_grad(
            lambda e, l, t: loss({"label": l, "text_embedding": t}, e)))
        worst = 0.0
        for labels, emb, text in batches:
            value, grad = step(emb, labels, text)
            want = ref.reference_loss(labels, emb, mining, text=text)
            worst = max(worst, abs(float(value) - want))
            assert np.all(np.isfinite(np.asarray(grad)))
        out["compiles"][mining] = [int(step._cache_size()), worst]

    # A functional MetricModel trains on JAX with dict targets.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 4).astype(np.int32)
    x = (rng.normal(size=(12, 8))[labels] + 0.5 * rng.normal(size=(48, 8))).astype(np.float32)
    text = rng.normal(size=(12, 5)).astype(np.float32)[labels]
    inputs = keras.Input((8,))
    model = atl.MetricModel(inputs, keras.layers.UnitNormalization()(keras.layers.Dense(6)(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=atl.AdaptiveTripletLoss(mining="semi_hard"))
    history = model.fit(x, {"label": labels, "text_embedding": text}, batch_size=16,
                        epochs=3, shuffle=False, verbose=0)
    out["fit_losses"] = history.history["loss"]
    print("RESULT:" + json.dumps(out))
    """
) % {"tests": TESTS}


@pytest.fixture(scope="module")
def jax_result() -> dict:
    return run_under_jax(SCRIPT, timeout=1500)


def test_jax_backend_matches_the_loop_reference(jax_result):
    assert jax_result["backend"] == "jax"
    assert len(jax_result["errors"]) == 18
    for name, error in jax_result["errors"].items():
        assert error < 1e-5, (name, error)


def test_jax_jit_compiles_once_for_any_label_batch(jax_result):
    for mining, (compiles, error) in jax_result["compiles"].items():
        assert compiles == 1, (mining, compiles)
        assert error < 1e-5, (mining, error)


def test_plain_keras_model_fits_on_jax_with_dict_targets(jax_result):
    losses = jax_result["fit_losses"]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses)
    assert max(losses) - min(losses) > 1e-5

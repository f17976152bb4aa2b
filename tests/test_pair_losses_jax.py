"""The pair losses and ArcFace on the JAX backend: PML 2.9's values, one jit compilation.

Keras picks its backend once per process, so the checks run in a subprocess with
``KERAS_BACKEND=jax``. Needs ``jax`` (the package's test extra).
"""

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
    import keras, jax
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from atl_keras.losses.arcface import arcface_loss
    from atl_keras.losses.circle import CircleLoss, circle_loss
    from atl_keras.losses.contrastive import ContrastiveLoss, contrastive_loss
    from atl_keras.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
    from atl_keras.losses.pair_miners import MultiSimilarityMiner
    from atl_keras.losses.supcon import SupConLoss, supcon_loss

    fns = {"contrastive": contrastive_loss, "multi_similarity": multi_similarity_loss,
           "circle": circle_loss, "supcon": supcon_loss}
    pml = json.load(open("tests/data/pair_losses_pml.json"))
    errors = {}
    for case in pml["cases"]:
        labels = np.asarray(case["labels"], np.int32)  # JAX without x64 has no int64
        emb = np.asarray(case["embeddings"], np.float32)
        results = case["results"]
        proxies = [np.asarray(r.get("proxies", [[0.0]]), np.float32) for r in results]

        def one(r, e, p):
            if r["loss"] in fns:
                miner = MultiSimilarityMiner(r["miner_epsilon"]) if r.get("miner_epsilon") else None
                return fns[r["loss"]](labels, e, miner=miner, **r["kwargs"])
            kw = {k: v for k, v in r["kwargs"].items() if k != "sub_centers"}
            return arcface_loss(labels, e, p, sub_centers=r["sub_centers"], **kw)

        # One jax.jit program per batch holds every loss: 7 compilations, not op-by-op ones.
        def everything(e, ps):
            return [jax.value_and_grad(lambda e, p, r=r: one(r, e, p), argnums=(0, 1))(e, p)
                    for r, p in zip(results, ps)]

        for r, (value, (ge, gp)) in zip(results, jax.jit(everything)(emb, proxies)):
            error = abs(float(value) - r["value"]) / max(1.0, abs(r["value"]))
            for got, want in ((ge, r["grad_embeddings"]), (gp, r.get("grad_proxies"))):
                assert np.all(np.isfinite(np.asarray(got)))
                if want is not None:
                    error = max(error, float(np.abs(np.asarray(got) - np.asarray(want)).max()))
            key = r["loss"] + ("+miner" if r.get("miner_epsilon") else "")
            errors[key] = max(errors.get(key, 0.0), error)

    # jax.jit of value-and-grad: one compilation for label batches of other items / K.
    rng = np.random.default_rng(0)
    batches = []
    for k in (2, 4, 8, 16):
        labels = np.repeat(rng.choice(10**6, 16 // k, replace=False), k).astype(np.int32)
        batches.append((labels, rng.normal(size=(16, 8)).astype(np.float32)))
    compiles = {}
    for loss in (ContrastiveLoss(), MultiSimilarityLoss(miner="multi_similarity"), CircleLoss(),
                 SupConLoss()):
        step = jax.jit(jax.value_and_grad(lambda e, l, loss=loss: loss(l, e)))
        for labels, emb in batches:
            value, grad = step(emb, labels)
            assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
        compiles[loss.name] = int(step._cache_size())
    print("RESULT:" + json.dumps({"backend": keras.backend.backend(), "errors": errors,
                                  "compiles": compiles}))
    """
)


@pytest.fixture(scope="module")
def jax_result() -> dict:
    return run_under_jax(SCRIPT, timeout=900)


def test_jax_matches_pml_2_9(jax_result):
    assert jax_result["backend"] == "jax"
    assert set(jax_result["errors"]) == {
        "contrastive", "contrastive+miner", "multi_similarity", "multi_similarity+miner",
        "circle", "supcon", "arcface", "sub_center_arcface"}
    for name, error in jax_result["errors"].items():
        assert error < 1e-4, (name, error)


def test_jax_jit_compiles_once_for_new_label_batches(jax_result):
    assert jax_result["compiles"] == {"contrastive_loss": 1, "multi_similarity_loss": 1,
                                      "circle_loss": 1, "supcon_loss": 1}

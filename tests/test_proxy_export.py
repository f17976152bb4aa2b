"""An export of an ATLModel trained with proxies ships the embedding model only (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from atl_keras.export import export_embeddings, export_model, load_export
from atl_keras.model import ATLModel
from atl_keras.proxies import strip_proxies


@pytest.fixture(scope="module")
def proxy_model():
    tf.keras.utils.set_random_seed(0)
    model = ATLModel("small_cnn", input_shape=(16, 16, 3), embedding_dim=8, num_proxies=11,
                     proxy_learning_rate_multiplier=10.0)
    head = model.proxy_head.weights[0]
    head.assign(np.random.default_rng(1).normal(size=tuple(head.shape)).astype(np.float32))  # not the init
    return model


def _saved_variables(path: str) -> list[tuple[str, tuple[int, ...]]]:
    reader = tf.train.load_checkpoint(f"{path}/variables/variables")
    return [(name, tuple(shape)) for name, shape in reader.get_variable_to_shape_map().items()]


@pytest.mark.parametrize("embedded", [False, True], ids=["export_model", "export_embeddings"])
def test_export_of_a_proxy_model_has_no_proxy_variables_and_the_same_embeddings(tmp_path, proxy_model, embedded):
    rng = np.random.default_rng(2)
    gallery = rng.uniform(0, 255, (12, 16, 16, 3)).astype(np.float32)
    ids = [f"item{i}" for i in range(12)]
    if embedded:
        result = export_embeddings(proxy_model, proxy_model.embed(gallery), ids, str(tmp_path / "m"),
                                   include_scann=False)
    else:
        result = export_model(proxy_model, gallery, ids, str(tmp_path / "m"), include_scann=False)
    saved = _saved_variables(result.path)
    proxy_shape = (11, 8)
    assert not [name for name, shape in saved if "proxy" in name.lower() or shape == proxy_shape], saved
    # Every weight of the embedding model is there: as many float variables as the stripped model has.
    stripped = strip_proxies(proxy_model)
    weight_shapes = sorted(tuple(w.shape) for w in stripped.weights)
    model_vars = sorted(shape for name, shape in saved if name.startswith("model/"))
    assert model_vars == weight_shapes
    # The fingerprint in the manifest is the exported (stripped) model's.
    from atl_keras.embedding import weights_fingerprint

    assert result.manifest["model_sha256"] == weights_fingerprint(stripped)
    loaded = load_export(result.path)
    queries = rng.uniform(0, 255, (5, 16, 16, 3)).astype(np.float32)
    served = loaded.signatures["embed_pixels"](pixels=tf.constant(queries))["embeddings"].numpy()
    np.testing.assert_allclose(served, proxy_model.embed(queries), atol=1e-5)

"""The losses in Keras models: functional compile/fit, every target form, names, heads.

Keras 3's CompileLoss reconciles y_true with y_pred's structure before a loss runs, so
dict targets never reach a single-output loss of a plain keras.Model. `atl.MetricModel`
(same constructor as keras.Model) overrides the public compute_loss instead; importing
atl_keras patches nothing (`install_keras_target_support` is an explicit opt-in). These
tests train real (tiny) functional models with `fit` and check the loss value Keras
reports against the loss functions.
"""

from __future__ import annotations

import numpy as np
import pytest

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import atl_keras as atl  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from atl_keras.distances import DISTANCES, RANKING_DISTANCES, resolve_distance  # noqa: E402
from atl_keras.losses import MINING_MODES, install_keras_target_support  # noqa: E402

ITEMS, PER_ITEM, DIM, TEXT_DIM = 12, 4, 10, 6


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [48, 4, 4, 1] float32, labels [48] int64 (> 2**24), text [48, 6])."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ITEMS, 16))
    labels = np.repeat(np.arange(ITEMS), PER_ITEM)
    x = centres[labels] + 0.8 * rng.normal(size=(len(labels), 16))
    text = rng.normal(size=(ITEMS, TEXT_DIM))[labels].astype(np.float32)
    return x.reshape(-1, 4, 4, 1).astype(np.float32), (labels + 2**25).astype(np.int64), text


def functional_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Dense(DIM)(keras.layers.Flatten()(inputs))
    return atl.MetricModel(inputs, keras.layers.UnitNormalization()(x))


def targets(form: str, labels: np.ndarray, text: np.ndarray):
    if form == "bare":
        return labels
    if form == "label_dict":
        return {"label": labels}
    return {"label": labels, "text_embedding": text}


def fit_and_check(model: keras.Model, loss, dataset, steps: int = 6) -> list[float]:
    """Fit `steps` steps one per epoch; the loss must be finite and change, weights move."""
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(dataset, epochs=steps, steps_per_epoch=1, verbose=0)
    values = history.history["loss"]
    assert len(values) == steps and np.all(np.isfinite(values)), values
    assert max(values) - min(values) > 1e-4, values  # training moved the loss
    assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(before, model.get_weights()))
    return values


LOSS_CASES = [
    ("triplet", "bare"),
    ("triplet", "label_dict"),  # what atl.data.pk_dataset yields without text
    ("triplet", "full_dict"),  # extra keys are ignored
    ("atl", "full_dict"),
]


@pytest.mark.parametrize("loss_kind,form", LOSS_CASES)
def test_functional_model_fits_with_every_target_form(loss_kind, form):
    x, labels, text = make_data()
    pk = atl.data.pk_dataset(x, labels, None if form == "label_dict" else text, p=4, k=4)
    if form == "bare":
        pk = pk.map(lambda images, y: (images, y["label"]))
    loss = atl.TripletLoss(mining="batch_all") if loss_kind == "triplet" else \
        atl.AdaptiveTripletLoss(mining="batch_all")
    values = fit_and_check(functional_model(), loss, pk)
    assert values[-1] < values[0], values  # and it is learning


@pytest.mark.parametrize("mining", MINING_MODES)
def test_functional_model_fits_every_mining_mode_from_numpy_dict_targets(mining):
    """numpy x with a dict y (Keras' array adapter slices the dict per batch)."""
    x, labels, text = make_data(1)
    model = functional_model(1)
    loss = atl.AdaptiveTripletLoss(mining=mining, max_images_per_label=PER_ITEM)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    y = {"label": labels, "text_embedding": text}
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    values = history.history["loss"]
    assert np.all(np.isfinite(values)) and max(values) - min(values) > 1e-5, values


def test_reported_loss_equals_the_function_and_loss_weights_apply():
    x, labels, text = make_data(2)
    model = functional_model(2)
    emb = model.predict(x, verbose=0)
    want = float(atl.adaptive_triplet_loss(labels, emb, text, mining="semi_hard"))
    y = {"label": labels, "text_embedding": text}
    for weight in (None, 2.5):
        model.compile(loss=atl.AdaptiveTripletLoss(mining="semi_hard"), loss_weights=weight)
        got = model.evaluate(x, y, batch_size=len(x), verbose=0)
        assert got == pytest.approx(want * (weight or 1.0), rel=1e-5)


def test_sample_weight_is_refused_with_the_reason():
    x, labels, text = make_data()
    model = functional_model()
    model.compile(optimizer="sgd", loss=atl.AdaptiveTripletLoss())
    y = {"label": labels, "text_embedding": text}
    with pytest.raises(ValueError, match="sample_weight or class_weight.*mined across"):
        model.fit(x, y, sample_weight=np.ones(len(x)), batch_size=16, epochs=1, verbose=0)


def test_missing_text_entry_is_reported():
    x, labels, _ = make_data()
    model = functional_model()
    model.compile(optimizer="sgd", loss=atl.AdaptiveTripletLoss())
    with pytest.raises(ValueError, match="text_embedding"):
        model.fit(x, {"label": labels}, batch_size=16, epochs=1, verbose=0)


def test_import_patches_nothing_in_keras():
    """No CompileLoss patch and no import hook at import, whatever the import order; the
    classes are registered for load_model once Keras is there."""
    import subprocess
    import sys

    script = (
        "import sys, atl_keras, keras\n"
        "from keras.src.trainers import compile_utils\n"
        "assert not getattr(compile_utils.CompileLoss.call, '_atl_dict_targets', False)\n"
        "assert not [f for f in sys.meta_path if type(f).__module__.startswith('atl_keras')]\n"
        "assert keras.saving.get_registered_object('atl_keras>TripletLoss') is None\n"
        "atl_keras.register_keras_objects()\n"
        "assert keras.saving.get_registered_object('atl_keras>TripletLoss') is not None\n"
        "assert keras.saving.get_registered_object('atl_keras>MetricModel') is not None\n"
        "assert not getattr(compile_utils.CompileLoss.call, '_atl_dict_targets', False)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_plain_keras_model_dict_targets_need_the_explicit_opt_in():
    x, labels, text = make_data()
    inputs = keras.Input((4, 4, 1))
    outputs = keras.layers.UnitNormalization()(keras.layers.Dense(DIM)(keras.layers.Flatten()(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss=atl.TripletLoss())
    with pytest.raises(ValueError, match="MetricModel"):  # a one-key dict: Keras packs it into its key
        model.fit(x, {"label": labels}, batch_size=16, epochs=1, verbose=0)
    assert install_keras_target_support()
    assert install_keras_target_support()  # idempotent
    model.compile(optimizer="sgd", loss=atl.AdaptiveTripletLoss())
    history = model.fit(x, {"label": labels, "text_embedding": text}, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_compile_by_registered_name():
    x, labels, text = make_data(4)
    y = {"label": labels, "text_embedding": text}
    for name in ("TripletLoss", "atl_keras>AdaptiveTripletLoss"):
        model = functional_model(4)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=name)
        expected = atl.losses.get(name)
        assert type(model.loss) is type(expected)
        emb = model.predict(x, verbose=0)
        got = model.evaluate(x, y, batch_size=len(x), verbose=0)
        assert got == pytest.approx(float(expected(y, emb)), rel=1e-5)
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
    model = atl.ATLModel(backbone="small_cnn", input_shape=(4, 4, 1), embedding_dim=8)
    model.compile(optimizer="adam", loss="TripletLoss")
    assert isinstance(model.loss, atl.TripletLoss)
    assert atl.losses.get("mse") is keras.losses.get("mse")  # Keras' names still resolve
    mixed, _ = _two_head_model(4, ITEMS)  # a Keras loss function on one output, ours on the other
    mixed.compile(optimizer="sgd", loss={"embedding": "TripletLoss", "proxy": "mse"})
    targets = {"embedding": labels, "proxy": np.zeros((len(x), ITEMS), np.float32)}
    out = mixed.predict(x, verbose=0)
    want = float(atl.TripletLoss()(labels, out["embedding"])) + float(np.mean(out["proxy"] ** 2))
    assert mixed.evaluate(x, targets, batch_size=len(x), verbose=0) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="Unknown loss 'NoSuchLoss'.*TripletLoss"):
        atl.losses.get("NoSuchLoss")
    with pytest.raises(ValueError, match="exactly one margin source"):
        atl.losses.get("AdaptiveProxyLoss")  # needs arguments: pass an instance


def _two_head_model(seed: int, classes: int) -> tuple[keras.Model, atl.ProxyHead]:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 1))
    embedding = keras.layers.UnitNormalization(name="embedding")(
        keras.layers.Dense(DIM)(keras.layers.Flatten()(inputs)))
    head = atl.ProxyHead(classes, DIM, seed=seed, name="proxy_head")
    return atl.MetricModel(inputs, {"embedding": embedding, "proxy": head(embedding)}), head


def test_multi_output_model_with_nested_targets_and_a_proxy_head():
    """An ATL head with a nested target dict beside a ProxyHead (cosines) with labels."""
    x, ids, text = make_data(5)
    labels = (ids - 2**25).astype(np.int32)  # dense class ids 0..C-1 for the proxies
    model, head = _two_head_model(5, ITEMS)
    atl_loss = atl.AdaptiveTripletLoss(mining="semi_hard")
    proxy_loss = atl.ProxyAnchorLoss(from_cosines=True, num_classes=ITEMS)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss={"embedding": atl_loss, "proxy": proxy_loss},
                  loss_weights={"embedding": 1.0, "proxy": 0.25})
    y = {"embedding": {"label": labels, "text_embedding": text}, "proxy": labels}
    out = model.predict(x, verbose=0)
    want = float(atl_loss(y["embedding"], out["embedding"])) + 0.25 * float(proxy_loss(labels, out["proxy"]))
    assert model.evaluate(x, y, batch_size=len(x), verbose=0) == pytest.approx(want, rel=1e-5)
    # The head's cosines give the loss of the embeddings with its proxies.
    with_proxies = atl.ProxyAnchorLoss()(labels, out["embedding"], proxies=head.proxies)
    assert float(proxy_loss(labels, out["proxy"])) == pytest.approx(float(with_proxies), rel=1e-5)
    before = np.array(head.proxies)
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert np.abs(np.array(head.proxies) - before).max() > 1e-4  # the proxies learn


def test_metric_model_saves_and_loads(tmp_path):
    x, ids, _ = make_data(6)
    labels = (ids - 2**25).astype(np.int32)
    model, _ = _two_head_model(6, ITEMS)
    model.compile(optimizer="adam", loss={"proxy": atl.AdaptiveProxyLoss(margin=0.2, from_cosines=True)})
    model.fit(x, {"proxy": labels}, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "two_heads.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, atl.MetricModel) and loaded.loss["proxy"].from_cosines
    np.testing.assert_allclose(loaded.predict(x, verbose=0)["proxy"], model.predict(x, verbose=0)["proxy"],
                               rtol=1e-5, atol=1e-6)


def test_configs_saved_with_the_old_module_paths_still_load():
    """Saved .keras files name the class's module; the registered name is what resolves it."""
    for cls, module, config in (
        ("TripletLoss", "atl_keras.losses", {"margin": 0.3}),
        ("AdaptiveProxyLoss", "atl_keras.proxy_losses", {"margin": 0.2}),
        ("MarginTableTripletLoss", "atl_keras.margin_sources", {"table": [[0.1, 0.2], [0.2, 0.1]]}),
    ):
        saved = {"module": module, "class_name": cls, "config": config,
                 "registered_name": f"atl_keras>{cls}"}
        assert type(keras.saving.deserialize_keras_object(saved)).__name__ == cls


def test_proxy_loss_input_errors():
    with pytest.raises(ValueError, match="from_cosines=True.*do not pass proxies"):
        atl.ProxyAnchorLoss(from_cosines=True)([0, 1], np.eye(2, dtype=np.float32), proxies=np.eye(2))
    with pytest.raises(ValueError, match="4 classes but y_pred has 2 cosine columns"):
        atl.ProxyAnchorLoss(from_cosines=True, num_classes=4)([0, 1], np.eye(2, dtype=np.float32))
    inputs = keras.Input((3,))
    model = atl.MetricModel(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="sgd", loss=atl.ProxyAnchorLoss())
    with pytest.raises(ValueError, match="ProxyHead.*from_cosines=True"):
        model.fit(np.ones((4, 3), np.float32), np.array([0, 1, 0, 1]), verbose=0)


def test_other_losses_keep_keras_behaviour():
    """The opt-in bridge only handles atl losses: a Keras loss with dict targets still gets
    Keras' own structure error, and plain tensors still train."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 3), np.float32)
    model.fit(x, np.zeros((8, 2), np.float32), verbose=0)
    with pytest.raises(ValueError, match="different structures"):
        model.fit(x, {"a": np.zeros((8, 2)), "b": np.zeros((8, 2))}, verbose=0)


def test_atl_model_still_computes_its_own_loss():
    x, labels, text = make_data(3)
    model = atl.ATLModel(backbone="small_cnn", input_shape=(4, 4, 1), embedding_dim=8)
    model.compile(optimizer="adam", loss=atl.AdaptiveTripletLoss(mining="batch_hard"))
    history = model.fit(atl.data.pk_dataset(x, labels, text, p=4, k=4), epochs=2,
                        steps_per_epoch=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


# ---------------------------------------------------------------------------
# One distance vocabulary.
# ---------------------------------------------------------------------------


def test_one_distance_vocabulary_with_aliases():
    assert DISTANCES == ("squared_l2", "l2", "cosine")
    assert RANKING_DISTANCES == ("squared_l2", "l2", "cosine", "dot")
    assert resolve_distance("Euclidean") == "l2"
    assert resolve_distance("sqeuclidean") == "squared_l2"
    assert resolve_distance("dot_product", RANKING_DISTANCES) == "dot"
    assert atl.TripletLoss(distance="euclidean").distance == "l2"
    with pytest.raises(ValueError, match="'squared_l2', 'l2', 'cosine'.*aliases"):
        atl.TripletLoss(distance="manhattan")
    with pytest.raises(ValueError, match="not a distance the losses can use.*'cosine'"):
        atl.AdaptiveTripletLoss(distance="dot")


def test_metrics_speak_the_same_vocabulary():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 4)).astype(np.float32)
    labels = np.repeat(np.arange(5), 4)
    base = atl.retrieval_metrics(emb, labels, ks=(1, 3), distance="squared_l2")
    for name in ("l2", "euclidean", "sqeuclidean"):
        assert atl.retrieval_metrics(emb, labels, ks=(1, 3), distance=name) == base
    assert atl.retrieval_metrics(emb, labels, ks=(1,), distance="dot_product") == \
        atl.retrieval_metrics(emb, labels, ks=(1,), distance="dot")
    with pytest.raises(ValueError, match="Unknown distance"):
        atl.retrieval_metrics(emb, labels, distance="manhattan")


def test_margin_triplet_loss_is_exported():
    labels = tf.constant([0, 0, 1, 1])
    dist = atl.pairwise_distances(tf.eye(4))
    margins = tf.fill((4, 4), 0.3)
    assert float(atl.margin_triplet_loss(labels, dist, margins)) == pytest.approx(
        float(atl.triplet_loss(labels, tf.eye(4), margin=0.3)))

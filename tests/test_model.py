"""ATLModel and backbones: training through compile/fit, serialisation, embeddings, weights."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from atl_keras import backbones as bb
from atl_keras.backbones import PixelPreprocessing, available_backbones, build_backbone
from atl_keras.data.sampler import pk_dataset
from atl_keras.model import ATLModel, GeneralizedMeanPooling, L2Normalization

SHAPE = (12, 12, 1)


def _images(n: int, shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype(np.float32)


def _separable_problem(num_classes: int = 4, per_class: int = 16, seed: int = 0):
    """Each class is a bright square in its own quadrant of a noisy 12x12 image."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = rng.uniform(0, 60, size=(len(labels), *SHAPE)).astype(np.float32)
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, 6 * r : 6 * r + 6, 6 * c : 6 * c + 6] += 180
    text = np.eye(num_classes, 8, dtype=np.float32)[labels]
    return images, labels.astype(np.int64), text


class TextAwareMSE(keras.losses.Loss):
    """Tiny stand-in loss: mean((y_pred[:, :T] - text)^2) + mean(label); takes the dict target."""

    def call(self, y_true, y_pred):
        text = y_true["text_embedding"]
        t = text.shape[-1]
        return keras.ops.mean(keras.ops.square(y_pred[:, :t] - text), axis=-1) + keras.ops.mean(
            keras.ops.cast(y_true["label"], "float32")
        )


# ----------------------------------------------------------------------------- backbones
def test_small_cnn_shapes_and_rescaling():
    backbone = build_backbone("small_cnn", (28, 28, 1))
    assert backbone.output_shape == (None, 7, 7, 128)
    assert isinstance(backbone.get_layer("rescale"), PixelPreprocessing)
    x = _images(2, (28, 28, 1))
    np.testing.assert_allclose(backbone.get_layer("rescale")(x).numpy(), x / 255.0, rtol=1e-6)


@pytest.mark.parametrize(
    "mode,family",
    [("caffe", "resnet50"), ("tf", "mobilenet_v2"), ("torch", "densenet"), ("none", "efficientnet_v2")],
)
def test_pixel_preprocessing_matches_keras_applications(mode, family):
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 4, 5, 3)).astype(np.float32)
    expected = getattr(keras.applications, family).preprocess_input(x.copy())
    np.testing.assert_allclose(PixelPreprocessing(mode)(x).numpy(), expected, rtol=1e-5, atol=1e-4)


def test_backbone_errors():
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet9'.*small_cnn.*efficientnetv2-s.*resnet50"):
        build_backbone("resnet9", (32, 32, 3))
    with pytest.raises(ValueError, match=r"'resnet50' needs images of at least 32x32.*28x28"):
        build_backbone("resnet50", (28, 28, 1))
    with pytest.raises(ValueError, match="2 channels"):
        build_backbone("small_cnn", (28, 28, 2))
    with pytest.raises(FileNotFoundError, match=r"does not exist.*weights=None"):
        build_backbone("small_cnn", (28, 28, 1), weights="/nonexistent/w.weights.h5")
    with pytest.raises(ValueError, match=r"must end in '.weights.h5'"):
        build_backbone("small_cnn", (28, 28, 1), weights="resnet")
    with pytest.raises(ValueError, match="no ImageNet weights for 'small_cnn'"):
        build_backbone("small_cnn", (28, 28, 1), weights="imagenet")
    assert {"small_cnn", "resnet50", "efficientnetv2-s", "efficientnetv2-b0", "mobilenetv2",
            "mobilenetv3-small", "mobilenetv3-large"} <= set(available_backbones())


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Empty Keras cache, and any download attempt fails the test."""
    from keras.src.utils import file_utils

    requested = []

    def forbidden_get_file(fname=None, origin=None, *args, **kwargs):
        requested.append(fname)
        raise AssertionError(f"download attempted: {fname} from {origin}")

    monkeypatch.setattr(file_utils, "get_file", forbidden_get_file)
    monkeypatch.setattr(bb, "_keras_cache_dirs", lambda: [str(tmp_path / "models")])
    return requested


def test_imagenet_weights_missing_is_a_clear_offline_error(no_network):
    with pytest.raises(FileNotFoundError, match=r"not available offline.*resnet50_weights_tf_dim_"
                       r"ordering_tf_kernels_notop\.h5.*weights=None"):
        build_backbone("resnet50", (32, 32, 3), weights="imagenet")
    assert no_network == []


@pytest.mark.parametrize("name,shape", [("mobilenetv2", (32, 32, 3)), ("mobilenetv3-small", (32, 32, 3))])
def test_imagenet_filename_is_what_keras_applications_would_fetch(no_network, name, shape):
    """Keras' own constructor asks get_file for the file name we look for in the cache."""
    app = bb._APPLICATIONS[name]
    with pytest.raises(AssertionError, match="download attempted"):
        app.constructor(include_top=False, weights="imagenet", input_shape=shape, **app.kwargs)
    assert no_network == [bb.imagenet_weights_filename(name, shape)]


def _write_keras_applications_h5(model: keras.Model, path: str) -> None:
    """Write weights the way keras.applications ships them (legacy HDF5, by layer name)."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def test_application_backbone_32x32_from_cached_imagenet_or_local_h5_without_download(no_network, tmp_path):
    name, shape = "mobilenetv3-small", (32, 32, 1)
    source = build_backbone(name, shape)  # weights=None
    assert source.get_layer("gray_to_rgb") is not None  # grayscale repeated to RGB
    cache = tmp_path / "models"
    cache.mkdir()
    cached = cache / bb.imagenet_weights_filename(name, shape)
    _write_keras_applications_h5(source.get_layer("MobileNetV3Small"), str(cached))
    x = _images(3, shape)
    expected = source(x, training=False).numpy()

    model = ATLModel(name, input_shape=shape, embedding_dim=8, weights="imagenet")
    np.testing.assert_allclose(model.backbone(x, training=False).numpy(), expected, atol=1e-6)
    emb = model.embed(x)
    assert emb.shape == (3, 8) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    from_path = build_backbone(name, shape, weights=str(cached))
    np.testing.assert_allclose(from_path(x, training=False).numpy(), expected, atol=1e-6)
    assert no_network == []


def test_local_weights_file_round_trip(tmp_path):
    model = ATLModel("small_cnn", input_shape=SHAPE, embedding_dim=8)
    model.backbone.get_layer("block1_conv").kernel.assign(
        np.random.default_rng(0).normal(size=(3, 3, 1, 32)).astype(np.float32)
    )
    path = str(tmp_path / "backbone.weights.h5")
    model.backbone.save_weights(path)
    x = _images(4)
    restored = ATLModel("small_cnn", input_shape=SHAPE, embedding_dim=8, weights=path)
    np.testing.assert_allclose(restored.backbone(x).numpy(), model.backbone(x).numpy(), atol=1e-6)
    assert restored.get_config()["weights"] == path
    fresh = ATLModel("small_cnn", input_shape=SHAPE, embedding_dim=8)
    assert not np.allclose(fresh.backbone(x).numpy(), model.backbone(x).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="does not match backbone"):
        build_backbone("small_cnn", (12, 12, 3), weights=path)


# ------------------------------------------------------------------------------- layers
def test_gem_pooling_matches_numpy_and_limits():
    x = np.random.default_rng(2).uniform(0, 3, size=(2, 3, 4, 5)).astype(np.float32)
    gem = GeneralizedMeanPooling(p=3.0)
    expected = np.mean(np.maximum(x, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    np.testing.assert_allclose(gem(x).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(GeneralizedMeanPooling(p=1.0)(x).numpy(), x.mean(axis=(1, 2)), rtol=1e-5)
    assert len(gem.trainable_weights) == 1


def test_l2_normalization_unit_norm_and_finite_gradient_at_zero():
    x = tf.constant([[3.0, 4.0], [0.0, 0.0]])
    layer = L2Normalization()
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        total = tf.reduce_sum(y * tf.constant([[1.0, 2.0]]))
    np.testing.assert_allclose(y.numpy(), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    grad = tape.gradient(total, x).numpy()
    assert np.isfinite(grad).all() and np.abs(grad[0]).sum() > 0


# -------------------------------------------------------------------------------- model
@pytest.mark.parametrize("pooling", ["avg", "max", "gem"])
def test_save_load_round_trip(tmp_path, pooling):
    model = ATLModel("small_cnn", input_shape=SHAPE, embedding_dim=8, pooling=pooling, dropout=0.1)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, ATLModel)
    assert loaded.get_config() == model.get_config()
    x = _images(5)
    np.testing.assert_allclose(loaded.embed(x), model.embed(x), atol=1e-6)


def test_embed_shapes_norms_and_inputs():
    model = ATLModel("small_cnn", input_shape=SHAPE, embedding_dim=6)
    x = _images(7)
    emb = model.embed(x, batch_size=3)
    assert emb.shape == (7, 6) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, model(x, training=False).numpy(), atol=1e-6)
    np.testing.assert_allclose(model.embed(x.astype(np.uint8)), model.embed(np.floor(x)), atol=1e-6)
    images_ds = tf.data.Dataset.from_tensor_slices(x).batch(4)
    pairs_ds = tf.data.Dataset.from_tensor_slices((x, np.arange(7))).batch(4)
    np.testing.assert_allclose(model.embed(images_ds), emb, atol=1e-6)
    np.testing.assert_allclose(model.embed(pairs_ds), emb, atol=1e-6)
    with pytest.raises(ValueError, match=r"expects images of shape \[N, 12, 12, 1\]"):
        model.embed(_images(2, (12, 12, 3)))
    with pytest.raises(ValueError, match="infinite dataset"):
        model.embed(images_ds.repeat())


def test_mixed_precision_output_is_float32_unit_norm():
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy("mixed_float16")
        model = ATLModel("small_cnn", input_shape=SHAPE, embedding_dim=8, pooling="gem")
        assert model.projection.compute_dtype == "float16"
        out = model(_images(3), training=False)
        assert out.dtype == tf.float32
        np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=1), 1.0, atol=1e-5)
        assert model.embed(_images(2)).dtype == np.float32
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.config.dtype_policy().name == previous.name


def test_compute_loss_is_loss_of_dict_target_plus_regularisers():
    model = ATLModel("small_cnn", input_shape=SHAPE, embedding_dim=8)
    model.compile(keras.optimizers.SGD(), loss=TextAwareMSE())
    images, labels, text = _separable_problem()
    x, y = images[:6], {"label": labels[:6], "text_embedding": text[:6]}
    y_pred = model(x, training=False)
    expected = np.mean((y_pred.numpy() - text[:6]) ** 2) + labels[:6].mean()
    np.testing.assert_allclose(model.compute_loss(x, y, y_pred).numpy(), expected, rtol=1e-5)
    # Regularisation losses (self.losses) are added, as in keras.Model.compute_loss.
    model.projection.kernel.regularizer = keras.regularizers.L2(0.5)
    reg = 0.5 * np.sum(model.projection.kernel.numpy() ** 2)
    np.testing.assert_allclose(model.compute_loss(x, y, y_pred).numpy(), expected + reg, rtol=1e-5)


def test_missing_loss_or_targets_are_clear_errors():
    model = ATLModel("small_cnn", input_shape=SHAPE, embedding_dim=8)
    images, labels, text = _separable_problem()
    y_pred = model(images[:4])
    with pytest.raises(ValueError, match="has no loss.*model.compile"):
        model.compute_loss(images[:4], {"label": labels[:4]}, y_pred)
    model.compile(keras.optimizers.SGD())
    with pytest.raises(ValueError, match="has no loss"):
        model.fit(images, labels, epochs=1, batch_size=8, verbose=0)
    model.compile(keras.optimizers.SGD(), loss=TextAwareMSE())
    with pytest.raises(ValueError, match="needs targets"):
        model.compute_loss(images[:4], None, y_pred)


def test_fit_with_adaptive_triplet_loss_decreases_loss_evaluate_and_round_trip(tmp_path):
    from atl_keras.losses import AdaptiveTripletLoss

    images, labels, text = _separable_problem()
    model = ATLModel("small_cnn", input_shape=SHAPE, embedding_dim=8)
    loss = AdaptiveTripletLoss(min_margin=0.2, max_margin=0.6, mining="batch_all")
    model.compile(keras.optimizers.Adam(3e-3), loss=loss)
    batch = (images[::2], {"label": labels[::2], "text_embedding": text[::2]})
    eval_ds = tf.data.Dataset.from_tensors(batch)
    before = model.evaluate(eval_ds, verbose=0, return_dict=True)["loss"]
    direct = loss(batch[1], model(batch[0], training=False)).numpy()
    np.testing.assert_allclose(before, direct, rtol=1e-5)

    train = pk_dataset(images, labels, text, p=4, k=4, seed=0)
    history = model.fit(train, steps_per_epoch=10, epochs=3, verbose=0)
    assert set(history.history) == {"loss", "fraction_active", "mean_active_margin"} and len(history.history["loss"]) == 3
    first, last = history.history["loss"][0], history.history["loss"][-1]
    after = model.evaluate(eval_ds, verbose=0, return_dict=True)["loss"]
    assert last < first and after < 0.5 * before, (history.history["loss"], before, after)
    # The trained embedding separates the classes: nearest neighbour has the same label.
    emb = model.embed(images)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    assert (labels[np.argmax(sims, axis=1)] == labels).mean() > 0.9

    # The trained, compiled model round-trips through .keras with its loss.
    path = str(tmp_path / "trained.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, AdaptiveTripletLoss) and loaded.loss.get_config() == loss.get_config()
    np.testing.assert_allclose(loaded.embed(images), emb, atol=1e-6)
    np.testing.assert_allclose(loaded.evaluate(eval_ds, verbose=0, return_dict=True)["loss"], after, rtol=1e-5)


def test_constructor_errors():
    with pytest.raises(ValueError, match="Unknown pooling 'sum'"):
        ATLModel(pooling="sum")
    with pytest.raises(ValueError, match="embedding_dim must be a positive int"):
        ATLModel(embedding_dim=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        ATLModel(dropout=1.0)


def test_l2_normalization_of_tiny_vectors_and_gradient_matches_reference():
    layer = L2Normalization()
    x = np.array([[1e-12, -3e-12, 2e-12], [1.0, 2.0, -2.0]], np.float32)
    np.testing.assert_allclose(np.linalg.norm(layer(x).numpy(), axis=1), 1.0, rtol=1e-6)
    # Jacobian-vector product of x / ||x|| is (I - u u^T) / ||x|| applied to v.
    x = tf.constant([[1.0, 2.0, -2.0]])
    v = np.array([[0.3, -0.1, 0.5]], np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(layer(x) * v)
    u = x.numpy()[0] / 3.0
    expected = (np.eye(3) - np.outer(u, u)) @ v[0] / 3.0
    np.testing.assert_allclose(tape.gradient(y, x).numpy()[0], expected, rtol=1e-5, atol=1e-7)

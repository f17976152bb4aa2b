"""SourceImages: evaluation rows kept as files give the same rows, pixels, embeddings,
metrics, projector and export as the same rows decoded into memory."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from atl_keras.data.images import ImageDecodeError
from atl_keras.data.source_images import SourceImages, readable_rows
from atl_keras.data.sources import FileImages
from atl_keras.preprocessing import Preprocessing

SIZE = 16


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 non-square JPEGs and PNGs of 4 labels, plus one broken file (row 12)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        pixels = rng.integers(0, 256, (30 + i, 20, 3), dtype=np.uint8)
        path = root / (f"p{i}.jpg" if i % 2 else f"p{i}.png")
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths.append(str(root / "broken.jpg"))
    return paths, np.arange(13) % 4


def memory_images(paths) -> np.ndarray:
    from atl_keras.data.images import decode_images

    images, kept = decode_images(paths, SIZE, strict=True)
    assert kept.all()
    return images


def embedder(seed: int = 0) -> keras.Model:
    """A plain Keras model: pixels [B, 16, 16, 3] in [0, 255] -> unit vectors [B, 8]."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.UnitNormalization()(keras.layers.Dense(8)(x)))


def test_rows_and_pixels_equal_the_decoded_array(photos):
    paths, _ = photos
    prep = Preprocessing(SIZE)
    good = readable_rows(FileImages(paths), prep)
    assert good.tolist() == [True] * 12 + [False]
    images = SourceImages(FileImages(paths[:12]), prep)
    assert len(images) == 12 and images.shape == (12, SIZE, SIZE, 3) and images.ndim == 4
    np.testing.assert_array_equal(images.decode(), memory_images(paths[:12]))


def test_indexing_gives_rows_or_subsets_and_never_a_silent_array(photos):
    paths, _ = photos
    images = SourceImages(FileImages(paths[:12]), Preprocessing(SIZE))
    decoded = memory_images(paths[:12])
    np.testing.assert_array_equal(images[3], decoded[3])
    np.testing.assert_array_equal(images[-1], decoded[11])
    np.testing.assert_array_equal(images[2:8:2].decode(), decoded[2:8:2])
    np.testing.assert_array_equal(images[np.array([5, 0, 5])].decode(), decoded[[5, 0, 5]])
    mask = np.arange(12) % 3 == 0
    np.testing.assert_array_equal(images[mask].decode(), decoded[mask])
    with pytest.raises(IndexError, match="out of range"):
        images[12]
    with pytest.raises(IndexError, match="boolean mask"):
        images[np.ones(3, bool)]
    with pytest.raises(TypeError, match="decode\\(\\)"):
        np.asarray(images)
    broken = SourceImages(FileImages(paths), Preprocessing(SIZE))
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        broken[12]


def test_embeddings_metrics_and_projector_equal_the_decoded_array(photos, tmp_path):
    from atl_keras.embedding import embed_images
    from atl_keras.metrics import RetrievalEvaluation
    from atl_keras.projector import write_projector

    paths, labels = photos
    files = SourceImages(FileImages(paths[:12]), Preprocessing(SIZE))
    decoded = memory_images(paths[:12])
    model = embedder()
    np.testing.assert_allclose(embed_images(model, files, batch_size=5).vectors,
                               embed_images(model, decoded, batch_size=5).vectors, atol=1e-6)
    metrics = []
    for images in (files, decoded):
        evaluation = RetrievalEvaluation(images[:6], labels[:6], images[6:], labels[6:12], ks=(1, 3), batch_size=4)
        evaluation.set_model(model)
        metrics.append(evaluation.evaluate())
    assert metrics[0] == pytest.approx(metrics[1])
    vectors = embed_images(model, decoded).vectors
    rows = [(str(i), "") for i in range(12)]
    a = write_projector(str(tmp_path / "files"), vectors, rows, files)
    b = write_projector(str(tmp_path / "memory"), vectors, rows, decoded)
    assert open(a["sprite"], "rb").read() == open(b["sprite"], "rb").read()


def test_export_from_files_retrieves_as_the_export_from_pixels(photos, tmp_path):
    from atl_keras.export import export_model, load_export

    paths, _ = photos
    files = SourceImages(FileImages(paths[:12]), Preprocessing(SIZE))
    decoded = memory_images(paths[:12])
    model = embedder(1)
    ids = [f"row-{i}" for i in range(12)]
    outputs = []
    for name, gallery in (("files", files), ("memory", decoded)):
        result = export_model(model, gallery, ids, str(tmp_path / name), include_scann=False)
        query = tf.constant([open(p, "rb").read() for p in paths[:4]])
        outputs.append(load_export(result.path).signatures["retrieve_exact"](images=query, k=tf.constant(3)))
    for key in ("indices", "scores"):
        np.testing.assert_allclose(outputs[0][key].numpy(), outputs[1][key].numpy(), atol=1e-6)
    assert outputs[0]["indices"].numpy()[:, 0].tolist() == [0, 1, 2, 3]

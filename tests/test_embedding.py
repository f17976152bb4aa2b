"""atl_keras.embedding: one streaming image -> embedding path and one weight fingerprint."""

from __future__ import annotations

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from atl_keras.data.images import ImageDecodeError
from atl_keras.data.sources import FileImages
from atl_keras.embedding import embed_batches, embed_images, EmbeddingReport, weights_fingerprint
from atl_keras.preprocessing import Preprocessing, decode_image

SIZE = (16, 16)


def tiny_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*SIZE, 3))
    x = keras.layers.Conv2D(4, 3, strides=2)(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.Dense(6)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, keras.layers.UnitNormalization()(x))


def write_images(folder, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:04d}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(rng.integers(0, 256, (10 + i % 7, 14 + i % 5, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def reference(model: keras.Model, paths: list[str]) -> np.ndarray:
    """The model applied to each file decoded alone with the shared preprocessing."""
    prep = Preprocessing(SIZE)
    pixels = np.stack([decode_image(tf.io.read_file(p), prep).numpy() for p in paths]).astype(np.float32)
    return model(pixels, training=False).numpy()


def test_every_source_gives_the_model_applied_to_the_preprocessed_images(tmp_path):
    model = tiny_model()
    paths = write_images(str(tmp_path), 23)
    expected = reference(model, paths)
    encoded = [open(p, "rb").read() for p in paths]
    prep = Preprocessing(SIZE)
    pixels = np.stack([decode_image(tf.constant(b), prep).numpy() for b in encoded])
    sources = {
        "paths": paths,
        "FileImages": FileImages(paths),
        "pathlike": [tmp_path / os.path.basename(p) for p in paths],
        "bytes": encoded,
        "string array": np.array(encoded, dtype=object),
        "pixels": pixels,
        "dataset of bytes": tf.data.Dataset.from_tensor_slices(encoded),
        "dataset of batches": tf.data.Dataset.from_tensor_slices(pixels).batch(5),
        "dataset of (x, y)": tf.data.Dataset.from_tensor_slices((pixels, np.arange(23))).batch(4),
    }
    for name, source in sources.items():
        result = embed_images(model, source, batch_size=4)
        assert result.kept.all() and result.report.embedded == 23, name
        np.testing.assert_allclose(result.vectors, expected, atol=1e-5, err_msg=name)


def test_batches_stream_in_row_order_with_their_row_indices(tmp_path):
    model = tiny_model()
    paths = write_images(str(tmp_path), 11)
    batches = list(embed_batches(model, paths, batch_size=3))
    assert [len(i) for i, _ in batches] == [3, 3, 3, 2]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in batches]), np.arange(11))
    assert all(v.dtype == np.float32 and v.shape[1] == 6 for _, v in batches)


def _png_declaring(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


def test_bad_rows_are_skipped_counted_and_summarised(tmp_path):
    model = tiny_model()
    paths = write_images(str(tmp_path), 12)
    open(paths[2], "wb").close()                                   # empty
    os.remove(paths[4])                                            # missing
    with open(paths[6], "wb") as f:                                # not an image
        f.write(b"this is not an image" * 20)
    with open(paths[8], "wb") as f:                                # truncated JPEG
        f.write(open(paths[10], "rb").read()[:60])
    with open(paths[9], "wb") as f:                                # a header declaring 10^10 pixels
        f.write(_png_declaring(100_000, 100_000))
    good = [i for i in range(12) if i not in (2, 4, 6, 8, 9)]
    result = embed_images(model, paths, batch_size=4)
    np.testing.assert_array_equal(np.flatnonzero(result.kept), good)
    np.testing.assert_allclose(result.vectors, reference(model, [paths[i] for i in good]), atol=1e-5)
    report = result.report
    assert (report.rows, report.embedded) == (12, 7)
    np.testing.assert_array_equal(report.skipped, [2, 4, 6, 8, 9])
    assert report.reasons == {"missing or empty": 2, "cannot be decoded": 2, "too many pixels": 1}
    summary = report.summary()
    assert summary.startswith("5 of 12 images skipped") and os.path.basename(paths[9]) in summary
    with pytest.raises(ImageDecodeError, match="5 of 12 images skipped") as info:
        embed_images(model, paths, strict=True)
    assert info.value.indices == [2, 4, 6, 8, 9]
    # the same bytes in memory: the same rows survive
    encoded = [open(p, "rb").read() if os.path.exists(p) else b"" for p in paths]
    np.testing.assert_array_equal(embed_images(model, encoded).kept, result.kept)
    from_source = embed_images(model, FileImages(paths))
    np.testing.assert_array_equal(from_source.kept, result.kept)
    assert from_source.report.reasons == report.reasons


def test_the_catalog_is_read_as_it_is_embedded_not_before(tmp_path):
    """Files far past the first batch are read only when their turn comes: deleting them
    after the first batch makes them 'missing', so nothing held them in memory."""
    model = tiny_model()
    paths = write_images(str(tmp_path), 400)
    report = EmbeddingReport()
    stream = embed_batches(model, paths, batch_size=8, report=report)
    first, _ = next(stream)
    np.testing.assert_array_equal(first, np.arange(8))
    for path in paths[200:]:
        os.remove(path)
    rest = np.concatenate([indices for indices, _ in stream])
    assert rest[0] == 8 and rest[-1] < 200
    assert report.rows == 400 and report.reasons == {"missing or empty": 200}
    np.testing.assert_array_equal(report.skipped, np.arange(200, 400))


def test_a_callable_model_and_wrong_inputs(tmp_path):
    model = tiny_model()
    paths = write_images(str(tmp_path), 5)
    signature = tf.function(lambda x: model(x, training=False))
    result = embed_images(signature, paths, preprocessing=Preprocessing(SIZE))
    np.testing.assert_allclose(result.vectors, reference(model, paths), atol=1e-5)
    with pytest.raises(ValueError, match="preprocessing="):
        embed_images(signature, paths)
    with pytest.raises(TypeError, match="single str"):
        embed_images(model, paths[0])
    with pytest.raises(ValueError, match="already be preprocessed"):
        embed_images(model, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="batch_size"):
        embed_images(model, paths, batch_size=0)
    with pytest.raises(ValueError, match="infinite"):
        embed_images(model, tf.data.Dataset.from_tensor_slices(paths).repeat())


def test_one_fingerprint_for_the_same_weights_whatever_their_names(tmp_path):
    first, second = tiny_model(seed=3), tiny_model(seed=3)  # second's layers are auto-named conv2d_1, ...
    assert [w.path for w in first.weights] != [w.path for w in second.weights]
    assert weights_fingerprint(first) == weights_fingerprint(second)
    path = str(tmp_path / "m.keras")
    first.save(path)
    assert weights_fingerprint(keras.models.load_model(path)) == weights_fingerprint(first)
    assert weights_fingerprint(tiny_model(seed=4)) != weights_fingerprint(first)

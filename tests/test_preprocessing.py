"""The one preprocessing everywhere: in-memory catalog images resize exactly like decoded files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atl_keras.data.catalog import Catalog
from atl_keras.data.images import decode_images


def _non_square(seed: int, n: int = 3, height: int = 20, width: int = 44) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("resize, pad_value", [("pad", 255), ("pad", 0), ("stretch", 255)])
def test_in_memory_non_square_images_match_the_training_file_decode(tmp_path, resize, pad_value):
    images = _non_square(0)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])  # lossless: the file holds the same pixels
    catalog = Catalog(item_ids=["a", "b", "c"], descriptions=["", "", ""], labels=np.arange(3),
                      domains=["catalog"] * 3, splits=["train"] * 3, images=images)

    in_memory, kept = catalog.load_images(16, resize=resize, pad_value=pad_value)
    from_files, kept_files = decode_images(paths, 16, resize=resize, pad_value=pad_value)

    assert kept.all() and kept_files.all()
    assert in_memory.shape == (3, 16, 16, 3) and in_memory.dtype == np.uint8
    np.testing.assert_array_equal(in_memory, from_files)
    if resize == "pad":  # 20x44 -> 7x16 (aspect kept), centred: rows 0-3 and 11-15 are border
        assert np.all(in_memory[:, :4] == pad_value) and np.all(in_memory[:, 11:] == pad_value)
        # the picture itself is an area average of the original (a 44->16 box filter, checked on the mean)
        np.testing.assert_allclose(in_memory[:, 4:11].mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3)), atol=3)
    else:  # stretched: no border, every row is picture
        assert not np.all(in_memory[:, 0] == pad_value)

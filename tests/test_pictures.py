"""Result pictures: grid tiles show the rows' images (by image id or path), correct ones framed."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from atl_keras.search import RetrievalIndex, calibrate_threshold
from atl_keras.search.pictures import neighbour_grid, plot_precision_recall
from atl_keras.serving.client import Neighbors, save_grid

COLOURS = {"red": [255, 0, 0], "blue": [0, 0, 255], "yellow": [255, 255, 0], "magenta": [255, 0, 255]}


def solid_png(colour: str, size: int = 10) -> bytes:
    return tf.io.encode_png(tf.constant(np.tile(np.array(COLOURS[colour], np.uint8), (size, size, 1)))).numpy()


def count(png_path, colour: str) -> int:
    pixels = tf.io.decode_png(open(png_path, "rb").read(), channels=3).numpy()
    return int(np.sum(np.all(pixels == COLOURS[colour], axis=-1)))


def test_query_grid_finds_images_by_image_id_and_by_path(tmp_path):
    """`atl query --grid`: catalog results name image ids (several images per item, `#n`) or paths."""
    gallery = tmp_path / "catalog"
    (gallery / "shirts").mkdir(parents=True)
    (gallery / "item_00149#2.png").write_bytes(solid_png("red"))
    (gallery / "shirts" / "blue.png").write_bytes(solid_png("blue"))
    results = [Neighbors(["item_00149", "shirt-7"], [0.98, 0.9], ["item_00149#2", "shirts/blue.png"], [{}, {}])]
    save_grid(tmp_path / "grid.png", [solid_png("yellow")], results, gallery)
    for colour in ("red", "blue", "yellow"):  # both result tiles and the query show their image
        assert count(tmp_path / "grid.png", colour) > 50 * 50, colour


def test_index_grid_marks_correct_results_and_shows_every_tile(tmp_path):
    colours = ["red", "blue", "magenta"]
    paths = []
    for colour in colours:
        paths.append(str(tmp_path / f"{colour}.png"))
        with open(paths[-1], "wb") as f:
            f.write(solid_png(colour))
    gallery = np.eye(3, dtype=np.float32)
    index = RetrievalIndex.from_embeddings(gallery, ["r", "b", "m"], image_ids=paths)
    queries = [tf.io.decode_png(solid_png("yellow")).numpy()] * 2
    # the index has no model: look up embeddings, draw the pictures with the function
    rows, scores = index.search(np.array([[1.0, 0.2, 0.0], [0.0, 0.1, 1.0]], np.float32), 3)
    ids = np.array(index.ids, dtype=object)[rows]
    fig = neighbour_grid(tmp_path / "grid.png", queries, index.image_ids_of(rows).tolist(), ids.tolist(), scores,
                         correct=ids == np.array([["r"], ["m"]], dtype=object))
    for colour in colours:
        assert count(tmp_path / "grid.png", colour) > 2 * 50 * 50, colour  # each image in both rows
    frames = [ax.spines["top"].get_edgecolor() for ax in fig.axes if ax.get_title() and "\n" in ax.get_title()]
    assert len(frames) == 6 and sum(np.allclose(c[:3], (0x1A / 255, 0x96 / 255, 0x41 / 255)) for c in frames) == 2


def test_precision_recall_plot_is_written(tmp_path):
    result = calibrate_threshold(list("aabbc"), [0.9, 0.8, 0.7, 0.6, 0.5], list("aXbYc"), 0.6, confidence=None)
    plot_precision_recall(tmp_path / "pr.png", result)
    assert (tmp_path / "pr.png").read_bytes().startswith(b"\x89PNG")

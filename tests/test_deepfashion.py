"""DeepFashion In-shop reader against a tiny fixture written in the official layout."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from atl_keras.data.deepfashion import inshop_query_gallery, read_deepfashion_inshop
from atl_keras.data.images import ImageDecodeError

# (image_name, item_id, evaluation_status) exactly as list_eval_partition.txt lists them.
ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000080/01_1_front.png", "id_00000080", "train"),
    ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "train"),
    ("img/WOMEN/Tees_Tanks/id_00000100/01_1_front.jpg", "id_00000100", "query"),
    ("img/WOMEN/Tees_Tanks/id_00000100/01_2_side.jpg", "id_00000100", "gallery"),
    ("img/WOMEN/Tees_Tanks/id_00000100/01_3_back.jpg", "id_00000100", "gallery"),
    ("img/MEN/Shirts_Polos/id_00000200/02_1_front.jpg", "id_00000200", "gallery"),
    ("img/MEN/Shirts_Polos/id_00000200/02_4_full.jpg", "id_00000200", "query"),
]
CORRUPT = 6  # this row's file holds garbage bytes

DESCRIPTIONS = [
    {"item": "id_00000002", "color": "Pink", "description": ["A floral dress,", "  in soft chiffon."]},
    {"item": "id_00000080", "color": "Blue-denim", "description": "Slim jeans with five pockets."},
    {"item": "id_00000100", "color": "White", "description": []},
    # id_00000200 has no entry: its description is None
    {"item": "id_99999999", "color": "Red", "description": ["An item with no images."]},
]


def write_partition(root, rows, declared=None, header="image_name item_id evaluation_status"):
    os.makedirs(os.path.join(root, "Eval"), exist_ok=True)
    lines = [str(len(rows) if declared is None else declared), header]
    lines += [f"{name:<60} {item} {status}" for name, item, status in rows]  # official files pad with spaces
    with open(os.path.join(root, "Eval", "list_eval_partition.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def make_inshop(root, image_dir: str = "", rows=ROWS) -> list[np.ndarray]:
    """Write the fixture under ``root``; images go under ``root/<image_dir>/img/...``."""
    write_partition(root, rows)
    os.makedirs(os.path.join(root, "Anno"), exist_ok=True)
    with open(os.path.join(root, "Anno", "list_description_inshop.json"), "w") as f:
        json.dump(DESCRIPTIONS, f)
    rng = np.random.default_rng(0)
    arrays = []
    for index, (name, _, _) in enumerate(rows):
        path = os.path.join(root, image_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        array = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)  # 16 x 12: portrait like In-shop
        arrays.append(array)
        if index == CORRUPT:
            with open(path, "wb") as f:
                f.write(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
        else:
            Image.fromarray(array).save(path, quality=95) if name.endswith(".jpg") else Image.fromarray(array).save(path)
    return arrays


def test_reads_official_layout(tmp_path):
    make_inshop(tmp_path)
    cat = read_deepfashion_inshop(tmp_path)
    assert len(cat) == len(ROWS)
    assert cat.item_ids == ["id_00000002", "id_00000080", "id_00000100", "id_00000200"]
    assert cat.descriptions == ["A floral dress, in soft chiffon.", "Slim jeans with five pockets.", None, None]
    np.testing.assert_array_equal(cat.labels, [0, 0, 1, 1, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(cat.splits, [s for _, _, s in ROWS])
    np.testing.assert_array_equal(cat.domains, ["shop"] * 4 + ["query", "gallery", "gallery", "gallery", "query"])
    assert cat.image_paths == [os.path.join(str(tmp_path), name) for name, _, _ in ROWS]
    assert cat.item_attributes[0] == {"color": "Pink"} and cat.item_attributes[3] == {}
    # train and test items are disjoint; query and gallery share the test items.
    train = cat.split("train")
    query, gallery = inshop_query_gallery(cat)
    assert set(train.labels) & set(query.labels) == set()
    assert set(query.labels) == set(gallery.labels) == {2, 3}
    np.testing.assert_array_equal(query.labels, [2, 3])
    assert len(gallery) == 3
    q2, g2 = cat.query_gallery("query", "gallery", split=None)
    np.testing.assert_array_equal(q2.labels, query.labels)
    np.testing.assert_array_equal(g2.labels, gallery.labels)


def test_include_color_and_img_under_Img(tmp_path):
    make_inshop(tmp_path, image_dir="Img")
    cat = read_deepfashion_inshop(tmp_path, include_color=True)
    assert cat.descriptions[0] == "Pink. A floral dress, in soft chiffon."
    assert cat.descriptions[2] == "White"
    assert cat.image_paths[0] == os.path.join(str(tmp_path), "Img", ROWS[0][0])


def test_corrupt_image_skipped_with_warning_or_strict_error(tmp_path):
    arrays = make_inshop(tmp_path)
    cat = read_deepfashion_inshop(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, kept = cat.load_images((16, 12))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "1 of 9 image files" in messages[0]
    assert "01_3_back.jpg" in messages[0]
    np.testing.assert_array_equal(np.flatnonzero(~kept), [CORRUPT])
    assert images.shape == (8, 16, 12, 3)
    png_row = 2  # the PNG round-trips exactly; JPEGs are close to the written pixels
    np.testing.assert_array_equal(images[png_row], arrays[png_row])
    pil_jpeg = np.asarray(Image.open(cat.image_paths[0]).convert("RGB"), float)
    assert np.abs(images[0] - pil_jpeg).mean() < 3.0  # TF and PIL decode the same JPEG alike
    with pytest.raises(ImageDecodeError, match="01_3_back.jpg"):
        cat.load_images(16, strict=True)


def test_missing_files_name_the_file_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*Eval/list_eval_partition.txt"):
        read_deepfashion_inshop(tmp_path / "nope")
    make_inshop(tmp_path)
    os.remove(tmp_path / "Anno" / "list_description_inshop.json")
    with pytest.raises(FileNotFoundError, match="list_description_inshop.json"):
        read_deepfashion_inshop(tmp_path)


def test_missing_image_folder(tmp_path):
    write_partition(tmp_path, ROWS)
    os.makedirs(tmp_path / "Anno")
    (tmp_path / "Anno" / "list_description_inshop.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="image folder .*img"):
        read_deepfashion_inshop(tmp_path)
    cat = read_deepfashion_inshop(tmp_path, check_images=False)
    assert cat.descriptions == [None] * 4


def test_malformed_partition_files(tmp_path):
    make_inshop(tmp_path)
    write_partition(tmp_path, ROWS, declared=99)
    with pytest.raises(ValueError, match="declares 99 rows but the file has 9"):
        read_deepfashion_inshop(tmp_path)
    write_partition(tmp_path, ROWS, header="image item status")
    with pytest.raises(ValueError, match="list_eval_partition.txt:2: expected the header"):
        read_deepfashion_inshop(tmp_path)
    write_partition(tmp_path, [*ROWS[:-1], (ROWS[-1][0], ROWS[-1][1], "test")])
    with pytest.raises(ValueError, match="list_eval_partition.txt:11: evaluation_status must be one of"):
        read_deepfashion_inshop(tmp_path)
    write_partition(tmp_path, [*ROWS, ("img/x.jpg", "id_00000002", "query")])
    with pytest.raises(ValueError, match="item 'id_00000002' is in split 'train' and in split 'query'"):
        read_deepfashion_inshop(tmp_path)


def test_malformed_description_file(tmp_path):
    make_inshop(tmp_path)
    (tmp_path / "Anno" / "list_description_inshop.json").write_text('{"item": "x"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_deepfashion_inshop(tmp_path)
    (tmp_path / "Anno" / "list_description_inshop.json").write_text('[{"description": "no item"}]')
    with pytest.raises(ValueError, match="entry 0 has no 'item' key"):
        read_deepfashion_inshop(tmp_path)

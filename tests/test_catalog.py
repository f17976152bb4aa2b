"""Catalog, assign_splits, read_catalog (CSV/JSONL) and the image decoding pipeline."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from atl_keras.data.catalog import Catalog, assign_splits, check_disjoint_splits, read_catalog
from atl_keras.data.images import ImageDecodeError, decode_images, find_invalid_images, image_dataset


# ------------------------------------------------------------------------------ helpers
def small_catalog(with_images: bool = True) -> Catalog:
    """4 items x (2 catalog + 1 street) rows; pixel value = row index, so rows are traceable."""
    labels = np.repeat(np.arange(4), 3)
    domains = np.array(["catalog", "catalog", "street"] * 4)
    splits = np.array(["train"] * 6 + ["val"] * 3 + ["test"] * 3)
    images = np.arange(12, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    return Catalog(
        item_ids=["a", "b", "c", "d"],
        descriptions=["red tee", None, "blue tee", ""],
        labels=labels,
        domains=domains,
        splits=splits,
        images=images if with_images else None,
        image_paths=None if with_images else [f"/nowhere/{i}.png" for i in range(12)],
    )


def write_png(path, array: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def recorded(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------ Catalog
def test_catalog_len_subset_split_keep_item_table():
    cat = small_catalog()
    assert len(cat) == 12 and cat.num_items == 4
    sub = cat.subset(cat.domains == "street")
    assert len(sub) == 4
    np.testing.assert_array_equal(sub.labels, [0, 1, 2, 3])
    np.testing.assert_array_equal(sub.images[:, 0, 0, 0], [2, 5, 8, 11])  # rows travel with their images
    assert sub.item_ids == cat.item_ids  # labels keep indexing the same item table
    by_index = cat.subset([11, 0])
    np.testing.assert_array_equal(by_index.images[:, 0, 0, 0], [11, 0])
    np.testing.assert_array_equal(by_index.splits, ["test", "train"])
    train = cat.split("train")
    assert set(train.labels.tolist()) == {0, 1} and len(train) == 6
    assert len(cat.split(["val", "test"])) == 6
    with pytest.raises(ValueError, match="No rows in split 'nope'.*splits \\['test', 'train', 'val'\\]"):
        cat.split("nope")
    with pytest.raises(ValueError, match="bool mask must have shape \\[12\\]"):
        cat.subset(np.ones(3, bool))


def test_row_views_and_compact():
    cat = small_catalog()
    test = cat.split("test")
    assert test.row_item_ids == ["d", "d", "d"]
    assert cat.row_descriptions[:3] == ["red tee"] * 3
    assert cat.descriptions[3] == ""  # "" stays "" (missing); None stays None
    compact = test.compact()
    assert compact.item_ids == ["d"] and compact.descriptions == [""]
    np.testing.assert_array_equal(compact.labels, [0, 0, 0])


def test_query_gallery_cross_domain_and_errors():
    cat = small_catalog()
    query, gallery = cat.query_gallery()
    np.testing.assert_array_equal(query.images[:, 0, 0, 0], [11])
    np.testing.assert_array_equal(gallery.images[:, 0, 0, 0], [9, 10])
    assert set(query.labels) <= set(gallery.labels)
    query_all, _ = cat.query_gallery(split=None)
    assert len(query_all) == 4
    with pytest.raises(ValueError, match="found 0 query and 2 gallery rows.*'street'"):
        cat.query_gallery(query_domain="phone")


def test_catalog_validation_errors():
    base = dict(item_ids=["a", "b"], descriptions=["x", "y"], domains=["c"] * 2, splits=["train"] * 2,
                images=np.zeros((2, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="labels must index item_ids"):
        Catalog(labels=np.array([0, 2]), **base)
    with pytest.raises(ValueError, match="item_ids must be unique"):
        Catalog(**{**base, "item_ids": ["a", "a"]}, labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="domains must have one entry per row"):
        Catalog(**{**base, "domains": ["c"]}, labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="needs images .* image_paths .* or image_records"):
        Catalog(**{**base, "images": None}, labels=np.array([0, 1]))


def test_load_images_in_memory_resizes_only_when_needed():
    cat = small_catalog()
    same, kept = cat.load_images(4)
    assert same is cat.images and kept.all()
    bigger, kept = cat.load_images((8, 6))
    assert bigger.shape == (12, 8, 6, 3) and bigger.dtype == np.uint8
    np.testing.assert_array_equal(bigger[:, 4, 3, 0], np.arange(12))  # constant images stay constant
    np.testing.assert_array_equal(bigger[:, 0, 0, 0], np.full(12, 255))  # padded like training (4x4 -> 6x6 + 1 row each side)


# --------------------------------------------------------------------------- assign_splits
def test_assign_splits_disjoint_exact_counts_and_deterministic():
    items = [f"sku{i}" for i in range(100)]
    split = assign_splits(items + items[:10], (0.7, 0.1, 0.2), seed=3)  # repeats are fine
    assert sorted(split) == sorted(items)  # every item exactly once -> disjoint by construction
    counts = {name: sum(v == name for v in split.values()) for name in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 10, "test": 20}
    assert assign_splits(list(reversed(items)), (0.7, 0.1, 0.2), seed=3) == split  # order-independent
    other = assign_splits(items, (0.7, 0.1, 0.2), seed=4)
    assert other != split and sorted(other.values()) == sorted(split.values())


def test_assign_splits_rounding_and_bad_fractions():
    split = assign_splits(["a", "b", "c"], (0.5, 0.0, 0.5), seed=0)
    assert sorted(split.values()).count("val") == 0 and len(split) == 3
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(["a"], (0.5, 0.1, 0.2))
    with pytest.raises(ValueError, match="one fraction per split name"):
        assign_splits(["a"], (0.5, 0.5))


def test_check_disjoint_splits_allows_query_and_gallery():
    check_disjoint_splits(["a", "a", "b"], ["query", "gallery", "train"])
    with pytest.raises(ValueError, match="item 'a' is in split 'train' and in split 'test'"):
        check_disjoint_splits(["a", "a"], ["train", "test"])


# ------------------------------------------------------------------------------ CSV / JSONL
@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a1", "a2", "b1", "c1", "d1", "d2"):
        write_png(str(tmp_path / "imgs" / f"{name}.png"), rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return tmp_path


def test_read_csv_relative_paths_defaults_and_assigned_splits(image_folder):
    path = image_folder / "shop.csv"
    path.write_text(
        "image,item_id,description,domain\n"
        'imgs/a1.png,A,"Red tee, short sleeves",catalog\n'
        "imgs/a2.png,A,,street\n"
        "imgs/b1.png,B,Blue dress,\n"
        "imgs/c1.png,C,,catalog\n"
        f"{image_folder / 'imgs' / 'd1.png'},D,Black boot,street\n",
        encoding="utf-8",
    )
    cat = read_catalog(path, split_fractions=(0.5, 0.25, 0.25), seed=1)
    assert cat.item_ids == ["A", "B", "C", "D"]
    assert cat.descriptions == ["Red tee, short sleeves", "Blue dress", None, "Black boot"]
    np.testing.assert_array_equal(cat.labels, [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(cat.domains, ["catalog", "street", "catalog", "catalog", "street"])
    assert cat.image_paths[0] == str(image_folder / "imgs" / "a1.png")
    assert cat.image_paths[4] == str(image_folder / "imgs" / "d1.png")  # absolute path kept
    expected = assign_splits(["A", "B", "C", "D"], (0.5, 0.25, 0.25), seed=1)
    assert [str(s) for s in cat.splits] == [expected[i] for i in cat.row_item_ids]
    images, kept = cat.load_images(8)
    assert images.shape == (5, 8, 8, 3) and kept.all()


def test_read_jsonl_with_image_root_and_given_splits(image_folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    path = other / "shop.jsonl"
    rows = [
        {"image": "imgs/a1.png", "item_id": "A", "description": ["Red", "tee"], "split": "train"},
        {"image": "imgs/b1.png", "item_id": "B", "description": None, "split": "query", "domain": "street"},
        {"image": "imgs/c1.png", "item_id": "B", "description": "Blue dress", "split": "gallery"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    cat = read_catalog(path, image_root=image_folder)
    assert cat.descriptions == ["Red tee", "Blue dress"]  # lists joined; a later row fills a missing text
    np.testing.assert_array_equal(cat.splits, ["train", "query", "gallery"])
    assert cat.image_paths[1] == os.path.join(str(image_folder), "imgs/b1.png")
    query, gallery = cat.query_gallery("street", "catalog", split=["query", "gallery"])
    assert len(query) == 1 and len(gallery) == 1 and query.labels[0] == gallery.labels[0]


def test_read_catalog_errors_name_file_and_line(tmp_path):
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("image,item\nx.png,A\n")
    with pytest.raises(ValueError, match=r"h\.csv:1: header is missing column\(s\) \['item_id', 'description'\]"):
        read_catalog(bad_header)
    bad_row = tmp_path / "r.csv"
    bad_row.write_text("image,item_id,description\nx.png,A,ok\ny.png,B,too,many,fields\n")
    with pytest.raises(ValueError, match=r"r\.csv:3: bad row"):
        read_catalog(bad_row)
    empty_item = tmp_path / "e.csv"
    empty_item.write_text("image,item_id,description\nx.png,,text\n")
    with pytest.raises(ValueError, match=r"e\.csv:2: empty 'item_id'"):
        read_catalog(empty_item)
    jsonl = tmp_path / "k.jsonl"
    jsonl.write_text('{"image": "x.png", "item_id": "A", "description": ""}\n{"image": "y.png", "item_id": "B"}\n')
    with pytest.raises(ValueError, match=r"k\.jsonl:2: missing key 'description'"):
        read_catalog(jsonl)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"image": "x.png", "item_id": "A", "description": ""}\n{not json\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not valid JSON"):
        read_catalog(broken)
    partial = tmp_path / "p.csv"
    partial.write_text("image,item_id,description,split\nx.png,A,,train\ny.png,B,,\n")
    with pytest.raises(ValueError, match=r"p\.csv:3: empty split"):
        read_catalog(partial)
    leaky = tmp_path / "l.csv"
    leaky.write_text("image,item_id,description,split\nx.png,A,,train\ny.png,A,,test\n")
    with pytest.raises(ValueError, match=r"l\.csv:3: item 'A' is in split 'train' and in split 'test'"):
        read_catalog(leaky)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_catalog(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="unknown catalog format"):
        (tmp_path / "x.txt").write_text("a")
        read_catalog(tmp_path / "x.txt")
    listed = tmp_path / "f.csv"
    listed.write_text("image,item_id,description\nnot_there.png,A,\n")
    with pytest.raises(FileNotFoundError, match="not_there.png"):
        read_catalog(listed, check_files=True)


def test_conflicting_descriptions_first_wins_with_one_warning_or_error(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text(
        "image,item_id,description\n"
        "1.png,A,Red tee\n"
        "2.png,A,Red t-shirt\n"
        "3.png,A,Red tee\n"
        "4.png,B,Blue\n"
        "5.png,B,Navy\n"
    )
    cat, messages = recorded(read_catalog, path)
    assert cat.descriptions == ["Red tee", "Blue"]
    assert len(messages) == 1
    assert "2 conflicting descriptions" in messages[0] and "c.csv:3: item 'A'" in messages[0]
    assert "c.csv:6: item 'B'" in messages[0]
    with pytest.raises(ValueError, match=r"c\.csv:3: item 'A' has description 'Red t-shirt', but line 2"):
        read_catalog(path, on_conflict="error")


# ------------------------------------------------------------------------------ images.py
def test_decode_formats_match_pil_reference(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((12, 10, 1), 255, np.uint8)], axis=-1)
    paths = [
        write_png(str(tmp_path / "rgb.png"), rgb),
        write_png(str(tmp_path / "gray.png"), gray),
        write_png(str(tmp_path / "rgba.png"), rgba),
        write_png(str(tmp_path / "rgb.bmp"), rgb),
        write_png(str(tmp_path / "rgb.jpg"), rgb),
        write_png(str(tmp_path / "rgb.gif"), rgb),
    ]
    images, kept = decode_images(paths, (12, 10), resize="stretch")  # same size: no resampling
    assert images.shape == (6, 12, 10, 3) and images.dtype == np.uint8 and kept.all()
    np.testing.assert_array_equal(images[0], rgb)
    np.testing.assert_array_equal(images[1], np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(images[2], rgb)
    np.testing.assert_array_equal(images[3], rgb)
    pil_jpeg = np.asarray(Image.open(paths[4]).convert("RGB"), np.float32)
    assert np.abs(images[4].astype(np.float32) - pil_jpeg).mean() < 3.0  # two JPEG decoders agree
    pil_gif = np.asarray(Image.open(paths[5]).convert("RGB"))
    np.testing.assert_array_equal(images[5], pil_gif)
    gray_out, _ = decode_images(paths[:2], (12, 10), channels=1, resize="stretch")
    np.testing.assert_array_equal(gray_out[1, ..., 0], gray)


def test_pad_resize_preserves_aspect_and_fills_borders(tmp_path):
    tall = np.zeros((12, 6, 3), np.uint8)
    tall[..., 0] = 200
    path = write_png(str(tmp_path / "tall.png"), tall)
    (padded,), _ = decode_images([path], 12, pad_value=255)
    np.testing.assert_array_equal(padded[:, :3], 255)  # 3 border columns each side
    np.testing.assert_array_equal(padded[:, 9:], 255)
    np.testing.assert_array_equal(padded[:, 3:9], tall)
    (stretched,), _ = decode_images([path], 12, resize="stretch")
    np.testing.assert_array_equal(stretched[..., 0], 200)


@pytest.mark.parametrize("resize", ["pad", "stretch"])
def test_large_jpeg_downscale_matches_pil_reference(tmp_path, resize):
    # Smooth 256 x 176 image: decoded at reduced DCT scale by the JPEG fast path, then resized.
    yy, xx = np.mgrid[0:256, 0:176].astype(np.float32)
    smooth = np.stack([yy, xx * 1.4, 128 + 100 * np.sin(yy / 20) * np.cos(xx / 25)], axis=-1).astype(np.uint8)
    path = str(tmp_path / "big.jpg")
    Image.fromarray(smooth).save(path, quality=95)
    (out,), _ = decode_images([path], 32, resize=resize)
    decoded = Image.open(path).convert("RGB")
    if resize == "pad":  # 256 x 176 -> 32 x 22, centred: 5 white columns left, 5 right
        np.testing.assert_array_equal(out[:, :5], 255)
        np.testing.assert_array_equal(out[:, 27:], 255)
        out, reference = out[:, 5:27], np.asarray(decoded.resize((22, 32), Image.Resampling.BILINEAR))
    else:
        reference = np.asarray(decoded.resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(np.float32) - reference).mean() < 3.0


@pytest.fixture
def good_and_bad_files(tmp_path):
    rng = np.random.default_rng(2)
    good = [write_png(str(tmp_path / f"ok{i}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for i in range(4)]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(good[0], "rb").read()[:60])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = str(tmp_path / "missing.png")
    paths = [good[0], str(corrupt), good[1], missing, good[2], str(truncated), str(empty), good[3]]
    return paths, np.array([True, False, True, False, True, False, False, True])


def test_bad_files_skipped_with_one_warning_naming_them(good_and_bad_files):
    paths, expected = good_and_bad_files
    (images, kept), messages = recorded(decode_images, paths, 8)
    np.testing.assert_array_equal(kept, expected)
    assert images.shape == (4, 8, 8, 3)
    reference = np.stack([np.asarray(Image.open(p)) for p, ok in zip(paths, expected) if ok])
    np.testing.assert_array_equal(images, reference)
    assert len(messages) == 1
    assert messages[0].startswith("4 of 8 image files are missing, empty or cannot be decoded")
    for name in ("corrupt.jpg", "missing.png", "truncated.png", "empty.png"):
        assert name in messages[0]
    np.testing.assert_array_equal(find_invalid_images(paths), ~expected)


def test_strict_raises_naming_every_bad_file(good_and_bad_files):
    paths, expected = good_and_bad_files
    with pytest.raises(ImageDecodeError, match="corrupt.jpg") as info:
        decode_images(paths, 8, strict=True)
    assert info.value.indices == np.flatnonzero(~expected).tolist()
    assert [os.path.basename(p) for p in info.value.paths] == ["corrupt.jpg", "missing.png", "truncated.png", "empty.png"]
    with pytest.raises(ImageDecodeError, match="missing.png"):
        image_dataset(paths, 8, strict=True)


def test_image_dataset_yields_indices_of_good_rows(good_and_bad_files):
    paths, expected = good_and_bad_files
    ds, messages = recorded(image_dataset, paths, (8, 6))
    assert len(messages) == 1 and "truncated.png" in messages[0]
    items = list(ds.as_numpy_iterator())
    assert [int(i) for _, i in items] == np.flatnonzero(expected).tolist()
    assert all(image.shape == (8, 6, 3) and image.dtype == np.uint8 for image, _ in items)
    lazy, messages = recorded(image_dataset, paths, 8, validate=False)
    assert len(messages) == 1 and "missing.png" in messages[0] and "corrupt.jpg" not in messages[0]
    assert [int(i) for _, i in lazy.as_numpy_iterator()] == np.flatnonzero(expected).tolist()


def test_catalog_load_images_and_with_images_from_files(good_and_bad_files):
    paths, expected = good_and_bad_files
    cat = Catalog(item_ids=[str(i) for i in range(8)], descriptions=[None] * 8, labels=np.arange(8),
                  domains=["catalog"] * 8, splits=["train"] * 8, image_paths=paths)
    (images, kept), messages = recorded(cat.load_images, 8)
    np.testing.assert_array_equal(kept, expected)
    assert len(messages) == 1
    with pytest.raises(ImageDecodeError, match="empty.png"):
        cat.load_images(8, strict=True)
    loaded, _ = recorded(cat.with_images, 8)
    assert len(loaded) == 4 and loaded.images.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(loaded.labels, np.flatnonzero(expected))


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match="image_size must be"):
        decode_images([], 0)
    with pytest.raises(ValueError, match="resize must be one of"):
        decode_images([], 8, resize="crop")
    with pytest.raises(TypeError, match="single path"):
        decode_images("one.png", 8)
    images, kept = decode_images([], 8)
    assert images.shape == (0, 8, 8, 3) and kept.shape == (0,)

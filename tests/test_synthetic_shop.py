"""Synthetic shop: determinism, layout, description variety, disjoint splits, renderings."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from atl_keras.data.synthetic_shop import (
    CATEGORIES,
    _all_items,
    contact_sheet,
    describe_item,
    make_synthetic_shop,
)

NUM_ITEMS = 40


@pytest.fixture(scope="module")
def shop():
    return make_synthetic_shop(num_items=NUM_ITEMS, catalog_per_item=2, street_per_item=3, image_size=32, seed=7)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_same_seed_identical_other_seed_different(shop):
    again = make_synthetic_shop(num_items=NUM_ITEMS, catalog_per_item=2, street_per_item=3, image_size=32, seed=7)
    np.testing.assert_array_equal(again.images, shop.images)
    np.testing.assert_array_equal(again.labels, shop.labels)
    np.testing.assert_array_equal(again.splits, shop.splits)
    assert again.descriptions == shop.descriptions and again.item_attributes == shop.item_attributes
    other = make_synthetic_shop(num_items=NUM_ITEMS, catalog_per_item=2, street_per_item=3, image_size=32, seed=8)
    assert other.descriptions != shop.descriptions
    assert not np.array_equal(other.images, shop.images)


def test_shapes_domains_and_row_layout(shop):
    n = NUM_ITEMS * 5
    assert len(shop) == n and shop.images.shape == (n, 32, 32, 3) and shop.images.dtype == np.uint8
    assert shop.image_paths is None and shop.item_ids[0] == "item_00000"
    np.testing.assert_array_equal(shop.labels, np.repeat(np.arange(NUM_ITEMS), 5))
    np.testing.assert_array_equal(shop.domains[:5], ["catalog", "catalog", "street", "street", "street"])
    for item in range(NUM_ITEMS):
        domains = shop.domains[shop.labels == item]
        assert (domains == "catalog").sum() == 2 and (domains == "street").sum() == 3
    big = make_synthetic_shop(num_items=3, catalog_per_item=1, street_per_item=1, image_size=80, seed=0)
    assert big.images.shape == (6, 80, 80, 3)


def test_items_distinct_and_categories_balanced(shop):
    combos = [tuple(sorted(a.items())) for a in shop.item_attributes]
    assert len(set(combos)) == NUM_ITEMS
    counts = {c: sum(a["category"] == c for a in shop.item_attributes) for c in CATEGORIES}
    assert set(counts.values()) == {NUM_ITEMS // len(CATEGORIES)}  # 40 items / 10 categories
    for attrs in shop.item_attributes:
        assert set(attrs) == {"category", "colour", "pattern", *CATEGORIES[attrs["category"]].attributes}


def test_descriptions_varied_never_identical_never_contain_ids(shop):
    texts = shop.descriptions
    assert all(isinstance(t, str) and len(t) > 10 for t in texts)
    assert len(set(texts)) == NUM_ITEMS
    for item_id, text in zip(shop.item_ids, texts):
        assert item_id not in text and not re.search(r"\d", text)
    # The text names the colour (a synonym of it) and, unless solid, the pattern.
    from atl_keras.data.synthetic_shop import COLOURS, PATTERNS

    for attrs, text in zip(shop.item_attributes, texts):
        assert any(s in text.lower() for s in COLOURS[attrs["colour"]][1])
        if attrs["pattern"] != "solid":
            forms = [f for f in PATTERNS[attrs["pattern"]][0] + PATTERNS[attrs["pattern"]][1] if f]
            assert any(f.lower() in text.lower() for f in forms), text


def test_similar_items_share_words_but_not_texts():
    # Two items that differ only in colour: phrasing varies, but the attribute words overlap.
    a = {"category": "t-shirt", "colour": "red", "pattern": "stripes", "sleeve": "short", "neckline": "crew"}
    b = dict(a, colour="blue")
    c = {"category": "backpack", "colour": "green", "pattern": "dots", "pocket": "front", "size": "mini"}
    rng = np.random.default_rng(0)
    texts_a = {describe_item(a, rng) for _ in range(30)}
    assert len(texts_a) > 10  # varied phrasing for the same item
    overlap_ab, overlap_ac = [], []
    for seed in range(20):
        ta, tb, tc = (describe_item(x, np.random.default_rng(seed)) for x in (a, b, c))
        assert ta != tb
        jaccard = lambda x, y: len(words(x) & words(y)) / len(words(x) | words(y))  # noqa: E731
        overlap_ab.append(jaccard(ta, tb))
        overlap_ac.append(jaccard(ta, tc))
    assert np.mean(overlap_ab) > np.mean(overlap_ac) + 0.3


def test_splits_disjoint_by_item_and_query_gallery(shop):
    item_splits = {}
    for label, split in zip(shop.labels, shop.splits):
        item_splits.setdefault(int(label), set()).add(str(split))
    assert all(len(s) == 1 for s in item_splits.values())  # every row of an item in one split
    counts = {s: sum(v == {s} for v in item_splits.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 24, "val": 4, "test": 12}  # (0.6, 0.1, 0.3) of 40 items
    query, gallery = shop.query_gallery()
    assert set(query.domains) == {"street"} and set(gallery.domains) == {"catalog"}
    assert set(query.labels) == set(gallery.labels) == {i for i, s in item_splits.items() if s == {"test"}}


def test_unseen_categories_only_in_test():
    shop = make_synthetic_shop(num_items=30, catalog_per_item=1, street_per_item=1, seed=3,
                               unseen_categories=("boot", "backpack"))
    category = np.array([shop.item_attributes[i]["category"] for i in shop.labels])
    unseen = np.isin(category, ["boot", "backpack"])
    assert unseen.any()
    assert set(shop.splits[unseen]) == {"test"}
    assert "boot" not in set(category[shop.splits == "train"])
    assert (shop.splits[~unseen] == "train").any() and (shop.splits[~unseen] == "test").any()
    with pytest.raises(ValueError, match="Unknown categories \\['hat'\\]"):
        make_synthetic_shop(num_items=5, unseen_categories=("hat",))
    with pytest.raises(ValueError, match="nothing would be left to train on"):
        make_synthetic_shop(num_items=5, categories=["boot"], unseen_categories=("boot",))


def test_argument_errors():
    with pytest.raises(ValueError, match="exceeds the .* distinct items"):
        make_synthetic_shop(num_items=10**6, categories=["skirt"])
    with pytest.raises(ValueError, match="at least one rendering per item"):
        make_synthetic_shop(num_items=2, catalog_per_item=0, street_per_item=0)
    assert len(_all_items(["skirt"])["skirt"]) == 3 * 2 * 13 * 4


def test_catalog_views_clean_street_views_cluttered_same_item(shop):
    catalog = shop.images[shop.domains == "catalog"].astype(np.float32)
    street = shop.images[shop.domains == "street"].astype(np.float32)
    corners = lambda x: np.concatenate([x[:, :3, :3], x[:, -3:, -3:]], axis=1).reshape(len(x), -1)  # noqa: E731
    assert corners(catalog).min() > 200  # light plain background
    assert corners(catalog).std(axis=1).max() < 12
    assert np.median(corners(street).std(axis=1)) > 5 or np.median(corners(street).mean(axis=1)) < 200
    # Brute-force nearest neighbour on 8x8 colour layouts (4x4 average pooling), one catalog
    # view per item as the gallery: other catalog views find their own item almost always;
    # street views are much harder, yet better than chance (1 / NUM_ITEMS).
    layout = shop.images.astype(np.float32).reshape(len(shop), 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(len(shop), -1)
    catalog_rows = np.flatnonzero(shop.domains == "catalog")
    gallery_rows, other_catalog_rows = catalog_rows[::2], catalog_rows[1::2]
    street_rows = np.flatnonzero(shop.domains == "street")

    def accuracy(rows: np.ndarray) -> float:
        d = ((layout[rows][:, None, :] - layout[gallery_rows][None]) ** 2).sum(-1)
        return float((shop.labels[gallery_rows][d.argmin(1)] == shop.labels[rows]).mean())

    catalog_acc, street_acc = accuracy(other_catalog_rows), accuracy(street_rows)
    assert catalog_acc >= 0.85
    assert street_acc < catalog_acc - 0.5
    assert street_acc > 1.5 / NUM_ITEMS


def test_contact_sheet_png(shop, tmp_path):
    sheet = contact_sheet(shop, range(10), scale=2)
    assert sheet.shape == (10 * 32 * 2, 5 * 32 * 2, 3)
    path = tmp_path / "synthetic_shop_contact_sheet.png"
    Image.fromarray(sheet).save(path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), sheet)

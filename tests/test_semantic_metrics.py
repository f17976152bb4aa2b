"""Attribute agreement@K and variant Recall@K, checked against brute-force loops.

The reference ranks every gallery row by a float64 distance computed with ``math.fsum``
(one Python loop per pair), breaks ties with a stable sort (lower gallery index first),
and evaluates the definitions with plain loops over queries, rows and attribute keys
(Python sets and dicts, no shared code with the module under test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from atl_keras.metrics import retrieval_metrics
from atl_keras.semantic_metrics import (
    attribute_agreement_at_k,
    semantic_retrieval_metrics,
    variant_recall_at_k,
)

DISTANCES = ("squared_l2", "cosine", "dot")

CATEGORY_KEYS = {
    "shirt": {"colour": ["red", "blue", "white"], "pattern": ["plain", "striped"], "sleeve": ["long", "short"]},
    "trousers": {"colour": ["red", "blue", "black"], "pattern": ["plain", "checked"], "leg": ["wide", "slim"]},
    "bag": {"colour": ["red", "black"], "strap": ["long", "none"]},
}


# ----------------------------------------------------------------------------- reference


def ref_distance(q: np.ndarray, g: np.ndarray, distance: str) -> float:
    q, g = q.astype(np.float64), g.astype(np.float64)
    if distance == "squared_l2":
        return math.fsum((a - b) ** 2 for a, b in zip(q, g))
    dot = math.fsum(a * b for a, b in zip(q, g))
    if distance == "dot":
        return -dot
    nq = math.sqrt(math.fsum(a * a for a in q)) or 1.0
    ng = math.sqrt(math.fsum(b * b for b in g)) or 1.0
    return 1.0 - dot / (nq * ng)


def ref_ranking(q: np.ndarray, gallery: np.ndarray, distance: str) -> list[int]:
    dist = [ref_distance(q, g, distance) for g in gallery]
    return sorted(range(len(gallery)), key=lambda j: (dist[j], j))


def ref_agreement(a: dict, b: dict, ignore: tuple = ()) -> float:
    keys_a = {k for k in a if k not in ignore}
    keys_b = {k for k in b if k not in ignore}
    shared = sum(1 for k in keys_a & keys_b if a[k] == b[k])
    return shared / len(keys_a | keys_b)


def ref_attribute_agreement(queries, q_labels, gallery, g_labels, attrs, ks, distance, ignore=()):
    sums = {k: 0.0 for k in ks}
    chance = 0.0
    for i in range(len(queries)):
        mine = attrs[q_labels[i]]
        others = [j for j in ref_ranking(queries[i], gallery, distance) if g_labels[j] != q_labels[i]]
        for k in ks:
            top = others[:k]
            sums[k] += sum(ref_agreement(mine, attrs[g_labels[j]], ignore) for j in top) / len(top)
        chance += sum(ref_agreement(mine, attrs[g_labels[j]], ignore) for j in others) / len(others)
    out = {f"attribute_agreement_at_{k}": sums[k] / len(queries) for k in ks}
    out["attribute_agreement_chance"] = chance / len(queries)
    return out


def ref_variant_recall(queries, q_labels, gallery, g_labels, designs, ks, distance):
    hits = {k: 0 for k in ks}
    evaluated = 0
    for i in range(len(queries)):
        mine = designs[q_labels[i]]
        if not any(designs[g] == mine for g in g_labels):
            continue
        evaluated += 1
        ranking = ref_ranking(queries[i], gallery, distance)
        for k in ks:
            hits[k] += any(designs[g_labels[j]] == mine for j in ranking[:k])
    out = {f"variant_recall_at_{k}": hits[k] / evaluated for k in ks}
    out["num_variant_queries"] = float(evaluated)
    out["num_queries_without_variant_match"] = float(len(queries) - evaluated)
    return out


# ----------------------------------------------------------------------------- data


def make_shop(seed: int, num_designs: int = 8, distance: str = "squared_l2", dim: int = 3):
    """Items with category-specific attributes, variant groups, 1-3 gallery rows per item.

    Integer embeddings in [-2, 2] for squared_l2 / dot (many exact, representable ties);
    Gaussian embeddings with duplicated gallery rows for cosine (ties only between
    duplicates, which the search keeps exactly tied).
    """
    rng = np.random.default_rng(seed)
    attrs, designs = [], []
    for d in range(num_designs):
        category = list(CATEGORY_KEYS)[rng.integers(len(CATEGORY_KEYS))]
        base = {"category": category, "sku": f"s{d}"}
        base.update({k: v[rng.integers(len(v))] for k, v in CATEGORY_KEYS[category].items()})
        for variant in range(int(rng.integers(1, 4))):  # 1-3 listings per design
            item = dict(base, sku=f"s{d}-{variant}")
            if variant:
                item["colour"] = CATEGORY_KEYS[category]["colour"][rng.integers(len(CATEGORY_KEYS[category]["colour"]))]
            attrs.append(item)
            designs.append(f"design-{d}")
    num_items = len(attrs)
    g_labels = np.repeat(np.arange(num_items), rng.integers(1, 4, size=num_items))
    q_labels = rng.integers(0, num_items, size=12)
    if distance == "cosine":
        gallery = rng.normal(size=(len(g_labels), dim)).astype(np.float32)
        dup = rng.choice(len(g_labels), size=4, replace=False)
        gallery[dup[:2]] = gallery[dup[2:]]
        queries = rng.normal(size=(len(q_labels), dim)).astype(np.float32)
    else:
        gallery = rng.integers(-2, 3, size=(len(g_labels), dim)).astype(np.float32)
        queries = rng.integers(-2, 3, size=(len(q_labels), dim)).astype(np.float32)
    return queries, q_labels, gallery, g_labels, attrs, np.array(designs)


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attribute_agreement_matches_brute_force(distance, seed):
    queries, q_labels, gallery, g_labels, attrs, _ = make_shop(seed, distance=distance)
    ks = (1, 3, 5)
    got = attribute_agreement_at_k(queries, q_labels, gallery, g_labels, attrs, ks=ks, distance=distance)
    want = ref_attribute_agreement(queries, q_labels, gallery, g_labels, attrs, ks, distance)
    assert_metrics_close(got, want)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variant_recall_matches_brute_force(distance, seed):
    queries, q_labels, gallery, g_labels, _, designs = make_shop(seed, distance=distance)
    ks = (1, 2, 5)
    got = variant_recall_at_k(queries, q_labels, gallery, g_labels, designs, ks=ks, distance=distance)
    want = ref_variant_recall(queries, q_labels, gallery, g_labels, designs, ks, distance)
    assert_metrics_close(got, want)


def test_category_specific_keys_count_as_disagreements():
    attrs = [
        {"category": "shirt", "colour": "red", "sleeve": "long"},
        {"category": "trousers", "colour": "red", "leg": "wide"},  # 1 of 4 keys: 0.25
        {"category": "shirt", "colour": "blue", "sleeve": "long"},  # 2 of 3 keys
    ]
    gallery = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], np.float32)
    query = np.array([[0.0, 0.0]], np.float32)
    got = attribute_agreement_at_k(query, [0], gallery, [0, 1, 2], attrs, ks=(1, 2))
    assert got["attribute_agreement_at_1"] == pytest.approx(0.25)
    assert got["attribute_agreement_at_2"] == pytest.approx((0.25 + 2 / 3) / 2)
    assert got["attribute_agreement_chance"] == pytest.approx((0.25 + 2 / 3) / 2)


def test_ties_go_to_the_lower_gallery_index():
    attrs = [{"c": "a"}, {"c": "a"}, {"c": "b"}, {"c": "c"}]
    # Rows 1 (item 3, agreement 0) and 2 (item 1, agreement 1) are tied at distance 1;
    # row 0 is the query's own item and must be skipped.
    gallery = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], np.float32)
    labels = [0, 3, 1, 2]
    for order_name, order in (("as is", [0, 1, 2, 3]), ("swapped", [0, 2, 1, 3])):
        got = attribute_agreement_at_k([[0.0, 0.0]], [0], gallery[order], np.array(labels)[order], attrs, ks=(1,))
        want = 0.0 if order_name == "as is" else 1.0
        assert got["attribute_agreement_at_1"] == want, order_name
    designs = ["x", "y", "w", "w"]  # item 3 shares the design of the query (item 2)
    got = variant_recall_at_k([[1.0, 1.0]], [2], gallery[[1, 2]], [3, 1], designs, ks=(1,))
    assert got["variant_recall_at_1"] == 1.0  # the tie goes to row 0 (item 3)
    got = variant_recall_at_k([[1.0, 1.0]], [2], gallery[[2, 1]], [1, 3], designs, ks=(1,))
    assert got["variant_recall_at_1"] == 0.0


def test_k_larger_than_other_items_averages_over_the_rows_that_exist():
    attrs = [{"c": "a", "p": 1}, {"c": "a", "p": 2}, {"c": "b", "p": 1, "x": 0}]
    gallery = np.arange(12, dtype=np.float32).reshape(6, 2)
    g_labels = np.array([0, 0, 0, 0, 1, 2])  # the query's item has 4 of 6 rows: 2 others
    query = np.zeros((1, 2), np.float32)
    got = attribute_agreement_at_k(query, [0], gallery, g_labels, attrs, ks=(1, 5, 6))
    assert got["attribute_agreement_at_1"] == pytest.approx(0.5)  # row 4, item 1: c of {c, p}
    assert got["attribute_agreement_at_5"] == pytest.approx((0.5 + 1 / 3) / 2)  # + item 2: p of {c, p, x}
    assert got["attribute_agreement_at_6"] == got["attribute_agreement_at_5"]
    want = ref_attribute_agreement(query, [0], gallery, g_labels, attrs, (1, 5, 6), "squared_l2")
    assert_metrics_close(got, want)


def test_k_larger_than_the_gallery_raises():
    queries, q_labels, gallery, g_labels, attrs, designs = make_shop(0)
    with pytest.raises(ValueError, match="gallery rows"):
        attribute_agreement_at_k(queries, q_labels, gallery, g_labels, attrs, ks=(len(g_labels) + 1,))
    with pytest.raises(ValueError, match="gallery rows"):
        variant_recall_at_k(queries, q_labels, gallery, g_labels, designs, ks=(len(g_labels) + 1,))


def test_query_without_any_other_item_raises():
    attrs = [{"c": "a"}, {"c": "b"}]
    with pytest.raises(ValueError, match="no gallery row of another item"):
        attribute_agreement_at_k([[0.0]], [0], [[0.0], [1.0]], [0, 0], attrs, ks=(1,))


def test_items_without_variants_give_exact_recall():
    queries, q_labels, gallery, g_labels, _, _ = make_shop(3)
    designs = np.arange(int(g_labels.max()) + 1)  # every item is its own design
    ks = (1, 2, 5)
    got = variant_recall_at_k(queries, q_labels, gallery, g_labels, designs, ks=ks)
    exact = retrieval_metrics(queries, q_labels, gallery, g_labels, ks=ks)
    for k in ks:
        assert got[f"variant_recall_at_{k}"] == exact[f"recall_at_{k}"]


def test_variant_recall_is_at_least_exact_recall_and_counts_variants():
    queries, q_labels, gallery, g_labels, _, designs = make_shop(4, num_designs=10)
    ks = (1, 3)
    got = variant_recall_at_k(queries, q_labels, gallery, g_labels, designs, ks=ks)
    exact = retrieval_metrics(queries, q_labels, gallery, g_labels, ks=ks)
    for k in ks:
        assert got[f"variant_recall_at_{k}"] >= exact[f"recall_at_{k}"]
    # A query sitting exactly on a variant listing's row is a hit at 1, not for exact recall.
    attrs_designs = ["d0", "d0", "d1"]
    gallery2 = np.array([[0.0], [1.0], [5.0]], np.float32)
    assert variant_recall_at_k([[1.0]], [0], gallery2, [0, 1, 2], attrs_designs, ks=(1,))["variant_recall_at_1"] == 1.0
    assert retrieval_metrics(np.array([[1.0]]), [0], gallery2, [0, 1, 2], ks=(1,))["recall_at_1"] == 0.0


def test_query_whose_design_has_no_gallery_row_is_left_out():
    designs = ["a", "b", "c"]
    gallery = np.array([[0.0], [1.0]], np.float32)
    got = variant_recall_at_k([[0.0], [1.0]], [2, 1], gallery, [0, 1], designs, ks=(1,))
    assert got == {"variant_recall_at_1": 1.0, "num_variant_queries": 1.0, "num_queries_without_variant_match": 1.0}
    got = variant_recall_at_k([[0.0]], [2], gallery, [0, 1], designs, ks=(1,))
    assert math.isnan(got["variant_recall_at_1"])


def test_ignore_keys_leaves_keys_out():
    queries, q_labels, gallery, g_labels, attrs, _ = make_shop(5)
    got = attribute_agreement_at_k(queries, q_labels, gallery, g_labels, attrs, ks=(1, 4), ignore_keys=("sku",))
    want = ref_attribute_agreement(queries, q_labels, gallery, g_labels, attrs, (1, 4), "squared_l2", ("sku",))
    assert_metrics_close(got, want)
    with_sku = attribute_agreement_at_k(queries, q_labels, gallery, g_labels, attrs, ks=(1, 4))
    assert with_sku["attribute_agreement_at_1"] < got["attribute_agreement_at_1"]  # sku never agrees
    assert attribute_agreement_at_k(queries, q_labels, gallery, g_labels, attrs, ks=(4,), ignore_keys="sku") == {
        k: v for k, v in got.items() if k != "attribute_agreement_at_1"
    }


@pytest.mark.parametrize("distance", DISTANCES)
def test_semantic_retrieval_metrics_is_the_union_and_chunking_changes_nothing(distance):
    queries, q_labels, gallery, g_labels, attrs, designs = make_shop(6, distance=distance)
    ks = (1, 4)
    both = semantic_retrieval_metrics(queries, q_labels, gallery, g_labels, attrs, designs, ks=ks, distance=distance)
    attr_only = attribute_agreement_at_k(queries, q_labels, gallery, g_labels, attrs, ks=ks, distance=distance)
    variant_only = variant_recall_at_k(queries, q_labels, gallery, g_labels, designs, ks=ks, distance=distance)
    assert both == {**attr_only, **variant_only}
    assert semantic_retrieval_metrics(queries, q_labels, gallery, g_labels, item_attributes=attrs, ks=ks, distance=distance) == attr_only
    assert semantic_retrieval_metrics(queries, q_labels, gallery, g_labels, design_ids=designs, ks=ks, distance=distance) == variant_only
    chunked = semantic_retrieval_metrics(
        queries, q_labels, gallery, g_labels, attrs, designs, ks=ks, distance=distance, chunk_size=1
    )
    assert_metrics_close(chunked, both)


def _bad_call(case: str):
    queries, q_labels, gallery, g_labels, attrs, designs = make_shop(0)
    num_items = len(attrs)
    if case == "query label out of range":
        q_labels = q_labels.copy()
        q_labels[0] = num_items
        return lambda: attribute_agreement_at_k(queries, q_labels, gallery, g_labels, attrs)
    if case == "gallery label out of range of design_ids":
        return lambda: variant_recall_at_k(queries, q_labels, gallery, g_labels, designs[:-1])
    if case == "negative label":
        return lambda: variant_recall_at_k(queries, q_labels, gallery, g_labels - 1, designs)
    if case == "float labels":
        return lambda: variant_recall_at_k(queries, q_labels.astype(float), gallery, g_labels, designs)
    if case == "row count mismatch":
        return lambda: attribute_agreement_at_k(queries[:-1], q_labels, gallery, g_labels, attrs)
    if case == "empty attributes":
        bad = [dict(a) for a in attrs]
        bad[int(g_labels[0])] = {"sku": "only-an-id"}
        return lambda: attribute_agreement_at_k(queries, q_labels, gallery, g_labels, bad, ignore_keys=("sku",))
    if case == "unhashable value":
        bad = [dict(a) for a in attrs]
        bad[0]["colour"] = ["red", "blue"]
        return lambda: attribute_agreement_at_k(queries, q_labels, gallery, g_labels, bad)
    if case == "tables of different length":
        return lambda: semantic_retrieval_metrics(queries, q_labels, gallery, g_labels, attrs, designs[:-1])
    if case == "nothing to compute":
        return lambda: semantic_retrieval_metrics(queries, q_labels, gallery, g_labels)
    if case == "unknown distance":
        return lambda: variant_recall_at_k(queries, q_labels, gallery, g_labels, designs, distance="l1")
    if case == "attributes not a sequence":
        return lambda: attribute_agreement_at_k(queries, q_labels, gallery, g_labels, {0: {"c": 1}})
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("query label out of range", r"outside \[0, \d+\).*item_attributes"),
        ("gallery label out of range of design_ids", r"outside \[0, \d+\).*design_ids"),
        ("negative label", "outside"),
        ("float labels", "integer item indices"),
        ("row count mismatch", "rows but query_labels"),
        ("empty attributes", "no attributes"),
        ("unhashable value", "not hashable"),
        ("tables of different length", "one entry per item"),
        ("nothing to compute", "neither was given"),
        ("unknown distance", "Unknown distance"),
        ("attributes not a sequence", "sequence of mappings"),
    ],
)
def test_invalid_inputs_raise_clear_errors(case, message):
    with pytest.raises(ValueError, match=message):
        _bad_call(case)()

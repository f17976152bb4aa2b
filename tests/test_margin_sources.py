"""Specification of the margin mappings, margin sources and the margin-table loss
(`atl_keras.margins.sources`) against small independent references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from atl_keras.losses import AdaptiveTripletLoss
from atl_keras.losses import MarginTableTripletLoss
from atl_keras.margins import (
    attribute_disagreement,
    derangement,
    map_distances,
    margin_spread,
    margin_table,
)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _loop_distances(text):
    m = len(text)
    out = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            out[i, j] = np.sum((text[i] - text[j]) ** 2)
    return out


def _pairs(table, items):
    return np.array([table[i, j] for i, j in itertools.combinations(items, 2)])


def test_mappings_match_their_formulas():
    d = np.array([0.0, 0.5, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(map_distances(d, "linear", 0.1, 0.5), 0.1 + 0.4 * d / 4)
    np.testing.assert_allclose(map_distances(d, "paper", 0.2, 0.5), 0.2 + d / 3.8)
    reference = np.linspace(1.0, 2.0, 101)  # 1% quantile 1.01, 99% quantile 1.99
    got = map_distances(np.array([0.0, 1.01, 1.5, 1.99, 3.0]), "catalog", 0.05, 0.45, reference=reference)
    np.testing.assert_allclose(got, [0.05, 0.05, 0.25, 0.45, 0.45], atol=1e-12)
    with pytest.raises(ValueError, match="reference"):
        map_distances(d, "catalog")
    with pytest.raises(ValueError, match="Unknown margin mapping"):
        map_distances(d, "cubic")
    with pytest.raises(ValueError, match="squared_l2"):
        map_distances(d, "paper", distance="cosine")


def test_catalog_mapping_spreads_margins_that_linear_leaves_flat():
    rng = np.random.default_rng(0)
    text = _unit(rng, 40, 512)  # random high-dimensional texts: distances bunch near 2
    linear = margin_table("text", text_embeddings=text, mapping="linear")
    catalog = margin_table("text", text_embeddings=text, mapping="catalog")
    assert margin_spread(linear)["cv"] < 0.05
    assert margin_spread(catalog)["cv"] > 5 * margin_spread(linear)["cv"]
    assert np.isclose(margin_spread(catalog)["min"], 0.05, atol=1e-6)
    assert np.isclose(margin_spread(catalog)["max"], 0.4, atol=1e-6)


def test_text_source_is_the_mapping_of_loop_distances_over_training_items():
    rng = np.random.default_rng(1)
    text = _unit(rng, 9, 6).astype(np.float32)
    train = [0, 2, 3, 5, 8]
    table = margin_table("text", text_embeddings=text, train_items=train, mapping="linear",
                         min_margin=0.1, max_margin=0.5)
    d = _loop_distances(text.astype(np.float64))
    for i, j in itertools.product(train, train):
        if i != j:
            assert table[i, j] == pytest.approx(0.1 + 0.4 * d[i, j] / 4, abs=1e-6)
    mean = _pairs(table, train).mean()
    assert table[1, 4] == pytest.approx(mean, abs=1e-6)  # items outside training: the mean
    assert np.allclose(table, table.T)


def test_controls_keep_the_text_distribution_and_drop_its_structure():
    rng = np.random.default_rng(2)
    text = _unit(rng, 30, 16)
    items = np.arange(30)
    kwargs = dict(text_embeddings=text, mapping="catalog", seed=3)
    text_table = margin_table("text", **kwargs)
    values = np.sort(_pairs(text_table, items))
    permuted = margin_table("permuted", **kwargs)
    shuffled = margin_table("shuffled_text", **kwargs)
    fixed = margin_table("fixed", **kwargs)
    np.testing.assert_allclose(np.sort(_pairs(permuted, items)), values, atol=1e-6)  # same multiset
    np.testing.assert_allclose(np.sort(_pairs(shuffled, items)), values, atol=1e-6)
    assert np.allclose(permuted, permuted.T) and np.allclose(shuffled, shuffled.T)
    assert not np.allclose(permuted, text_table) and not np.allclose(shuffled, text_table)
    partner = derangement(30, 3)
    for a, n in [(0, 1), (4, 17), (29, 3)]:  # shuffled = the partners' text margins
        assert shuffled[a, n] == pytest.approx(text_table[partner[a], partner[n]], abs=1e-6)
    assert np.allclose(_pairs(fixed, items), values.mean(), atol=1e-6)


def test_derangement_has_no_fixed_points():
    for n in (2, 3, 10, 101):
        p = derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n)) and np.all(p != np.arange(n))
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_attribute_disagreement_counts_keys_over_the_union():
    attrs = [
        {"category": "tee", "colour": "red", "sleeve": "short", "design": "d0"},
        {"category": "tee", "colour": "blue", "sleeve": "short", "design": "d0"},
        {"category": "boot", "colour": "red", "heel": "flat", "design": "d1"},
    ]
    d = attribute_disagreement(attrs)
    assert d[0, 1] == pytest.approx(1 - 2 / 3)  # category, sleeve shared of 3 keys ("design" ignored)
    assert d[0, 2] == pytest.approx(1 - 1 / 4)  # colour shared; union: category, colour, sleeve, heel
    assert d[0, 0] == 0 and np.allclose(d, d.T)


def test_oracle_is_matched_to_the_text_margins_mean_and_sd():
    rng = np.random.default_rng(4)
    m = 24
    attrs = [{"category": str(rng.integers(3)), "colour": str(rng.integers(4)), "pattern": str(rng.integers(2))}
             for _ in range(m)]
    text = _unit(rng, m, 8)
    items = np.arange(m)
    text_table = margin_table("text", text_embeddings=text, mapping="catalog")
    oracle = margin_table("oracle", text_embeddings=text, item_attributes=attrs, mapping="catalog")
    tv, ov = _pairs(text_table, items), _pairs(oracle, items)
    assert ov.mean() == pytest.approx(tv.mean(), abs=0.02) and ov.std() == pytest.approx(tv.std(), rel=0.1)
    raw = attribute_disagreement(attrs)
    # the oracle is an increasing function of the true disagreement
    order = np.argsort(_pairs(raw, items), kind="stable")
    assert np.all(np.diff(ov[order]) >= -1e-6)
    with pytest.raises(ValueError, match="item_attributes"):
        margin_table("oracle", text_embeddings=text)


def test_table_loss_with_text_margins_equals_adaptive_triplet_loss():
    rng = np.random.default_rng(5)
    m, b = 12, 24
    text = _unit(rng, m, 8).astype(np.float32)
    labels = np.repeat(np.arange(m), 2)[:b]
    embeddings = _unit(rng, b, 4).astype(np.float32)
    table = margin_table("text", text_embeddings=text, mapping="linear", min_margin=0.1, max_margin=0.5)
    for mining in ("batch_all", "batch_hard", "semi_hard"):
        atl = AdaptiveTripletLoss(min_margin=0.1, max_margin=0.5, mining=mining)
        expected = float(atl({"label": labels, "text_embedding": text[labels]}, embeddings))
        got = float(MarginTableTripletLoss(table, mining=mining)({"label": labels}, embeddings))
        assert got == pytest.approx(expected, abs=1e-5), mining
        assert float(MarginTableTripletLoss(table, mining=mining)(labels, embeddings)) == pytest.approx(got)


def test_table_loss_equals_a_loop_over_triplets_with_table_margins():
    rng = np.random.default_rng(6)
    m = 6
    table = rng.uniform(0.05, 0.6, size=(m, m)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 5])
    x = _unit(rng, len(labels), 3).astype(np.float32)
    d = _loop_distances(x.astype(np.float64))
    losses = [max(0.0, d[a, p] - d[a, n] + table[labels[a], labels[n]])
              for a in range(len(labels)) for p in range(len(labels)) for n in range(len(labels))
              if a != p and labels[a] == labels[p] and labels[n] != labels[a]]
    positive = [v for v in losses if v > 1e-16]
    expected = np.mean(positive) if positive else 0.0
    got = float(MarginTableTripletLoss(table, mining="batch_all")(labels, x))
    assert got == pytest.approx(expected, abs=1e-5)


def test_negative_table_removes_pairs_from_the_negatives():
    labels = np.array([0, 0, 1, 1])
    x = np.array([[1, 0], [0.9, 0.1], [0.95, 0.05], [0, 1]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = np.full((2, 2), 0.5, np.float32)
    all_negatives = float(MarginTableTripletLoss(table, mining="batch_all")(labels, x))
    none = float(MarginTableTripletLoss(table, mining="batch_all", negative_table=np.eye(2, dtype=bool))(labels, x))
    assert all_negatives > 0 and none == 0.0


def test_table_loss_round_trips_and_refuses_bad_tables():
    import keras

    loss = MarginTableTripletLoss(np.full((3, 3), 0.2), mining="semi_hard", negative_table=np.eye(3, dtype=bool))
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, MarginTableTripletLoss) and again.mining == "semi_hard"
    np.testing.assert_array_equal(again.table, loss.table)
    np.testing.assert_array_equal(again.negative_table, loss.negative_table)
    with pytest.raises(ValueError, match="non-negative"):
        MarginTableTripletLoss(np.full((2, 3), 0.1))
    with pytest.raises(ValueError, match="non-negative"):
        MarginTableTripletLoss(np.full((2, 2), -0.1))
    with pytest.raises(ValueError, match="sample_weight"):
        loss(np.array([0, 0, 1, 1]), np.eye(4, 2, dtype=np.float32), sample_weight=np.ones(4))


def test_inspect_margins_spread_lines_follow_margin_spread():
    from atl_keras.margins.report import mapping_spreads
    from atl_keras.train import TrainConfig

    rng = np.random.default_rng(7)
    text = _unit(rng, 20, 32)
    lines = mapping_spreads(text, TrainConfig())
    assert list(lines) == ["linear", "paper", "catalog"]
    s = margin_spread(margin_table("text", text_embeddings=text, mapping="catalog"))
    assert f"CV {s['cv']:.3f}" in lines["catalog"]
    assert "paper" not in mapping_spreads(text, TrainConfig(distance="cosine"))


def test_random_source_is_iid_uniform_symmetric_seeded_and_needs_no_text():
    from scipy import stats

    from atl_keras.margins import random_margin_table

    items = np.arange(0, 60, 2)  # training items: the even ones of 60
    table = margin_table("random", num_items=60, train_items=items, min_margin=0.1, max_margin=0.5, seed=7)
    assert table.shape == (60, 60) and table.dtype == np.float32
    assert np.array_equal(table, table.T)
    values = _pairs(table, items)
    assert values.min() >= 0.1 and values.max() <= 0.5
    assert stats.kstest(values, stats.uniform(0.1, 0.4).cdf).pvalue > 0.01  # uniform on [0.1, 0.5]
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.1  # no structure between pairs
    np.testing.assert_array_equal(table, random_margin_table(60, items, 0.1, 0.5, seed=7))  # seeded
    assert not np.allclose(table, margin_table("random", num_items=60, train_items=items, min_margin=0.1,
                                               max_margin=0.5, seed=8))
    assert np.all(table[1] == np.float32(0.3)) and np.all(np.diag(table) == np.float32(0.3))  # midpoint elsewhere
    # text embeddings, when given, only count the items: their values are not read
    zeros = np.zeros((60, 4))
    np.testing.assert_array_equal(margin_table("random", text_embeddings=zeros, train_items=items, min_margin=0.1,
                                               max_margin=0.5, seed=7), table)
    with pytest.raises(ValueError, match="num_items"):
        margin_table("random")
    with pytest.raises(ValueError, match="min_margin"):
        margin_table("random", num_items=5, min_margin=0.5, max_margin=0.1)
    with pytest.raises(ValueError, match="margin_source='random'"):
        margin_table("permuted", num_items=5)


def test_atl_trains_with_random_margins_on_a_catalog_without_descriptions(tmp_path):
    import csv

    from PIL import Image

    from atl_keras.train import TrainConfig, run_training

    rng = np.random.default_rng(0)
    rows = []
    for item in range(16):
        colour = rng.integers(0, 255, 3)
        for view in range(3):
            path = tmp_path / "images" / f"{item}-{view}.png"
            path.parent.mkdir(exist_ok=True)
            pixels = np.clip(colour + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
            rows.append({"image": f"images/{path.name}", "item_id": f"item{item}", "description": ""})
    with open(tmp_path / "products.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "item_id", "description"])
        writer.writeheader()
        writer.writerows(rows)
    config = TrainConfig(dataset=f"catalog:{tmp_path / 'products.csv'}", image_size=16, p=4, k=2, epochs=1,
                         steps_per_epoch=2, ks=(1,), embedding_dim=8, output_dir=str(tmp_path / "run"),
                         projector_size=0, loss="atl", margin_source="random", margin_mapping="catalog",
                         text_encoder=str(tmp_path / "no-such-encoder"))  # never loaded
    result = run_training(config, verbose=0)
    assert isinstance(result.model.loss, MarginTableTripletLoss)
    table = result.model.loss.table
    train = np.unique(result.data.train_labels)
    values = _pairs(table, train)
    assert values.min() >= 0.05 and values.max() <= 0.4 and values.std() > 0.05
    assert np.isfinite(result.history["loss"]).all()
    with pytest.raises(ValueError, match="semantic_threshold"):
        TrainConfig(margin_source="random", semantic_threshold=0.5, loss="atl")

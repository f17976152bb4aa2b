"""ScaNN index: configuration from gallery size and recall against exact search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from atl_keras.index import (
    BRUTE_FORCE_BELOW,
    ScannConfig,
    build_scann_searcher,
    scann_config_for,
    scann_recall,
)


def clustered_unit_vectors(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` random centres: what trained embeddings look like."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, size=n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_small_galleries_are_scored_exactly():
    config = scann_config_for(BRUTE_FORCE_BELOW - 1)
    assert config.brute_force
    assert scann_config_for(5, k=10).default_k == 5


@pytest.mark.parametrize("n", [2000, 10_000, 1_000_000])
def test_tree_has_about_sqrt_n_leaves_and_reorders(n):
    config = scann_config_for(n, k=10)
    assert not config.brute_force
    assert abs(config.num_leaves - math.sqrt(n)) <= 1
    assert 16 <= config.num_leaves_to_search <= config.num_leaves
    assert config.reorder_k >= 100
    assert config.training_sample_size <= min(n, 100_000)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="empty"):
        scann_config_for(0)
    with pytest.raises(ValueError, match="k must be"):
        scann_config_for(10, k=0)
    with pytest.raises(ValueError, match="NaN"):
        build_scann_searcher(np.full((3, 4), np.nan, np.float32))


def test_default_config_reaches_high_recall_on_clustered_embeddings():
    gallery = clustered_unit_vectors(5000, 32, clusters=50, seed=0)
    queries = clustered_unit_vectors(200, 32, clusters=50, seed=1)
    searcher = build_scann_searcher(gallery, scann_config_for(len(gallery)))
    assert scann_recall(searcher, queries, gallery, k=10) >= 0.95


def test_brute_force_searcher_is_exact_and_recall_is_one():
    gallery = clustered_unit_vectors(300, 16, clusters=5, seed=2)
    queries = clustered_unit_vectors(20, 16, clusters=5, seed=3)
    searcher = build_scann_searcher(gallery, ScannConfig(default_k=10))
    indices, scores = searcher.search_batched(queries, final_num_neighbors=10)
    expected = np.sort(queries @ gallery.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(np.asarray(scores), expected, atol=1e-5)
    assert scann_recall(searcher, queries, gallery, k=10) == 1.0


def test_recall_counts_ties_within_epsilon_but_not_worse_items():
    """Items tied with the k-th neighbour are interchangeable; worse ones are misses."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=16)
    base /= np.linalg.norm(base)
    far = rng.normal(size=(200, 16))
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    gallery = np.concatenate([np.repeat(base[None], 30, axis=0), far]).astype(np.float32)
    query = base[None].astype(np.float32)

    class FixedSearcher:
        def __init__(self, rows):
            self.rows = np.asarray(rows)[None]

        def search_batched(self, queries, final_num_neighbors):
            return self.rows, None

    tied = FixedSearcher(np.arange(20, 30))  # 10 of the 30 exact duplicates: all correct
    assert scann_recall(tied, query, gallery, k=10) == 1.0
    half = FixedSearcher(list(range(5)) + list(range(30, 35)))  # 5 duplicates + 5 far items
    assert scann_recall(half, query, gallery, k=10) == 0.5
    assert scann_recall(half, query, gallery, k=10, epsilon=0.0) == 0.5

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
    assert config.scoring == "exact"  # what a brute-force index does; the manifest says so
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


# ------------------------------------------------------------------ set recall and tuning
from atl_keras.index import (  # noqa: E402
    drop_excluded,
    held_out_queries,
    recall_report,
    set_recall,
    tie_aware_recall,
    tune_index,
)


def numpy_leave_one_out_top_k(gallery: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Reference: exact top-k by dot product of each sampled row, the row itself removed."""
    out = []
    for row in rows:
        scores = gallery @ gallery[row]
        scores[row] = -np.inf
        out.append(np.argsort(-scores, kind="stable")[:k])
    return np.array(out)


def test_set_recall_counts_exact_index_overlap_only():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    approx = np.array([[3, 2, 9, -1], [4, 5, 6, 7]])
    assert set_recall(approx, exact) == (2 + 4) / 8


def test_drop_excluded_removes_own_row_or_the_last():
    found = np.array([[5, 1, 2], [3, 4, 6]])
    np.testing.assert_array_equal(drop_excluded(found, np.array([5, 9]), 2), [[1, 2], [3, 4]])


def test_tie_aware_recall_reads_high_on_tight_embeddings_while_set_recall_is_low():
    """Trained embeddings: near-ties everywhere, so tie-aware recall cannot gate."""
    gallery = clustered_unit_vectors_tight(12_000, 16, clusters=30, spread=0.03, seed=0)
    queries = held_out_queries(gallery, count=200, seed=1)
    crude = ScannConfig(num_leaves=110, num_leaves_to_search=1, training_sample_size=12_000,
                        reorder_k=10, scoring="ah")
    searcher = build_scann_searcher(gallery, crude)
    report = recall_report(searcher, gallery, queries, 10, **crude.search_kwargs)
    assert report["set_recall"] < 0.5 and report["tie_aware_recall"] > 0.9


def clustered_unit_vectors_tight(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, size=n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("quantize", [None, False])
def test_tuned_index_meets_the_target_against_numpy_brute_force(quantize):
    """>= 10k tight items (above the brute-force threshold): set recall@10 >= 0.95 on held-out rows."""
    gallery = clustered_unit_vectors_tight(12_000, 16, clusters=30, spread=0.05, seed=2)
    queries = held_out_queries(gallery, count=200, seed=3)
    tuned = tune_index(gallery, k=10, min_recall=0.95, queries=queries, quantize=quantize)
    assert not tuned.config.brute_force
    if quantize is not None:
        assert tuned.config.scoring == ("ah" if quantize else "exact")
    found, _ = tuned.searcher.search_batched(queries.embeddings, final_num_neighbors=11, **tuned.config.search_kwargs)
    approx = drop_excluded(np.asarray(found), queries.exclude, 10)
    truth = numpy_leave_one_out_top_k(gallery, queries.exclude, 10)
    recall = set_recall(approx, truth)
    assert recall >= 0.95
    assert abs(recall - tuned.report["chosen"]["set_recall"]) < 0.02
    assert tuned.report["chosen"]["qps_batched"] > 0
    # the tuner keeps the cheapest search of its tree that meets the target
    chosen = tuned.report["chosen"]
    same = [c for c in tuned.report["candidates"] if c["scoring"] == tuned.config.scoring
            and c["reorder_k"] == chosen["reorder_k"] and c["num_leaves"] == tuned.config.num_leaves
            and c["build"] == chosen["build"]]
    if tuned.config.spill_threshold > 0:  # adaptive: every lower threshold tried missed, and it scores fewer items
        assert all(not c["meets"] for c in same if 0 < c["spill_threshold"] < tuned.config.spill_threshold)
        assert chosen["items_scored"] < chosen["fixed_items_scored"]
    else:  # fixed count: fewer leaves miss
        assert all(c["set_recall"] < 0.95 for c in same
                   if c["spill_threshold"] == 0 and c["leaves_to_search"] < tuned.config.num_leaves_to_search)


def test_quantized_scoring_cannot_separate_near_ties_and_the_tuner_says_so():
    """AH codes blur scores 1e-4 apart: on tight clusters only exact scoring in the leaves meets 0.95."""
    gallery = clustered_unit_vectors_tight(12_000, 16, clusters=30, spread=0.05, seed=2)
    queries = held_out_queries(gallery, count=200, seed=3)
    ah = tune_index(gallery, k=10, min_recall=0.95, queries=queries, quantize=True)
    assert ah.report["chosen"]["set_recall"] < 0.95  # best effort returned; the export gate refuses it
    assert ah.report["chosen"]["tie_aware_recall"] > 0.95
    both = tune_index(gallery, k=10, min_recall=0.95, queries=queries)
    assert both.config.scoring == "exact"


def test_fixed_knobs_are_respected():
    gallery = clustered_unit_vectors_tight(3000, 8, clusters=10, spread=0.1, seed=4)
    tuned = tune_index(gallery, 10, 0.0, num_leaves=40, leaves_to_search=7, quantize=True, reorder=50)
    assert (tuned.config.num_leaves, tuned.config.num_leaves_to_search) == (40, 7)
    assert tuned.config.scoring == "ah" and tuned.config.reorder_k == 50


def test_tie_aware_matches_scann_recall_definition():
    gallery = clustered_unit_vectors(500, 8, clusters=5, seed=5)
    queries = gallery[:20]
    exact = numpy_leave_one_out_top_k(gallery, np.arange(20), 5)
    assert tie_aware_recall(exact, exact, queries, gallery) == 1.0


def test_exact_neighbors_matches_a_loop_with_ties_and_exclusion():
    from atl_keras.index import HeldOutQueries, exact_neighbors

    gallery = clustered_unit_vectors(300, 8, clusters=4, seed=7)
    gallery[50] = gallery[10]  # exact ties: the lower row comes first
    gallery[51] = gallery[10]
    queries = HeldOutQueries(gallery[[10, 3, 200]].copy(), np.array([10, -1, 200]), "test")
    found = exact_neighbors(gallery, queries, k=5, chunk_size=2)
    for query, own, row in zip(queries.embeddings, queries.exclude, found):
        scores = [(-float(np.dot(query, g)), i) for i, g in enumerate(gallery.astype(np.float64)) if i != own]
        assert row.tolist() == [i for _, i in sorted(scores)[:5]]
    assert found[0][:2].tolist() == [50, 51]  # own row 10 excluded, its two copies first


def test_tuning_keeps_one_searcher_alive_and_reports_the_one_it_returns(monkeypatch):
    import atl_keras.index as index

    made, builds, released, alive_at_make = [], [], [], []
    original_build, original_from_tensors = index.build_scann_searcher, index.searcher_from_tensors
    original_release = index.release_searcher

    def build(*args, **kwargs):
        alive_at_make.append(sum(1 for s in made if s not in released))
        made.append(original_build(*args, **kwargs))
        builds.append(made[-1])
        return made[-1]

    def from_tensors(*args, **kwargs):  # the adaptive-leaves step: same tree, another leaf search
        alive_at_make.append(sum(1 for s in made if s not in released))
        made.append(original_from_tensors(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(index, "build_scann_searcher", build)
    monkeypatch.setattr(index, "searcher_from_tensors", from_tensors)
    monkeypatch.setattr(index, "release_searcher", lambda s: released.append(s) or original_release(s))
    gallery = clustered_unit_vectors(25_000, 16, clusters=40, seed=3)
    queries = index.held_out_queries(gallery, count=300, seed=1)
    tuned = index.tune_index(gallery, k=10, min_recall=0.9, queries=queries)
    assert len(builds) >= 3 and tuned.searcher is made[-1]  # AH + exact trees at 1x/2x/4x sqrt(N) leaves
    assert alive_at_make == [0] * len(made)  # every earlier searcher was freed before the next was made
    assert {id(s) for s in released} == {id(s) for s in made[:-1]}
    assert all(s.searcher_handle is None for s in released)
    # the chosen candidate was measured on the returned searcher's tree (rebuilt if it was freed)
    chosen = tuned.report["chosen"]
    assert chosen["build"] == max(c["build"] for c in tuned.report["candidates"])
    found = index.search_held_out(tuned.searcher, queries, 10, **tuned.config.search_kwargs)
    assert index.set_recall(found, index.exact_neighbors(gallery, queries, 10)) == chosen["set_recall"]
    assert chosen["set_recall"] >= 0.9 and chosen["leaves_to_search"] == tuned.config.num_leaves_to_search
    assert chosen["spill_threshold"] == tuned.config.spill_threshold


def test_build_wraps_an_aligned_gallery_without_a_copy_and_copies_any_other():
    from atl_keras.index import TF_ALIGNMENT, _check_gallery, aligned_empty

    aligned = aligned_empty((300, 8))
    assert aligned.ctypes.data % TF_ALIGNMENT == 0 and aligned.flags.c_contiguous
    aligned[...] = clustered_unit_vectors(300, 8, clusters=4, seed=1)
    assert _check_gallery(aligned) is aligned
    buffer = np.zeros(300 * 8 + 1, np.float32)
    shifted = buffer[1:].reshape(300, 8)  # 4 bytes off any 64-byte boundary
    shifted[...] = aligned
    read_only = aligned.copy()
    read_only.flags.writeable = False  # DLPack cannot export read-only memory
    for gallery in (shifted, read_only, aligned.astype(np.float64), np.asfortranarray(aligned)):
        checked = _check_gallery(gallery)
        assert checked is not gallery and checked.ctypes.data % TF_ALIGNMENT == 0
        np.testing.assert_array_equal(checked, aligned)
        searcher = build_scann_searcher(gallery, ScannConfig(default_k=5))
        indices, _ = searcher.search_batched(aligned[:4], final_num_neighbors=1)
        assert np.asarray(indices)[:, 0].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------- adaptive leaf search
def _spilling(searcher):
    from scann.proto import scann_pb2

    from atl_keras.index import scann_ops

    config = scann_pb2.ScannConfig.FromString(scann_ops.scann_to_tensors(searcher.searcher_handle)[0].numpy()[0])
    return config.partitioning.query_spilling


def test_spill_threshold_is_validated_and_searches_with_the_searchers_own_spilling():
    with pytest.raises(ValueError, match="spill_threshold"):
        ScannConfig(num_leaves=10, num_leaves_to_search=2, spill_threshold=-0.1)
    with pytest.raises(ValueError, match="spill_threshold"):
        ScannConfig(num_leaves=10, num_leaves_to_search=2, spill_threshold=float("nan"))
    fixed = ScannConfig(num_leaves=10, num_leaves_to_search=2, scoring="exact")
    assert fixed.search_kwargs["leaves_to_search"] == 2
    assert ScannConfig.from_dict({**fixed.to_dict(), "spill_threshold": 0.01}).search_kwargs["leaves_to_search"] == -1


def test_adaptive_leaf_search_spans_one_leaf_to_its_cap_on_the_same_tree():
    """A threshold above every centre gap searches the cap, a threshold ~0 the best leaf only:
    results equal the fixed 6-leaf / 1-leaf searches exactly for every query whose 6th / best
    centre is not one of two twins (k-means leaves duplicate centres with 80 leaves on 40
    clusters; which twin a search takes is ScaNN's choice)."""
    from atl_keras.index import _tree_leaves, release_searcher, scann_ops, searcher_from_tensors

    gallery = clustered_unit_vectors(6000, 16, clusters=40, seed=4)
    queries = clustered_unit_vectors(300, 16, clusters=40, seed=5)
    fixed = ScannConfig(num_leaves=80, num_leaves_to_search=6, training_sample_size=6000,
                        scoring="exact", spherical=True, default_k=10)
    searcher = build_scann_searcher(gallery, fixed)

    def top(s, leaves):
        return np.asarray(s.search_batched(queries, final_num_neighbors=10, leaves_to_search=leaves)[0])

    one, six = top(searcher, 1), top(searcher, 6)
    assert not np.array_equal(one, six)
    tensors = scann_ops.scann_to_tensors(searcher.searcher_handle)
    found = {}
    for threshold in (1e-9, 0.05, 4.0):
        adaptive = ScannConfig.from_dict({**fixed.to_dict(), "spill_threshold": threshold})
        respilled = searcher_from_tensors(tensors, adaptive)
        assert _spilling(respilled).spilling_type == _spilling(respilled).ADDITIVE
        found[threshold] = top(respilled, adaptive.search_kwargs["leaves_to_search"])
        release_searcher(respilled)
    centres, _ = _tree_leaves(tensors)
    ranked = np.sort(queries @ centres.T, axis=1)[:, ::-1]
    unique_six = ranked[:, 5] - ranked[:, 6] > 1e-4  # the 6th leaf is not one of two twins
    unique_best = ranked[:, 0] - ranked[:, 1] > 1e-4
    # enough queries to compare (0.49 of them had a unique best centre in one run: k-means differs by host)
    assert unique_six.mean() > 0.3 and unique_best.mean() > 0.3
    np.testing.assert_array_equal(found[4.0][unique_six], six[unique_six])
    np.testing.assert_array_equal(found[1e-9][unique_best], one[unique_best])
    # in between, a query searches as many leaves as it needs: recall lies between the two
    truth = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]
    recalls = [set_recall(found[t], truth) for t in (1e-9, 0.05, 4.0)]
    assert set_recall(one, truth) <= recalls[0] < recalls[1] < recalls[2]
    # a fresh build with a threshold carries it in its config (it is what an export serializes)
    built = build_scann_searcher(gallery, ScannConfig.from_dict({**fixed.to_dict(), "spill_threshold": 0.05}))
    spilling = _spilling(built)
    assert spilling.spilling_type == spilling.ADDITIVE and spilling.max_spill_centers == 6
    assert spilling.spilling_threshold == pytest.approx(0.05)


def test_the_tree_is_read_back_with_each_leafs_centre_and_size():
    """`_tree_leaves` parses ScaNN's serialized k-means tree: every gallery item sits in a leaf
    whose centre scores best for it (k-means leaves duplicate centres, so compared by score),
    and the sizes count the items per leaf."""
    from atl_keras.index import _items_scored, _tree_leaves, scann_ops

    gallery = clustered_unit_vectors(5000, 16, clusters=30, seed=6)
    config = ScannConfig(num_leaves=50, num_leaves_to_search=3, training_sample_size=5000,
                         scoring="exact", spherical=True)
    tensors = scann_ops.scann_to_tensors(build_scann_searcher(gallery, config).searcher_handle)
    centres, sizes = _tree_leaves(tensors)
    assert centres.shape == (50, 16) and sizes.sum() == 5000
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-4)  # spherical
    tokens = tensors[2].numpy()
    scores = gallery @ centres.T  # a duplicate centre scores as its twin: compare scores, not indices
    assert np.mean(scores[np.arange(len(gallery)), tokens] >= scores.max(axis=1) - 1e-5) > 0.999
    # items scored: the sizes of each query's best leaves (a loop), fewer with a tight threshold
    queries = clustered_unit_vectors(40, 16, clusters=30, seed=7)
    scores = queries @ centres.T
    expected_fixed, expected_tight = [], []
    for row in scores:
        ranked = np.argsort(-row, kind="stable")[:3]
        expected_fixed.append(sizes[ranked].sum())
        expected_tight.append(sum(sizes[leaf] for leaf in ranked if row[leaf] >= row[ranked[0]] - 1e-6))
    tight = ScannConfig.from_dict({**config.to_dict(), "spill_threshold": 1e-6})
    fixed_items, tight_items = _items_scored(tensors, queries, (config, tight))
    assert fixed_items == pytest.approx(np.mean(expected_fixed))
    assert tight_items == pytest.approx(np.mean(expected_tight))
    assert tight_items < fixed_items

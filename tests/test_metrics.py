"""Exact search and retrieval metrics, checked against a brute-force numpy reference.

The reference computes every distance in float64 with ``math.fsum`` (one Python loop per
pair), ranks with a full ``np.argsort(kind="stable")`` (ties -> lower gallery index) and
evaluates the metric formulas with plain loops, exactly as written in Musgrave et al.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from atl_keras.metrics import RetrievalEvaluation, format_metrics_table, retrieval_metrics
from atl_keras.search import ExactSearcher, exact_search
from atl_keras.search.exact import _chunk_top_k_fn

DISTANCES = ("squared_l2", "cosine", "dot")


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


def ref_rankings(queries, gallery, distance, leave_one_out):
    """Per query: the full ranking (gallery indices) and the sorted distances."""
    dist = np.array([[ref_distance(q, g, distance) for g in gallery] for q in queries])
    order = np.argsort(dist, axis=1, kind="stable")
    rankings = []
    for i in range(len(queries)):
        row = order[i]
        if leave_one_out:
            row = row[row != i]
        rankings.append((row, dist[i, row]))
    return rankings


def ref_metrics(queries, query_labels, gallery, gallery_labels, ks, distance):
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = queries, query_labels
    rankings = ref_rankings(queries, gallery, distance, leave_one_out)
    sums = {f"recall_at_{k}": 0.0 for k in ks}
    sums.update(precision_at_1=0.0, r_precision=0.0, map_at_r=0.0)
    evaluated = without = 0
    for i, (ranking, _) in enumerate(rankings):
        rel = [gallery_labels[j] == query_labels[i] for j in ranking]
        r = sum(rel)  # ranking already excludes the query itself in leave-one-out
        if r == 0:
            without += 1
            continue
        evaluated += 1
        for k in ks:
            sums[f"recall_at_{k}"] += 1.0 if any(rel[:k]) else 0.0
        sums["precision_at_1"] += 1.0 if rel[0] else 0.0
        sums["r_precision"] += sum(rel[:r]) / r
        hits, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        sums["map_at_r"] += ap / r
    out = {name: value / evaluated for name, value in sums.items()}
    out.update(num_queries=float(evaluated), num_queries_without_match=float(without))
    return out


# ----------------------------------------------------------------------------- data


def make_embeddings(rng, n, dim, kind, distance):
    """Float32 embeddings with forced exact ties.

    - "random": normal rows, a third of them exact copies of other rows (for cosine,
      copies scaled by 2 or 0.5, which normalise to bitwise-equal unit vectors).
    - "grid": entries in {-1, 0, 1}: float32 arithmetic is exact, so many *distinct*
      rows are exactly tied too (squared_l2 and dot only).
    """
    if kind == "grid":
        return rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    dup = rng.choice(n, size=n // 3, replace=False)
    src = rng.integers(0, n, size=dup.shape[0])
    scale = rng.choice(np.array([0.5, 1.0, 2.0], np.float32), size=(dup.shape[0], 1))
    x[dup] = x[src] * (scale if distance == "cosine" else 1.0)
    return x


CASES = [
    (distance, kind, seed)
    for distance in DISTANCES
    for kind in ("random", "grid")
    for seed in (0, 1, 2)
    if not (distance == "cosine" and kind == "grid")
]


# ----------------------------------------------------------------------------- exact_search


@pytest.mark.parametrize("distance,kind,seed", CASES)
def test_exact_search_matches_brute_force(distance, kind, seed):
    rng = np.random.default_rng(seed)
    gallery = make_embeddings(rng, 40, 5, kind, distance)
    queries = np.concatenate([make_embeddings(rng, 9, 5, kind, distance), gallery[:4]])
    k = 12
    idx, dist = exact_search(queries, gallery, k, distance=distance, chunk_size=5)
    assert idx.dtype == np.int64 and dist.dtype == np.float32 and idx.shape == (13, k)
    for i, (ranking, ref_dist) in enumerate(ref_rankings(queries, gallery, distance, False)):
        np.testing.assert_array_equal(idx[i], ranking[:k], err_msg=f"query {i}")
        np.testing.assert_allclose(dist[i], ref_dist[:k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("distance,kind,seed", CASES)
def test_exact_search_leave_one_out_matches_brute_force(distance, kind, seed):
    rng = np.random.default_rng(100 + seed)
    x = make_embeddings(rng, 30, 4, kind, distance)
    idx, dist = exact_search(x, x, 29, distance=distance, chunk_size=8, exclude_self=True)
    for i, (ranking, ref_dist) in enumerate(ref_rankings(x, x, distance, True)):
        np.testing.assert_array_equal(idx[i], ranking, err_msg=f"query {i}")
        np.testing.assert_allclose(dist[i], ref_dist, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("distance", DISTANCES)
def test_chunk_size_does_not_change_results(distance):
    rng = np.random.default_rng(7)
    gallery = make_embeddings(rng, 50, 6, "random", distance)
    queries = make_embeddings(rng, 23, 6, "random", distance)
    results = [exact_search(queries, gallery, 10, distance=distance, chunk_size=c) for c in (1, 7, 23, 1000)]
    for idx, dist in results[1:]:
        np.testing.assert_array_equal(idx, results[0][0])
        # BLAS may pick other kernels per chunk size: last-ulp differences only.
        np.testing.assert_allclose(dist, results[0][1], rtol=1e-6, atol=1e-6)


def test_chunks_reuse_one_traced_function():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    exact_search(x, x, 3, chunk_size=6)  # chunks of 6, 6, 6, 2 rows
    fn = _chunk_top_k_fn("squared_l2", False, False)
    before = fn.experimental_get_tracing_count()
    exact_search(x[:9], x, 5, chunk_size=4)
    exact_search(rng.normal(size=(3, 3)).astype(np.float32), x[:7], 2, chunk_size=1)
    assert fn.experimental_get_tracing_count() == before == 1


def test_ties_rank_lower_gallery_index_first():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [-1.0, 0.0], [0.0, -1.0]], np.float32)
    query = np.zeros((1, 2), np.float32)
    # Four items at squared distance 1 (indices 0, 1, 3, 4), then item 2 at 50.
    idx, dist = exact_search(query, gallery, 5)
    np.testing.assert_array_equal(idx[0], [0, 1, 3, 4, 2])
    np.testing.assert_array_equal(dist[0], [1, 1, 1, 1, 50])
    same = np.tile(np.array([[0.3, -1.7, 2.9]], np.float32), (6, 1))
    for distance in DISTANCES:
        idx, _ = exact_search(np.array([[0.1, 0.2, 0.3]], np.float32), same, 6, distance=distance)
        np.testing.assert_array_equal(idx[0], np.arange(6))


def test_exclude_self_removes_only_the_own_index():
    x = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    idx, dist = exact_search(x, x, 3, exclude_self=True)
    np.testing.assert_array_equal(idx, [[2, 3, 1], [3, 0, 2], [0, 3, 1], [0, 2, 1]])
    np.testing.assert_array_equal(dist[0], [0.0, 1.0, 9.0])  # its duplicate (index 2) stays


def test_distances_stay_in_range_despite_cancellation():
    # Far from the origin, |q|^2 + |g|^2 - 2 q.g cancels catastrophically in float32.
    rng = np.random.default_rng(5)
    x = (1000.0 + rng.normal(size=(40, 8)) * 1e-3).astype(np.float32)
    _, dist = exact_search(x, x, 40, distance="squared_l2")
    assert dist.min() >= 0.0
    _, dist = exact_search(x, -x, 40, distance="cosine")
    assert dist.min() >= 0.0 and dist.max() <= 2.0


def test_gallery_duplicates_are_computed_once():
    x = np.array([[1.0, -0.0], [2.0, 3.0], [1.0, 0.0], [2.0, 3.0], [5.0, 5.0]], np.float32)
    assert ExactSearcher(x).num_distinct == 3  # -0.0 and 0.0 are the same row
    assert ExactSearcher(x[[0, 1, 4]]).num_distinct == 3
    # cosine compares directions: 2 * g normalises to exactly the same unit row.
    assert ExactSearcher(np.concatenate([x, 2 * x]), distance="cosine").num_distinct == 3


def test_exact_searcher_exclude_argument():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    searcher = ExactSearcher(x)
    idx, _ = searcher.search(x[:2], 2, exclude=np.array([-1, 1]))
    np.testing.assert_array_equal(idx, [[0, 1], [0, 2]])


def test_exact_search_accepts_tensors_and_empty_queries():
    x = tf.constant([[0.0], [2.0], [1.0]])
    idx, _ = exact_search(tf.constant([[0.9]]), x, 2)
    np.testing.assert_array_equal(idx, [[2, 0]])
    idx, dist = exact_search(np.zeros((0, 1), np.float32), x, 2)
    assert idx.shape == (0, 2) and dist.shape == (0, 2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(queries=np.zeros((2, 3)), gallery=np.zeros((4, 2)), k=1), "Dimension mismatch"),
        (dict(queries=np.zeros((2, 3)), gallery=np.zeros((4, 3)), k=0), "positive integer"),
        (dict(queries=np.zeros((2, 3)), gallery=np.zeros((4, 3)), k=5), "k=5 is larger than the 4"),
        (dict(queries=np.ones((4, 3)), gallery=np.ones((4, 3)), k=4, exclude_self=True), "leave-one-out"),
        (dict(queries=np.ones((4, 3)), gallery=np.zeros((4, 3)), k=1, exclude_self=True), "same array"),
        (dict(queries=np.zeros((2, 3)), gallery=np.zeros((4, 3)), k=1, distance="l1"), "Unknown distance"),
        (dict(queries=np.zeros(3), gallery=np.zeros((4, 3)), k=1), "2-D"),
        (dict(queries=np.full((1, 3), np.nan), gallery=np.zeros((4, 3)), k=1), "NaN or Inf"),
        (dict(queries=np.zeros((2, 3)), gallery=np.zeros((4, 3)), k=1, chunk_size=0), "chunk_size"),
    ],
)
def test_exact_search_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        exact_search(**kwargs)


# ----------------------------------------------------------------------------- metrics


def assert_metrics_close(got, expected):
    assert set(got) - {"nmi", "ami"} == set(expected)  # NMI / AMI: tests/test_clustering.py
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("distance,kind,seed", CASES)
def test_leave_one_out_metrics_match_reference(distance, kind, seed):
    rng = np.random.default_rng(200 + seed)
    x = make_embeddings(rng, 36, 4, kind, distance)
    # Classes of sizes 1..8 (the singleton and any label alone after shuffling have R == 0).
    labels = rng.permutation(np.repeat(np.arange(8), np.arange(1, 9))[:36])
    ks = (1, 3, 10)
    got = retrieval_metrics(x, labels, ks=ks, distance=distance, chunk_size=5)
    expected = ref_metrics(x, labels, None, None, ks, distance)
    assert expected["num_queries_without_match"] >= 1
    assert_metrics_close(got, expected)


@pytest.mark.parametrize("distance,kind,seed", CASES)
def test_query_to_gallery_metrics_match_reference(distance, kind, seed):
    rng = np.random.default_rng(300 + seed)
    gallery = make_embeddings(rng, 45, 4, kind, distance)
    gallery_labels = rng.integers(0, 6, size=45)
    gallery_labels[gallery_labels == 5] = 4  # label 5 never in the gallery
    queries = np.concatenate([make_embeddings(rng, 15, 4, kind, distance), gallery[:5]])
    query_labels = rng.integers(0, 6, size=20)
    query_labels[:2] = 5  # queries without any match
    ks = (1, 5, 20)
    got = retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=ks, distance=distance, chunk_size=6)
    expected = ref_metrics(queries, query_labels, gallery, gallery_labels, ks, distance)
    assert expected["num_queries_without_match"] >= 2
    assert_metrics_close(got, expected)


def test_metrics_do_not_depend_on_chunk_size():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=40)
    results = [retrieval_metrics(x, labels, ks=(1, 5), chunk_size=c) for c in (1, 7, 100)]
    for other in results[1:]:
        assert other == pytest.approx(results[0], abs=1e-12)  # summation order only


def test_hand_computed_query_to_gallery():
    # 1-D embeddings. Gallery at 1..5 with labels A B A B A.
    gallery = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]], np.float32)
    gallery_labels = np.array(["A", "B", "A", "B", "A"])
    queries = np.array([[0.0], [10.0], [3.0]], np.float32)
    query_labels = np.array(["A", "B", "C"])
    # q0 (A, R=3): ranking A B A B A -> rel(1..3) = 1 0 1: R-Prec 2/3, MAP@R (1 + 2/3)/3 = 5/9.
    # q1 (B, R=2): ranking A(5) B(4) A(3) B(2) A(1) -> rel(1..2) = 0 1: R-Prec 1/2,
    #              MAP@R (0 + 1/2)/2 = 1/4.
    # q2 (C): no match, excluded.
    got = retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 2), clustering=False)
    assert got == pytest.approx(
        {
            "recall_at_1": 0.5,
            "recall_at_2": 1.0,
            "precision_at_1": 0.5,
            "r_precision": (2 / 3 + 1 / 2) / 2,  # 7/12
            "map_at_r": (5 / 9 + 1 / 4) / 2,  # 29/72
            "num_queries": 2.0,
            "num_queries_without_match": 1.0,
        },
        abs=1e-12,
    )


def test_hand_computed_leave_one_out():
    # Points 0, 1, 3, 6 with labels A A B A.
    # q0 (A, R=2): others 1(A) 3(B) 6(A) -> rel 1 0: R-Prec 1/2, MAP@R 1/2.
    # q1 (A, R=2): others 0(A) 3(B) 6(A) -> rel 1 0: R-Prec 1/2, MAP@R 1/2.
    # q2 (B, R=0): excluded.
    # q3 (A, R=2): others 3(B) 1(A) 0(A) -> rel 0 1: R-Prec 1/2, MAP@R (1/2)/2 = 1/4.
    x = np.array([[0.0], [1.0], [3.0], [6.0]], np.float32)
    got = retrieval_metrics(x, [0, 0, 1, 0], ks=(1, 2), clustering=False)
    assert got == pytest.approx(
        {
            "recall_at_1": 2 / 3,
            "recall_at_2": 1.0,
            "precision_at_1": 2 / 3,
            "r_precision": 0.5,
            "map_at_r": (0.5 + 0.5 + 0.25) / 3,  # 5/12
            "num_queries": 3.0,
            "num_queries_without_match": 1.0,
        },
        abs=1e-12,
    )


def test_metric_ties_follow_gallery_order():
    query, labels = np.zeros((1, 1), np.float32), [1]
    equidistant = np.array([[-1.0], [1.0]], np.float32)
    assert retrieval_metrics(query, labels, equidistant, [0, 1], ks=(1,))["precision_at_1"] == 0.0
    assert retrieval_metrics(query, labels, equidistant, [1, 0], ks=(1,))["precision_at_1"] == 1.0


def test_map_at_r_uses_the_full_class_size():
    # One query, class of size 6 in a gallery of 8, k_max = 1 << R: the top-R list must
    # still be ranked in full. Ranking by distance: A A B A A A B A (indices 0..7).
    gallery = np.arange(1, 9, dtype=np.float32)[:, None]
    labels = np.array([0, 0, 1, 0, 0, 0, 1, 0])
    got = retrieval_metrics(np.zeros((1, 1), np.float32), [0], gallery, labels, ks=(1,), chunk_size=1)
    # rel(1..6) = 1 1 0 1 1 1 -> R-Prec 5/6; MAP@R = (1 + 1 + 3/4 + 4/5 + 5/6) / 6.
    assert got["r_precision"] == pytest.approx(5 / 6, abs=1e-12)
    assert got["map_at_r"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 5 + 5 / 6) / 6, abs=1e-12)


def test_no_query_with_a_match_gives_nan_means():
    got = retrieval_metrics(np.eye(3, dtype=np.float32), [0, 1, 2], ks=(1,))
    assert math.isnan(got["map_at_r"]) and math.isnan(got["recall_at_1"])
    assert got["num_queries"] == 0.0 and got["num_queries_without_match"] == 3.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ks=(1, 4)), "recall_at_4 needs at least 4 other queries"),
        (dict(ks=()), "non-empty"),
        (dict(ks=(0,)), "positive"),
        (dict(gallery_embeddings=np.zeros((3, 2))), "Pass both"),
        (dict(query_labels=[0, 1]), "query_labels has 2"),
        (dict(query_labels=np.zeros((4, 2))), "1-D"),
        (dict(distance="euclid"), "Unknown distance"),
    ],
)
def test_retrieval_metrics_errors(kwargs, message):
    args = dict(query_embeddings=np.eye(4, 2, dtype=np.float32), query_labels=[0, 0, 1, 1])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**args)


def test_format_metrics_table():
    text = format_metrics_table({"recall_at_1": 0.5, "map_at_r": 1 / 3, "num_queries": 12.0})
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert lines[2].split() == ["recall_at_1", "0.5000"]
    assert lines[3].split() == ["map_at_r", "0.3333"]
    assert lines[4].split() == ["num_queries", "12"]


# ----------------------------------------------------------------------------- callback


def _tiny_model() -> keras.Model:
    inputs = keras.Input((4,))
    outputs = keras.layers.UnitNormalization()(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    return model


def _tiny_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = rng.normal(size=(32, 3)).astype(np.float32)
    val_x = rng.normal(size=(24, 4)).astype(np.float32)
    val_labels = np.repeat(np.arange(6), 4)
    return x, y, val_x, val_labels


class _LogsRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(sorted(logs))


def test_callback_writes_metrics_to_history_and_early_stopping_reads_them():
    x, y, val_x, val_labels = _tiny_data()
    model = _tiny_model()
    evaluation = RetrievalEvaluation(val_x, val_labels, ks=(1, 5), batch_size=7)
    stopping = keras.callbacks.EarlyStopping(monitor="val_recall_at_1", mode="max", patience=5)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[evaluation, stopping])
    keys = ["recall_at_1", "recall_at_5", "precision_at_1", "r_precision", "map_at_r"]
    for key in keys:
        assert len(history.history[f"val_{key}"]) == 2, key
    # Query counts are not metrics: not in the logs (TensorBoard, CSV), but in last_metrics.
    assert not [k for k in history.history if "num_queries" in k]
    assert evaluation.last_metrics["num_queries"] == len(val_labels)
    # EarlyStopping saw the values (its best is the max of the logged series).
    assert stopping.best == pytest.approx(max(history.history["val_recall_at_1"]))
    # The last logged values are the metrics of the trained model.
    expected = retrieval_metrics(model.predict(val_x, verbose=0), val_labels, ks=(1, 5))
    assert evaluation.last_metrics == pytest.approx(expected)
    assert {k: v[-1] for k, v in history.history.items() if k.startswith("val_")} == pytest.approx(
        {f"val_{k}": v for k, v in expected.items() if not k.startswith("num_")}
    )


def test_callback_every_n_epochs_and_last_epoch_with_dataset_inputs():
    x, y, val_x, val_labels = _tiny_data(1)
    gallery_x, gallery_labels = val_x[::2], val_labels[::2]
    model = _tiny_model()
    evaluation = RetrievalEvaluation(
        tf.data.Dataset.from_tensor_slices(val_x).batch(5),
        val_labels,
        gallery_images=gallery_x,
        gallery_labels=gallery_labels,
        ks=(1, 3),
        every_n_epochs=2,
        prefix="shop_",
    )
    recorder = _LogsRecorder()
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[evaluation, recorder])
    evaluated = ["shop_recall_at_1" in keys for keys in recorder.seen]
    assert evaluated == [False, True, True]  # epoch 2 (every 2) and epoch 3 (the last)
    expected = retrieval_metrics(
        model.predict(val_x, verbose=0), val_labels, model.predict(gallery_x, verbose=0), gallery_labels, ks=(1, 3)
    )
    assert evaluation.last_epoch == 2
    assert evaluation.last_metrics == pytest.approx(expected)


def test_callback_errors():
    _, _, val_x, val_labels = _tiny_data()
    with pytest.raises(ValueError, match="24 rows but query_labels has 23"):
        RetrievalEvaluation(val_x, val_labels[:-1])
    with pytest.raises(ValueError, match="Pass both"):
        RetrievalEvaluation(val_x, val_labels, gallery_images=val_x)
    with pytest.raises(ValueError, match="every_n_epochs"):
        RetrievalEvaluation(val_x, val_labels, every_n_epochs=0)
    dropped = RetrievalEvaluation(
        tf.data.Dataset.from_tensor_slices(val_x).batch(5, drop_remainder=True), val_labels, ks=(1,)
    )
    dropped.set_model(_tiny_model())
    with pytest.raises(ValueError, match="produced 20 query embeddings but there are 24"):
        dropped.evaluate()

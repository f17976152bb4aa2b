"""Executable specification of atl_keras.distances, atl_keras.losses (triplet, mining) and
atl_keras.margins.batch.

The fast keras.ops code is checked against `reference_triplets` (float64 loops
over every triplet, and op-by-op transcriptions of TensorFlow Addons).
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import reference_triplets as ref  # noqa: E402
import atl_keras.losses.mining as mining_module  # noqa: E402
import atl_keras.margins.batch as margin_batch_module  # noqa: E402
from atl_keras.distances import max_distance, pairwise_distances  # noqa: E402
from atl_keras.margins import adaptive_margins  # noqa: E402
from atl_keras.losses import (  # noqa: E402
    MINING_MODES,
    AdaptiveTripletLoss,
    TripletLoss,
    adaptive_triplet_loss,
    margin_triplet_loss,
    triplet_loss,
    triplet_statistics,
)

DISTANCE_KINDS = ("squared_l2", "l2", "cosine")
TOL = 1e-5


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_batch(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [B] int64, unit embeddings [B, 6] float32, text [B, 5] float32)."""
    rng = np.random.default_rng(seed)
    if kind == "pk":  # 4 items x 3 images
        labels = np.repeat(rng.choice(1000, 4, replace=False), 3)
    elif kind == "random":
        labels = rng.integers(0, 4, size=11)
    elif kind == "singletons":  # some labels appear once
        labels = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5])
    elif kind == "no_positive":
        labels = np.arange(7)
    elif kind == "one_label":
        labels = np.zeros(6, dtype=np.int64)
    elif kind == "b1":
        labels = np.array([3])
    elif kind == "duplicates":  # exact duplicates within and across labels
        labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    else:
        raise ValueError(kind)
    b = len(labels)
    emb = unit(rng.normal(size=(b, 6)))
    if kind == "duplicates":
        emb[1] = emb[0]  # positive pair at distance 0
        emb[3] = emb[2]  # negative tied with a positive of anchor 0 (d_an == d_ap)
        emb[6] = emb[5]
    text = rng.normal(size=(b, 5)).astype(np.float32)
    return labels.astype(np.int64), emb, text


# (batch kind, seed) pairs every reference comparison runs on; batches without
# any valid triplet (no_positive, one_label, b1) have their own test below.
REFERENCE_BATCHES = (("pk", 0), ("random", 0), ("singletons", 0), ("duplicates", 0))


# ---------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_pairwise_distances_match_loops(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    x[4] = x[2]
    y = rng.normal(size=(3, 5)).astype(np.float32)
    got = keras.ops.convert_to_numpy(pairwise_distances(x, distance=kind))
    np.testing.assert_allclose(got, ref.distance_matrix(x, kind), atol=TOL)
    assert np.all(np.diag(got) == 0.0)
    assert got[4, 2] == 0.0 and got[2, 4] == 0.0  # duplicates are exactly 0
    got_xy = keras.ops.convert_to_numpy(pairwise_distances(x, y, distance=kind))
    np.testing.assert_allclose(got_xy, ref.distance_matrix(x, kind, y), atol=TOL)


def test_max_distance_and_unknown_distance():
    assert (max_distance("squared_l2"), max_distance("l2"), max_distance("cosine")) == (4, 2, 2)
    with pytest.raises(ValueError, match="'squared_l2', 'l2', 'cosine'"):
        pairwise_distances(np.ones((2, 2), np.float32), distance="manhattan")


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_distance_gradient_finite_at_duplicates(kind):
    x = tf.constant([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        d = tf.reduce_sum(pairwise_distances(x, distance=kind))
    grad = tape.gradient(d, x).numpy()
    assert np.all(np.isfinite(grad))


# ---------------------------------------------------------------------------
# losses vs the loop reference
# ---------------------------------------------------------------------------


@pytest.fixture(params=["compact", "sorted"])
def path(request, monkeypatch):
    """Run a test on both algorithms: few positives per anchor ([B, Q, B], no
    sort) and the O(B^2 log B) sort/searchsorted/suffix-max path."""
    mining = request.node.callspec.params.get("mining")
    if request.param == "sorted" and mining == "batch_hard":
        pytest.skip("batch_hard has a single algorithm")
    slots = (64,) if request.param == "compact" else ()  # test batches have B <= 12
    monkeypatch.setattr(mining_module, "_COMPACT_SLOTS", slots)
    return request.param


@pytest.mark.parametrize(
    "mining,kind,soft", list(itertools.product(MINING_MODES, DISTANCE_KINDS, (False, True)))
)
def test_triplet_loss_matches_reference(mining, kind, soft, path):
    for batch_kind, seed in REFERENCE_BATCHES:
        labels, emb, _ = make_batch(batch_kind, seed)
        got = float(triplet_loss(labels, emb, 0.3, mining, kind, soft))
        want = ref.reference_loss(labels, emb, mining, kind, soft, margin=0.3)
        assert abs(got - want) < TOL, (batch_kind, seed, got, want)


@pytest.mark.parametrize(
    "mining,kind,soft", list(itertools.product(MINING_MODES, DISTANCE_KINDS, (False, True)))
)
def test_adaptive_loss_matches_reference(mining, kind, soft, path):
    tau = 0.3 * max_distance(kind)  # masks a fair share of the negatives
    for i, (batch_kind, seed) in enumerate(REFERENCE_BATCHES):
        threshold = tau if i % 2 else None
        labels, emb, text = make_batch(batch_kind, seed)
        got = float(
            adaptive_triplet_loss(labels, emb, text, 0.05, 0.6, mining, kind, threshold, soft)
        )
        want = ref.reference_loss(
            labels, emb, mining, kind, soft, text=text, min_margin=0.05,
            max_margin=0.6, semantic_threshold=threshold,
        )
        assert abs(got - want) < TOL, (batch_kind, seed, threshold, got, want)


def test_semantic_threshold_changes_the_loss():
    """The masking test above must be able to fail: tau really removes negatives."""
    labels, emb, text = make_batch("random", 3)
    plain = float(adaptive_triplet_loss(labels, emb, text, mining="batch_hard"))
    masked = float(adaptive_triplet_loss(labels, emb, text, mining="batch_hard",
                                         semantic_threshold=1.8))
    assert abs(plain - masked) > 1e-3


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_loss_classes_match_functions(kind):
    labels, emb, text = make_batch("pk", 2)
    for mining in MINING_MODES:
        got = float(TripletLoss(0.25, mining, kind)(labels, emb))
        assert got == pytest.approx(ref.reference_loss(labels, emb, mining, kind, margin=0.25),
                                    abs=TOL)
        y = {"label": labels, "text_embedding": text}
        got = float(AdaptiveTripletLoss(0.1, 0.4, mining, kind)(y, emb))
        want = ref.reference_loss(labels, emb, mining, kind, text=text, min_margin=0.1,
                                  max_margin=0.4)
        assert got == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize(
    "mining,kind,soft", list(itertools.product(MINING_MODES, DISTANCE_KINDS, (False, True)))
)
def test_equal_margins_give_exactly_the_triplet_loss(mining, kind, soft):
    for batch_kind in ("random", "duplicates"):
        labels, emb, text = make_batch(batch_kind, 4)
        base = float(triplet_loss(labels, emb, 0.35, mining, kind, soft))
        atl = float(adaptive_triplet_loss(labels, emb, text, 0.35, 0.35, mining, kind,
                                          soft_margin=soft))
        assert atl == base


def test_large_margin_range_differs_from_triplet():
    labels, emb, text = make_batch("pk", 5)
    assert float(adaptive_triplet_loss(labels, emb, text, 0.0, 2.0)) != pytest.approx(
        float(triplet_loss(labels, emb, 0.2)), abs=1e-3)


# ---------------------------------------------------------------------------
# TensorFlow Addons semantics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_semi_hard_equals_tfa_triplet_semihard_loss(kind):
    for seed in range(3):
        labels, emb, _ = make_batch("pk", seed)  # every anchor has both
        for margin in (0.1, 1.0):
            got = float(triplet_loss(labels, emb, margin, "semi_hard", kind))
            assert got == pytest.approx(ref.tfa_semihard_loss(labels, emb, margin, kind), abs=TOL)


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_batch_hard_equals_tfa_triplet_hard_loss(kind):
    for seed in range(3):
        labels, emb, _ = make_batch("pk", seed)
        got = float(triplet_loss(labels, emb, 0.5, "batch_hard", kind))
        assert got == pytest.approx(ref.tfa_hard_loss(labels, emb, 0.5, False, kind), abs=TOL)
        # tfa's soft variant ignores the margin: ours with soft_margin and margin 0.
        got = float(triplet_loss(labels, emb, 0.0, "batch_hard", kind, soft_margin=True))
        assert got == pytest.approx(ref.tfa_hard_loss(labels, emb, 0.5, True, kind), abs=TOL)


# ---------------------------------------------------------------------------
# Numerics: degenerate batches, duplicates, gradients, mixed precision.
# ---------------------------------------------------------------------------


def _loss_and_grad(fn, emb):
    x = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = fn(x)
    return float(value), tape.gradient(value, x).numpy()


@pytest.mark.parametrize("batch_kind", ["no_positive", "one_label", "b1"])
def test_no_valid_triplet_gives_zero_loss_and_zero_gradient(batch_kind):
    labels, emb, text = make_batch(batch_kind, 0)
    cases = itertools.product(MINING_MODES, (False, True))
    for i, (mining, soft) in enumerate(cases):
        kind = DISTANCE_KINDS[i % len(DISTANCE_KINDS)]
        for fn in (
            lambda x: triplet_loss(labels, x, 0.2, mining, kind, soft),
            lambda x: adaptive_triplet_loss(labels, x, text, 0.1, 0.5, mining, kind,
                                            soft_margin=soft),
        ):
            value, grad = _loss_and_grad(fn, emb)
            assert value == 0.0
            assert np.all(grad == 0.0)


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_gradients_finite_at_duplicated_embeddings(kind):
    labels, emb, text = make_batch("duplicates", 0)
    emb[:] = emb[0]  # every embedding identical: all distances 0
    for mining, soft in itertools.product(MINING_MODES, (False, True)):
        for fn in (
            lambda x: triplet_loss(labels, x, 0.2, mining, kind, soft),
            lambda x: adaptive_triplet_loss(labels, x, text, 0.1, 0.5, mining, kind,
                                            soft_margin=soft),
        ):
            value, grad = _loss_and_grad(fn, emb)
            assert np.isfinite(value) and value > 0.0
            assert np.all(np.isfinite(grad)), (mining, soft)


@pytest.mark.parametrize(
    "mining,kind,soft",
    [(m, k, s) for m in MINING_MODES for k in ("squared_l2", "l2") for s in (False, True)],
)
def test_gradient_matches_finite_differences_of_reference(mining, kind, soft, path):
    labels, emb, text = make_batch("pk", 7)
    emb = emb[:8].astype(np.float64)
    labels = labels[:8]
    kwargs = dict(text=text[:8], min_margin=0.1, max_margin=0.9)
    _, grad = _loss_and_grad(
        lambda x: adaptive_triplet_loss(labels, x, text[:8], 0.1, 0.9, mining, kind,
                                        soft_margin=soft),
        emb.astype(np.float32),
    )
    eps = 1e-5
    numeric = np.zeros_like(emb)
    for i, j in itertools.product(range(emb.shape[0]), range(emb.shape[1])):
        plus, minus = emb.copy(), emb.copy()
        plus[i, j] += eps
        minus[i, j] -= eps
        numeric[i, j] = (ref.reference_loss(labels, plus, mining, kind, soft, **kwargs)
                         - ref.reference_loss(labels, minus, mining, kind, soft, **kwargs)) / (2 * eps)
    assert np.abs(numeric).max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(grad, numeric, atol=2e-3)


@pytest.fixture
def mixed_float16():
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_mixed_precision_computes_in_float32(mixed_float16):
    labels, emb, text = make_batch("pk", 1)
    emb16 = tf.constant(emb, tf.float16)
    emb32 = tf.cast(emb16, tf.float32)
    y = {"label": labels, "text_embedding": tf.constant(text, tf.float16)}
    for mining in MINING_MODES:
        for loss in (TripletLoss(mining=mining), AdaptiveTripletLoss(mining=mining)):
            out = loss(y, emb16)
            assert out.dtype == tf.float32
            assert loss.dtype == "float32"
        got = TripletLoss(mining=mining)(labels, emb16)
        np.testing.assert_allclose(float(got), float(triplet_loss(labels, emb32, mining=mining)),
                                   atol=1e-6)
        assert triplet_loss(labels, emb16, mining=mining).dtype == tf.float32


# ---------------------------------------------------------------------------
# Input contract of the Loss classes.
# ---------------------------------------------------------------------------


def test_integer_labels_are_not_cast_to_float():
    """2**24 and 2**24 + 1 collide in float32; the loss must keep them apart."""
    _, emb, _ = make_batch("pk", 0)
    labels = np.array([0, 0, 1, 1, 2, 2] * 2)[: len(emb)]
    big = labels.astype(np.int64) + 2**24
    loss = TripletLoss(mining="batch_hard")
    assert float(loss(big, emb)) == pytest.approx(float(loss(labels, emb)), abs=1e-7)
    assert float(loss(big, emb)) != pytest.approx(
        float(loss(big.astype(np.float32), emb)), abs=1e-4)  # the cast would change it


def test_labels_shape_b1_equals_b():
    labels, emb, text = make_batch("pk", 3)
    loss = AdaptiveTripletLoss(mining="semi_hard")
    a = loss({"label": labels, "text_embedding": text}, emb)
    b = loss({"label": labels[:, None], "text_embedding": text}, emb)
    assert float(a) == float(b)
    assert float(TripletLoss()(labels[:, None], emb)) == float(TripletLoss()(labels, emb))


def test_target_errors_say_what_y_must_look_like():
    labels, emb, _ = make_batch("pk", 0)
    with pytest.raises(ValueError, match="text_embedding"):
        AdaptiveTripletLoss()(labels, emb)
    with pytest.raises(ValueError, match="text_embedding"):
        AdaptiveTripletLoss()({"label": labels}, emb)
    with pytest.raises(ValueError, match="'label'"):
        TripletLoss()({"labels": labels}, emb)
    with pytest.raises(ValueError, match="one label per embedding"):
        triplet_loss(labels[:-1], emb)
    with pytest.raises(ValueError, match="sample_weight"):
        TripletLoss()(labels, emb, sample_weight=np.ones(len(labels)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mining="hardest"), "'batch_all', 'batch_hard', 'semi_hard'"),
        (dict(distance="l1"), "'squared_l2', 'l2', 'cosine'"),
        (dict(min_margin=0.5, max_margin=0.1), "min_margin .* <= max_margin"),
        (dict(min_margin=-0.1), "min_margin must be >= 0"),
        (dict(semantic_threshold=4.5), r"outside \[0, 4.0\]"),
        (dict(semantic_threshold=2.5, distance="cosine"), r"outside \[0, 2.0\]"),
        (dict(semantic_threshold=-0.1), "outside"),
        (dict(soft_margin="yes"), "soft_margin"),
    ],
)
def test_adaptive_loss_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveTripletLoss(**kwargs)


def test_triplet_loss_validates_arguments():
    with pytest.raises(ValueError, match="margin must be >= 0"):
        TripletLoss(margin=-1.0)
    with pytest.raises(ValueError, match="'batch_all', 'batch_hard', 'semi_hard'"):
        TripletLoss(mining="all")
    with pytest.raises(ValueError, match="Valid mining"):
        triplet_loss([0, 0], np.eye(2, dtype=np.float32), mining="random")


# ---------------------------------------------------------------------------
# Serialization and Keras integration.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss",
    [
        TripletLoss(margin=0.3, mining="semi_hard", distance="cosine", soft_margin=True),
        AdaptiveTripletLoss(0.05, 0.7, "batch_hard", "l2", semantic_threshold=0.4, name="atl"),
        AdaptiveTripletLoss(0.1, 0.3, "semi_hard", semantic_threshold=1.0, missing_text_margin=0.8),
    ],
)
def test_config_round_trip(loss):
    labels, emb, text = make_batch("pk", 0)
    y = {"label": labels, "text_embedding": text}
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == config
    assert float(restored(y, emb)) == float(loss(y, emb))


def test_compile_and_fit_plain_sequential_with_integer_labels(path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 10)).astype(np.float32)
    y = np.repeat(np.arange(12) + 2**25, 4).astype(np.int64)
    model = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(8), keras.layers.UnitNormalization()]
    )
    for mining in ("semi_hard",):  # the mode with a sort, a scan and a dynamic top_k
        model.compile(optimizer="sgd", loss=TripletLoss(mining=mining))
        history = model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=3, verbose=0,
                            shuffle=False)
        losses = history.history["loss"]
        assert len(losses) == 1 and np.isfinite(losses[0]) and losses[0] > 0.0


# ---------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_triplet_statistics_match_loops(kind):
    for batch_kind in ("pk", "duplicates", "b1"):
        labels, emb, text = make_batch(batch_kind, 5)
        for use_text, threshold in ((False, None), (True, None), (True, 0.5)):
            stats = triplet_statistics(labels, emb, text if use_text else None, margin=0.4,
                                       min_margin=0.2, max_margin=1.0, distance=kind,
                                       semantic_threshold=threshold)
            want = ref.reference_statistics(labels, emb, kind, 0.4, text if use_text else None,
                                            0.2, 1.0, threshold)
            for key, value in want.items():
                assert float(stats[key]) == pytest.approx(value, abs=1e-5), (batch_kind, key)


def test_core_accepts_custom_margin_matrix():
    labels, emb, text = make_batch("random", 6)
    d = pairwise_distances(emb)
    margins = np.full((len(labels), len(labels)), 0.3, np.float32)
    for mining in MINING_MODES:
        got = float(margin_triplet_loss(labels, d, margins, mining=mining))
        assert got == float(triplet_loss(labels, emb, 0.3, mining))


def test_xla_compiled_loss_matches_eager(path):
    """On GPU, Keras' fit jit-compiles by default: every algorithm must compile with XLA."""
    labels, emb, text = make_batch("pk", 8)
    mining = "semi_hard"  # uses every op batch_all uses (top_k / sort / searchsorted / cumsum)
    compiled = tf.function(
        lambda l, e, t: adaptive_triplet_loss(l, e, t, mining=mining), jit_compile=True
    )
    got = float(compiled(tf.constant(labels), tf.constant(emb), tf.constant(text)))
    assert got == pytest.approx(float(adaptive_triplet_loss(labels, emb, text, mining=mining)),
                                abs=1e-6)


# ---------------------------------------------------------------------------
# Text distances computed once per label (the text is a property of the item).
# ---------------------------------------------------------------------------


def per_label_text(labels: np.ndarray, seed: int, missing_labels=()) -> np.ndarray:
    """``[B, 5]`` float32: every row of a label carries that label's text; labels in
    ``missing_labels`` get all-zero rows (description missing)."""
    rng = np.random.default_rng(seed)
    table = {int(label): rng.normal(size=5).astype(np.float32) for label in np.unique(labels)}
    for label in missing_labels:
        table[int(label)] = np.zeros(5, np.float32)
    return np.stack([table[int(label)] for label in labels])


def break_sharing(labels: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Copy of ``text`` where one label's second row carries a different text."""
    values, counts = np.unique(labels, return_counts=True)
    label = values[np.argmax(counts >= 2)]
    row = np.flatnonzero(labels == label)[1]
    broken = text.copy()
    broken[row] = broken[row] + np.linspace(0.5, 1.5, text.shape[1], dtype=np.float32)
    return broken


@pytest.mark.parametrize("mining,kind", list(itertools.product(MINING_MODES, DISTANCE_KINDS)))
def test_per_label_and_full_text_branches_match_reference(mining, kind):
    """Texts shared per label (per-label branch) and a label with two texts (full
    [B, B] branch) both give the loop reference, with and without masking. (Both
    branches only build the margin matrix; the miners' two algorithms are covered
    for any margin matrix by test_adaptive_loss_matches_reference.)"""
    tau = 0.3 * max_distance(kind)
    for i, (batch_kind, seed) in enumerate((("pk", 0), ("singletons", 0))):
        labels, emb, _ = make_batch(batch_kind, seed)
        shared = per_label_text(labels, seed + 1)
        for j, text in enumerate((shared, break_sharing(labels, shared))):
            threshold = tau if (i + j) % 2 else None
            soft = bool(i % 2)
            got = float(adaptive_triplet_loss(labels, emb, text, 0.05, 0.6, mining, kind,
                                              threshold, soft))
            want = ref.reference_loss(labels, emb, mining, kind, soft, text=text,
                                      min_margin=0.05, max_margin=0.6,
                                      semantic_threshold=threshold)
            assert abs(got - want) < TOL, (batch_kind, j, threshold, got, want)


def test_text_branch_is_chosen_by_the_data(monkeypatch):
    """Eager ops.cond runs one branch: the per-label one exactly when every row of a
    label carries the same text."""
    calls = []
    expand = margin_batch_module._expand_pairs
    monkeypatch.setattr(margin_batch_module, "_expand_pairs",
                        lambda x, index: calls.append(1) or expand(x, index))
    labels, emb, _ = make_batch("pk", 0)
    shared = per_label_text(labels, 1)
    adaptive_triplet_loss(labels, emb, shared)
    assert calls, "texts shared per label must take the per-label branch"
    calls.clear()
    adaptive_triplet_loss(labels, emb, break_sharing(labels, shared))
    assert not calls, "a label with two texts must take the full [B, B] branch"
    calls.clear()
    nan_text = shared.copy()
    nan_text[0, 0] = np.nan  # differs from the other rows of its label
    adaptive_triplet_loss(labels, emb, nan_text)
    assert not calls
    # The check is bitwise: -0.0 vs 0.0 (both "missing") takes the full branch,
    # with the same result.
    signed = per_label_text(labels, 1, missing_labels=(int(labels[0]),))
    signed[1] = -0.0
    got = float(adaptive_triplet_loss(labels, emb, signed, mining="batch_hard"))
    assert not calls
    assert got == pytest.approx(ref.reference_loss(labels, emb, "batch_hard", text=signed),
                                abs=TOL)


def test_per_label_shortcut_alone_would_be_wrong_when_a_label_has_two_texts():
    """Why the check exists: expanding the first row's text over the label changes margins."""
    labels, _, _ = make_batch("pk", 1)
    text = break_sharing(labels, per_label_text(labels, 2))
    margins, distances = adaptive_margins(text, labels=labels)
    want_m, want_d = ref.margin_matrix(len(labels), text=text, kind="squared_l2")
    negative = labels[:, None] != labels[None, :]
    np.testing.assert_allclose(np.asarray(margins)[negative], want_m[negative], atol=TOL)
    np.testing.assert_allclose(np.asarray(distances)[negative], want_d[negative], atol=TOL)
    _, first = np.unique(labels, return_index=True)
    shortcut, _ = adaptive_margins(text[first][np.searchsorted(labels[first], labels)])
    assert np.abs(np.asarray(shortcut) - want_m)[negative].max() > 1e-2


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_adaptive_margins_with_labels_equal_the_full_computation(kind):
    labels, _, _ = make_batch("random", 2)
    text = per_label_text(labels, 3, missing_labels=(int(labels[0]),))
    negative = labels[:, None] != labels[None, :]
    full_m, full_d = adaptive_margins(text, 0.1, 0.7, kind, missing_text_margin=0.9)
    fast_m, fast_d = adaptive_margins(text, 0.1, 0.7, kind, missing_text_margin=0.9,
                                      labels=labels)
    want_m, want_d = ref.margin_matrix(len(labels), text=text, min_margin=0.1, max_margin=0.7,
                                       kind=kind, missing_text_margin=0.9)
    for got_m, got_d in ((full_m, full_d), (fast_m, fast_d)):
        np.testing.assert_allclose(np.asarray(got_m)[negative], want_m[negative], atol=TOL)
        np.testing.assert_allclose(np.asarray(got_d)[negative], want_d[negative], atol=TOL)
    assert np.asarray(fast_m).shape == (len(labels), len(labels))


def test_text_branches_in_graph_and_xla():
    """In a tf.function the branch is a real graph cond, chosen per batch by one
    trace; with XLA, tf.unique has a dynamic size. Both branches give the reference."""
    labels, emb, _ = make_batch("pk", 4)
    shared = per_label_text(labels, 5, missing_labels=(int(labels[0]),))
    for jit in (False, True):
        fn = tf.function(lambda l, e, t: adaptive_triplet_loss(
            l, e, t, mining="batch_hard", semantic_threshold=1.0), jit_compile=jit)
        for text in (shared, break_sharing(labels, shared)):
            want = ref.reference_loss(labels, emb, "batch_hard", text=text,
                                      semantic_threshold=1.0)
            got = float(fn(tf.constant(labels), tf.constant(emb), tf.constant(text)))
            assert got == pytest.approx(want, abs=TOL), jit
        assert fn.experimental_get_tracing_count() == 1


def test_backends_without_label_groups_compute_the_full_matrix(monkeypatch):
    monkeypatch.setattr(margin_batch_module, "_label_groups", lambda labels: None)
    labels, emb, _ = make_batch("pk", 6)
    text = per_label_text(labels, 7)
    for mining in MINING_MODES:
        got = float(adaptive_triplet_loss(labels, emb, text, mining=mining))
        assert got == pytest.approx(ref.reference_loss(labels, emb, mining, text=text), abs=TOL)


# ---------------------------------------------------------------------------
# Missing descriptions (all-zero text embeddings).
# ---------------------------------------------------------------------------


def with_missing_rows(labels: np.ndarray, text: np.ndarray) -> np.ndarray:
    """``text`` with the rows of one label and one extra single row all-zero."""
    out = text.copy()
    out[labels == labels[0]] = 0.0
    out[-1] = 0.0
    return out


@pytest.mark.parametrize("mining,kind", list(itertools.product(MINING_MODES, DISTANCE_KINDS)))
def test_missing_text_matches_reference(mining, kind):
    tau = 0.4 * max_distance(kind)
    cases = [(None, None), (0.9, tau), (0.0, None), (None, tau)]
    for i, (batch_kind, seed) in enumerate((("random", 0), ("duplicates", 0))):
        labels, emb, text = make_batch(batch_kind, seed)
        texts = (with_missing_rows(labels, text),  # per row (full branch)
                 per_label_text(labels, seed, missing_labels=(int(labels[-1]),)))  # per label
        for j, text in enumerate(texts):
            missing_margin, threshold = cases[(i + 2 * j) % len(cases)]
            soft = bool(j)
            got = float(adaptive_triplet_loss(labels, emb, text, 0.05, 0.6, mining, kind,
                                              threshold, soft, missing_margin))
            want = ref.reference_loss(labels, emb, mining, kind, soft, text=text,
                                      min_margin=0.05, max_margin=0.6,
                                      semantic_threshold=threshold,
                                      missing_text_margin=missing_margin)
            assert abs(got - want) < TOL, (batch_kind, j, missing_margin, threshold, got, want)


@pytest.mark.parametrize("mining,soft", list(itertools.product(MINING_MODES, (False, True))))
def test_all_texts_missing_is_the_triplet_loss_with_missing_text_margin(mining, soft):
    for i, batch_kind in enumerate(("pk", "random", "duplicates")):
        kind = DISTANCE_KINDS[i]
        labels, emb, text = make_batch(batch_kind, 8)
        zeros = np.zeros_like(text)
        want = float(triplet_loss(labels, emb, 0.45, mining, kind, soft))
        for threshold in (None, 0.5 * max_distance(kind)):  # never masks missing texts
            got = float(adaptive_triplet_loss(labels, emb, zeros, 0.05, 0.6, mining, kind,
                                              threshold, soft, missing_text_margin=0.45))
            assert got == want, (batch_kind, threshold)
        midpoint = float(triplet_loss(labels, emb, (0.05 + 0.6) / 2, mining, kind, soft))
        assert float(adaptive_triplet_loss(labels, emb, zeros, 0.05, 0.6, mining, kind,
                                           soft_margin=soft)) == midpoint


def test_missing_text_margin_is_used():
    """The reference comparison above must be able to fail: the value matters."""
    labels, emb, text = make_batch("pk", 9)
    text = with_missing_rows(labels, text)
    low = float(adaptive_triplet_loss(labels, emb, text, mining="batch_hard",
                                      missing_text_margin=0.0))
    high = float(adaptive_triplet_loss(labels, emb, text, mining="batch_hard",
                                       missing_text_margin=1.5))
    assert high - low > 1e-2
    loss = AdaptiveTripletLoss(mining="batch_hard", missing_text_margin=1.5)
    assert float(loss({"label": labels, "text_embedding": text}, emb)) == high


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan"), "wide", True])
def test_missing_text_margin_is_validated(value):
    with pytest.raises(ValueError, match=r"missing_text_margin"):
        AdaptiveTripletLoss(missing_text_margin=value)
    labels, emb, text = make_batch("pk", 0)
    with pytest.raises(ValueError, match=r"missing_text_margin"):
        adaptive_triplet_loss(labels, emb, text, missing_text_margin=value)
    with pytest.raises(ValueError, match=r"missing_text_margin"):
        adaptive_margins(text, missing_text_margin=value)


def test_missing_text_margin_config_default():
    config = AdaptiveTripletLoss(0.1, 0.5).get_config()
    assert config["missing_text_margin"] is None  # the midpoint, resolved per call
    assert AdaptiveTripletLoss(missing_text_margin=0).get_config()["missing_text_margin"] == 0.0


@pytest.mark.parametrize("kind", DISTANCE_KINDS)
def test_triplet_statistics_with_missing_text(kind):
    labels, emb, text = make_batch("pk", 10)
    text = with_missing_rows(labels, text)
    for missing_margin, threshold in ((None, None), (0.05, 0.6 * max_distance(kind))):
        stats = triplet_statistics(labels, emb, text, min_margin=0.2, max_margin=1.0,
                                   distance=kind, semantic_threshold=threshold,
                                   missing_text_margin=missing_margin)
        want = ref.reference_statistics(labels, emb, kind, text=text, min_margin=0.2,
                                        max_margin=1.0, semantic_threshold=threshold,
                                        missing_text_margin=missing_margin)
        for key, value in want.items():
            assert float(stats[key]) == pytest.approx(value, abs=1e-5), (key, threshold)

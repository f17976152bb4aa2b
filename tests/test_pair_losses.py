"""The pair-loss family and ArcFace: PML 2.9 values, loop references, miners, memory, Keras.

- PML: `tests/data/pair_losses_pml.json` (tools/make_pair_loss_reference.py, float64)
  holds PML 2.9's values and gradients on P x K, uneven, no-positive, no-negative,
  one-row and zero-distance batches; ours must agree within 1e-4 in float32 (and 1e-8 in
  float64, where both compute the same formula).
- Loops: `tests/reference_pairs.py` for the weak-label variants.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import atl_keras as atl
from atl_keras.losses.arcface import ArcFaceLoss, arcface_loss
from atl_keras.losses.circle import CircleLoss, circle_loss
from atl_keras.losses.contrastive import ContrastiveLoss, contrastive_loss
from atl_keras.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
from atl_keras.losses.pair_miners import DistanceWeightedMiner, MultiSimilarityMiner
from atl_keras.losses.pairs import pair_batch
from atl_keras.losses.supcon import SupConLoss, supcon_loss
from atl_keras.margins.weak_label import WeakLabelMargins
from tests import reference_pairs as ref
from tests.conftest import REPO_ROOT

PML = json.loads((REPO_ROOT / "tests" / "data" / "pair_losses_pml.json").read_text())
PAIR_FUNCTIONS = {
    "contrastive": contrastive_loss,
    "multi_similarity": multi_similarity_loss,
    "circle": circle_loss,
    "supcon": supcon_loss,
}
TOLERANCE = {"float64": 1e-8, "float32": 1e-4}


def _value_and_grad(fn, *inputs):
    inputs = [tf.constant(x) for x in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        value = fn(*inputs)
    grads = tape.gradient(value, inputs)
    return float(value), [np.zeros(x.shape) if g is None else g.numpy() for g in grads]


def _pml_results(kind):
    for case in PML["cases"]:
        for result in case["results"]:
            if kind(result):
                yield case, result


def _pml_id(item):
    case, result = item
    mined = "+miner" if result.get("miner_epsilon") else ""
    return f"{case['name']}-{result['loss']}{mined}-{json.dumps(result['kwargs'], sort_keys=True)}"


PAIR_CASES = list(_pml_results(lambda r: r["loss"] in PAIR_FUNCTIONS))
ARCFACE_CASES = list(_pml_results(lambda r: r["loss"] not in PAIR_FUNCTIONS))


def test_reference_file_is_pml_2_9():
    assert PML["pytorch_metric_learning"].startswith("2.9")
    names = {r["loss"] for _, r in PAIR_CASES + ARCFACE_CASES}
    assert names == {*PAIR_FUNCTIONS, "arcface", "sub_center_arcface"}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("item", PAIR_CASES, ids=[_pml_id(i) for i in PAIR_CASES])
def test_pair_losses_match_pml(item, dtype):
    case, result = item
    labels = np.asarray(case["labels"])
    fn = PAIR_FUNCTIONS[result["loss"]]
    miner = MultiSimilarityMiner(result["miner_epsilon"]) if result.get("miner_epsilon") else None
    value, (grad,) = _value_and_grad(
        lambda e: fn(labels, e, miner=miner, **result["kwargs"]),
        np.asarray(case["embeddings"], dtype))
    tol = TOLERANCE[dtype]
    assert value == pytest.approx(result["value"], abs=tol, rel=tol)
    np.testing.assert_allclose(grad, result["grad_embeddings"], atol=tol)


@pytest.mark.parametrize("item", [i for i in PAIR_CASES if i[1].get("miner_epsilon")],
                         ids=lambda i: i[0]["name"])
def test_multi_similarity_miner_keeps_pml_pairs(item):
    case, result = item
    batch = MultiSimilarityMiner(result["miner_epsilon"]).select_pairs(
        pair_batch(np.asarray(case["labels"]), np.asarray(case["embeddings"])))
    assert sorted(map(list, np.argwhere(batch.positive.numpy()))) == result["mined_positive_pairs"]
    assert sorted(map(list, np.argwhere(batch.negative.numpy()))) == result["mined_negative_pairs"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("item", ARCFACE_CASES, ids=[_pml_id(i) for i in ARCFACE_CASES])
def test_arcface_matches_pml(item, dtype):
    case, result = item
    labels = np.asarray(case["labels"])
    kwargs = {k: v for k, v in result["kwargs"].items() if k != "sub_centers"}
    value, (grad_e, grad_p) = _value_and_grad(
        lambda e, p: arcface_loss(labels, e, p, sub_centers=result["sub_centers"], **kwargs),
        np.asarray(case["embeddings"], dtype), np.asarray(result["proxies"], dtype))
    tol = TOLERANCE[dtype]
    assert value == pytest.approx(result["value"], abs=tol, rel=tol)
    assert np.all(np.isfinite(grad_e)) and np.all(np.isfinite(grad_p))
    if result["grad_embeddings"] is not None:  # None: an embedding on its proxy (PML: acos)
        np.testing.assert_allclose(grad_e, result["grad_embeddings"], atol=tol)
        np.testing.assert_allclose(grad_p, result["grad_proxies"], atol=tol)


# ------------------------------------------------------------------ weak labels vs loops
def _weak_batch(seed=0, batch=12, dim=5, text_dim=6):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(batch // 3), 3)
    emb = rng.normal(size=(batch, dim))
    text = rng.normal(size=(batch // 3, text_dim))[labels]
    return labels, emb, text


@pytest.mark.parametrize("threshold", [None, 1.5])
def test_weak_label_variants_match_loops(threshold):
    labels, emb, text = _weak_batch()
    weak = WeakLabelMargins(0.1, 0.5, semantic_threshold=threshold)
    margins, keep = ref.text_margins(labels, text, 0.1, 0.5, threshold)
    relax = 0.5 - margins
    y = {"label": labels, "text_embedding": text}
    cases = [
        (ContrastiveLoss(weak_label=weak), ref.contrastive(labels, emb, neg_margins=1.0 - relax, keep=keep)),
        (MultiSimilarityLoss(weak_label=weak), ref.multi_similarity(labels, emb, neg_bases=0.5 + relax, keep=keep)),
        (CircleLoss(weak_label=weak), ref.circle(labels, emb, neg_relaxations=0.4 + relax, keep=keep)),
    ]
    for loss, want in cases:
        assert float(loss(y, emb)) == pytest.approx(want, rel=1e-5), type(loss).__name__
        assert want != pytest.approx(float(type(loss)()(labels, emb)), rel=1e-3)  # margins matter


def test_weak_label_with_equal_range_is_the_plain_loss():
    labels, emb, text = _weak_batch(1)
    y = {"label": labels, "text_embedding": text}
    for cls in (ContrastiveLoss, MultiSimilarityLoss, CircleLoss):
        plain = float(cls()(labels, emb))
        weak = float(cls(weak_label=WeakLabelMargins(0.3, 0.3))(y, emb))
        assert weak == pytest.approx(plain, rel=1e-6), cls.__name__


def test_weak_label_margin_table_source():
    labels, emb, text = _weak_batch(2)
    items = text[::3]
    table = np.asarray(atl.margins.margin_table("text", text_embeddings=items, min_margin=0.1,
                                                max_margin=0.5), np.float64)
    want = ref.contrastive(labels, emb, neg_margins=1.0 - (table.max() - table[labels][:, labels]))
    got = ContrastiveLoss(weak_label=WeakLabelMargins(table=table))(labels, emb)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_arcface_class_margins_match_loop():
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 2, 2, 4, 1])
    emb, proxies = rng.normal(size=(6, 4)), rng.normal(size=(5, 4))
    class_text = rng.normal(size=(5, 7))
    margins, _ = ref.text_margins(np.arange(5), class_text, 0.0, 0.3)
    loss = ArcFaceLoss(class_text_embeddings=class_text, min_margin=0.0, max_margin=0.3, scale=16.0)
    want = ref.arcface(labels, emb, proxies, scale=16.0, class_margins=margins)
    assert float(loss(labels, emb, proxies=proxies)) == pytest.approx(want, rel=1e-5)
    plain = ArcFaceLoss(scale=16.0)(labels, emb, proxies=proxies)
    assert float(plain) == pytest.approx(ref.arcface(labels, emb, proxies, scale=16.0), rel=1e-5)


# ------------------------------------------------------------------ numerics and degenerate batches
ALL_LOSSES = [ContrastiveLoss, MultiSimilarityLoss, CircleLoss, SupConLoss]


@pytest.mark.parametrize("cls", ALL_LOSSES)
def test_zero_distance_batch_is_finite(cls):
    emb = np.tile(np.array([[0.6, 0.8, 0.0]], np.float32), (6, 1))  # every pair at distance 0
    value, (grad,) = _value_and_grad(lambda e: cls()(np.array([0, 0, 1, 1, 2, 2]), e), emb)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_arcface_on_its_proxy_is_finite():
    emb = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    value, grads = _value_and_grad(lambda e, p: ArcFaceLoss()([0, 1], e, proxies=p), emb, emb.copy())
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("cls,labels", [
    *[(cls, [7]) for cls in ALL_LOSSES],  # one row: no pair at all
    (CircleLoss, [1, 2, 3, 4]), (SupConLoss, [1, 2, 3, 4]),  # no anchor with a positive
    (CircleLoss, [3, 3, 3]), (SupConLoss, [3, 3, 3]),  # no anchor with a negative
], ids=lambda x: x.__name__ if isinstance(x, type) else str(len(set(x))))
def test_batch_without_valid_pairs_gives_zero(cls, labels):
    emb = np.random.default_rng(0).normal(size=(len(labels), 3)).astype(np.float32)
    value, (grad,) = _value_and_grad(lambda e: cls()(np.asarray(labels), e), emb)
    assert value == 0.0 and np.all(grad == 0.0)


@pytest.mark.parametrize("cls", ALL_LOSSES)
def test_xla_compiles_once_for_new_label_batches(cls):
    loss = cls(miner="multi_similarity") if cls is not SupConLoss else cls()

    @tf.function(jit_compile=True)
    def step(labels, emb):
        with tf.GradientTape() as tape:
            tape.watch(emb)
            value = loss(labels, emb)
        return value, tape.gradient(value, emb)

    rng = np.random.default_rng(4)
    for k in (2, 4, 8):
        labels = np.repeat(rng.choice(10**9, 16 // k, replace=False), k).astype(np.int64)
        emb = rng.normal(size=(16, 8)).astype(np.float32)
        value, grad = step(labels, emb)
        want = PAIR_FUNCTIONS[loss.name.removesuffix("_loss")](labels, emb, miner=loss.miner)
        assert float(value) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
        assert np.all(np.isfinite(grad.numpy()))
    assert step.experimental_get_tracing_count() == 1


# ------------------------------------------------------------------ Keras objects
@pytest.mark.parametrize("loss", [
    ContrastiveLoss(pos_margin=0.1, neg_margin=0.7, distance="cosine"),
    MultiSimilarityLoss(alpha=1.0, miner=MultiSimilarityMiner(0.2)),
    CircleLoss(m=0.3, weak_label=WeakLabelMargins(0.0, 0.2, semantic_threshold=0.4)),
    SupConLoss(temperature=0.2, miner=DistanceWeightedMiner(seed=3)),
    ArcFaceLoss(margin=20.0, sub_centers=2, num_classes=4),
    ArcFaceLoss(class_text_embeddings=np.eye(3, 4), max_margin=0.3),
], ids=lambda loss: type(loss).__name__)
def test_config_round_trip(loss):
    clone = keras.losses.deserialize(json.loads(json.dumps(keras.losses.serialize(loss))))
    assert type(clone) is type(loss)
    assert json.dumps(clone.get_config()) == json.dumps(loss.get_config())


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        SupConLoss(temperature=0)
    with pytest.raises(ValueError, match="Unknown pair miner 'hard'"):
        ContrastiveLoss(miner="hard")
    with pytest.raises(ValueError, match="SupConLoss has no margin"):
        SupConLoss(weak_label=WeakLabelMargins())
    with pytest.raises(ValueError, match="needs embedding_dim"):
        ContrastiveLoss(memory_size=64)
    with pytest.raises(ValueError, match="needs text embeddings"):
        ContrastiveLoss(weak_label=WeakLabelMargins())([0, 0], np.eye(2, dtype=np.float32))


# ------------------------------------------------------------------ miners
def test_distance_weighted_miner_draws_by_inverse_density():
    miner = DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.9, negatives_per_anchor=1, seed=0)
    rng = np.random.default_rng(5)
    emb = ref.unit(rng.normal(size=(6, 5)))
    dist = np.linalg.norm(emb[:, None] - emb[None], axis=2)
    negative = np.ones((6, 6), bool)
    np.fill_diagonal(negative, False)
    negative[:, 5] = False  # never drawable
    counts = np.zeros((6, 6))
    for _ in range(400):
        counts += miner.sample_negatives(dist, negative, 5).numpy()
    d = np.maximum(dist, 0.5)
    log_w = -3.0 * np.log(d) - 1.0 * np.log(np.maximum(1 - d**2 / 4, 1e-8))
    w = np.where(negative & (dist < 1.9), np.exp(log_w - log_w.max()), 0.0)
    want = w / w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(counts / 400, want, atol=0.1)
    assert counts[:, 5].sum() == 0 and np.all(counts.sum(axis=1) == 400)


def test_pair_miner_as_triplet_miner():
    labels, emb, _ = _weak_batch(6)
    miner = MultiSimilarityMiner(0.1)
    d = np.linalg.norm(ref.unit(emb)[:, None] - ref.unit(emb)[None], axis=2) ** 2
    pos, neg = ref.pairs(labels)
    keep_pos = pos & (d + 0.1 > np.where(neg, d, np.inf).min(1, keepdims=True))
    keep_neg = neg & (d - 0.1 < np.where(pos, d, -np.inf).max(1, keepdims=True))
    hinges = [d[a, p] - d[a, n] + 0.2 for a in range(12) for p in range(12) for n in range(12)
              if keep_pos[a, p] and keep_neg[a, n]]
    want = np.mean([h for h in hinges if h > 0])
    got = atl.TripletLoss(margin=0.2, mining=miner)(labels, ref.unit(emb).astype(np.float32))
    assert float(got) == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------ cross-batch memory
def test_memory_adds_earlier_batches_as_constant_pairs():
    rng = np.random.default_rng(7)
    loss = ContrastiveLoss(memory_size=16, embedding_dim=4)
    first = (np.repeat(np.arange(4), 2), rng.normal(size=(8, 4)).astype(np.float32))
    second = (np.repeat(np.arange(2, 6), 2), rng.normal(size=(8, 4)).astype(np.float32))
    assert float(loss(*first)) == pytest.approx(float(contrastive_loss(*first)), rel=1e-6)
    memory = (first[1], first[0], np.ones(8, bool))
    want, (want_grad,) = _value_and_grad(lambda e: contrastive_loss(second[0], e, memory=memory), second[1])
    got, (grad,) = _value_and_grad(lambda e: loss(second[0], e), second[1])
    assert got == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    # the pure function with a memory against the loop over all (row, column) pairs
    x, y = ref.unit(second[1]), ref.unit(np.concatenate([second[1], first[1]]))
    cols = np.concatenate([second[0], first[0]])
    pos_costs, neg_costs = [], []
    for a in range(8):
        for j in range(16):
            if j == a:
                continue
            dist = float(np.linalg.norm(x[a] - y[j]))
            (pos_costs.append(dist) if second[0][a] == cols[j] else neg_costs.append(max(1 - dist, 0)))
    loop = np.mean([c for c in pos_costs if c > 0]) + np.mean([c for c in neg_costs if c > 0])
    assert want == pytest.approx(loop, rel=1e-5)
    assert int(loss.memory.position.numpy()) == 0 and bool(np.all(loss.memory.filled.numpy()))


# ------------------------------------------------------------------ training: registry, fit
class _Data:
    """The two fields of `RetrievalData` the builders read."""

    def __init__(self, labels):
        self.train_labels = labels
        self.item_attributes = [{"color": i % 3} for i in range(int(labels.max()) + 1)]


@pytest.mark.parametrize("name", ["contrastive", "weak_contrastive", "multi_similarity",
                                  "weak_multi_similarity", "circle", "weak_circle", "supcon",
                                  "arcface", "weak_arcface"])
@pytest.mark.parametrize("source", ["text", "permuted"])
def test_registered_losses_build_from_a_train_config(name, source):
    from atl_keras.losses.registry import LOSSES
    from atl_keras.train import TrainConfig, build_loss

    if source != "text" and not name.startswith("weak_"):
        pytest.skip("the margin source only matters to the weak-label losses")
    labels, emb, text = _weak_batch(4)
    config = TrainConfig(loss=name, margin_source=source, semantic_threshold=0.5)
    loss = build_loss(config, _Data(labels), text[::3])
    y = {"label": labels, "text_embedding": text}
    extra = {"proxies": np.random.default_rng(0).normal(size=(4, 5))} if LOSSES[name].proxies else {}
    value, (grad,) = _value_and_grad(lambda e: loss(y, e, **extra), emb.astype(np.float32))
    assert np.isfinite(value) and value > 0 and np.all(np.isfinite(grad))
    assert ("weak_label" in loss.get_config() and loss.get_config()["weak_label"] is not None) \
        == (name.startswith("weak_") and name != "weak_arcface")


def test_functional_model_fits_with_weak_label_dict_targets():
    labels, emb, text = _weak_batch(5, batch=24, dim=8)
    inputs = keras.Input((8,))
    model = atl.MetricModel(inputs, keras.layers.Dense(4)(inputs))
    model.compile(keras.optimizers.SGD(0.1),
                  loss=atl.CircleLoss(weak_label=atl.WeakLabelMargins(0.0, 0.2), miner="multi_similarity"))
    history = model.fit(emb.astype(np.float32), {"label": labels, "text_embedding": text.astype(np.float32)},
                        batch_size=12, epochs=2, shuffle=False, verbose=0)
    assert all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss", "CircleLoss", "SupConLoss"])
def test_compile_by_registered_name(name):
    labels, emb, _ = _weak_batch(6, batch=24, dim=8)
    inputs = keras.Input((8,))
    model = atl.MetricModel(inputs, keras.layers.Dense(4)(inputs))
    model.compile(keras.optimizers.SGD(0.1), loss=name)
    assert type(model.loss).__name__ == name
    history = model.fit(emb.astype(np.float32), labels, batch_size=12, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_arcface_reads_a_proxy_head_in_a_functional_model():
    labels, emb, _ = _weak_batch(7, batch=24, dim=8)
    inputs = keras.Input((8,))
    cosines = atl.ProxyHead(8 * 2, 4)(keras.layers.Dense(4)(inputs))
    model = atl.MetricModel(inputs, cosines)
    model.compile(keras.optimizers.Adam(1e-2),
                  loss=ArcFaceLoss(sub_centers=2, num_classes=8, from_cosines=True))
    history = model.fit(emb.astype(np.float32), labels, batch_size=12, epochs=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))


def test_arcface_trains_an_atl_model_with_sub_centers():
    from atl_keras.data import pk_dataset

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 4).astype(np.int64)
    images = rng.uniform(0, 255, size=(24, 8, 8, 1)).astype(np.float32)
    model = atl.ATLModel("small_cnn", (8, 8, 1), 6, num_proxies=6 * 2)
    model.compile(keras.optimizers.Adam(1e-3), loss=ArcFaceLoss(sub_centers=2, num_classes=6))
    history = model.fit(pk_dataset(images, labels, np.zeros((24, 3), np.float32), p=3, k=2, seed=0),
                        epochs=1, steps_per_epoch=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))


def test_distance_weighted_miner_as_triplet_miner():
    labels, emb, _ = _weak_batch(8)
    emb = ref.unit(emb).astype(np.float32)
    with pytest.raises(ValueError, match="embedding_dim=D"):
        atl.TripletLoss(distance="l2", mining=DistanceWeightedMiner())(labels, emb)
    value, (grad,) = _value_and_grad(lambda e: atl.TripletLoss(
        distance="l2", mining=DistanceWeightedMiner(nonzero_loss_cutoff=2.0, seed=0, embedding_dim=5))(labels, e), emb)
    assert np.isfinite(value) and value > 0 and np.all(np.isfinite(grad))


def test_triplet_loss_keeps_a_pair_miner_through_its_config():
    loss = atl.TripletLoss(mining=MultiSimilarityMiner(0.25))
    clone = keras.losses.deserialize(json.loads(json.dumps(keras.losses.serialize(loss))))
    assert isinstance(clone.miner, MultiSimilarityMiner) and clone.miner.epsilon == 0.25
    assert atl.TripletLoss(mining="multi_similarity").miner.epsilon == 0.1

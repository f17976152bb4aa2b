"""P x K sampler: batch layout, sampling rules and determinism, checked against numpy counts."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from atl_keras.data.sampler import pk_dataset, pk_index_dataset, steps_per_epoch

# label -> count: 0..5 have >= K=4 samples, 6 and 7 have 2 and 3 (< K), 8 and 9 are singletons.
COUNTS = {0: 10, 1: 4, 2: 7, 3: 25, 4: 5, 5: 6, 6: 2, 7: 3, 8: 1, 9: 1}
P, K = 3, 4


def _labels(seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, label) for label, n in COUNTS.items()])
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


def _batches(labels: np.ndarray, n: int, p: int = P, k: int = K, seed: int = 0) -> np.ndarray:
    ds = pk_index_dataset(labels, p=p, k=k, seed=seed)
    return np.stack([b.numpy() for b in ds.take(n)])


def test_every_batch_is_p_distinct_labels_times_k_valid_indices():
    labels = _labels()
    for batch in _batches(labels, 50):
        assert batch.shape == (P * K,)
        assert batch.min() >= 0 and batch.max() < len(labels)
        blocks = labels[batch].reshape(P, K)
        # Each block of K is one label, and the P labels differ.
        assert (blocks == blocks[:, :1]).all()
        assert len(set(blocks[:, 0])) == P


def test_sampling_rules_per_label_count():
    labels = _labels()
    for batch in _batches(labels, 200):
        for block in batch.reshape(P, K):
            label = labels[block[0]]
            count = COUNTS[label]
            members = set(np.flatnonzero(labels == label))
            assert set(block) <= members
            if count >= K:  # without replacement
                assert len(set(block)) == K
            else:  # every sample once, the rest re-drawn with replacement
                assert set(block) == members


def test_singleton_labels_never_drawn_and_usable_labels_roughly_uniform():
    labels = _labels()
    n = 400
    drawn = collections.Counter(labels[b[0]] for batch in _batches(labels, n) for b in batch.reshape(P, K))
    usable = [label for label, count in COUNTS.items() if count >= 2]
    assert set(drawn) == set(usable)
    expected = n * P / len(usable)  # 150 draws per usable label
    for label in usable:
        assert 0.75 * expected < drawn[label] < 1.25 * expected, (label, drawn[label], expected)


def test_samples_within_a_large_label_roughly_uniform():
    labels = _labels()
    big = np.flatnonzero(labels == 3)  # 25 samples, K = 4 drawn each time label 3 is chosen
    counts = collections.Counter()
    for batch in _batches(labels, 600):
        counts.update(i for i in batch if labels[i] == 3)
    draws = sum(counts.values())
    assert set(counts) == set(big)
    expected = draws / len(big)
    assert min(counts.values()) > 0.6 * expected and max(counts.values()) < 1.4 * expected


def test_same_seed_same_batches_different_seed_different():
    labels = _labels()
    a = _batches(labels, 20, seed=7)
    b = _batches(labels, 20, seed=7)
    c = _batches(labels, 20, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Batches within one sequence vary too.
    assert len({tuple(row) for row in a}) > 15


def test_too_few_usable_labels_is_a_clear_error():
    labels = np.array([0, 0, 1, 1, 2, 3, 4])  # two usable labels, three singletons
    with pytest.raises(ValueError, match=r"p=3 labels with >= 2 samples.*only 2 of the 5"):
        pk_index_dataset(labels, p=3, k=2)


@pytest.mark.parametrize("p,k", [(1, 4), (4, 1), (2.5, 2), (True, 2)])
def test_invalid_p_k(p, k):
    with pytest.raises(ValueError, match="must be an int >= 2"):
        pk_index_dataset(_labels(), p=p, k=k)


def test_pk_dataset_gathers_images_labels_and_text():
    labels = _labels()
    n = len(labels)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 5, 4, 1), dtype=np.uint8)
    text = rng.normal(size=(n, 6)).astype(np.float32)
    ds = pk_dataset(images, labels, text, p=P, k=K, seed=3)
    assert ds.element_spec[0].shape == (P * K, 5, 4, 1)
    idx_ds = pk_index_dataset(labels, p=P, k=K, seed=3)
    for (x, y), idx in zip(ds.take(5), idx_ds.take(5)):
        idx = idx.numpy()
        assert x.dtype == tf.float32
        assert y["label"].dtype == tf.int64 and y["text_embedding"].dtype == tf.float32
        np.testing.assert_array_equal(x.numpy(), images[idx].astype(np.float32))
        np.testing.assert_array_equal(y["label"].numpy(), labels[idx])
        np.testing.assert_array_equal(y["text_embedding"].numpy(), text[idx])


def test_pk_dataset_without_text_has_only_labels_and_applies_augment():
    labels = _labels()
    images = np.ones((len(labels), 3, 3), np.uint8)  # [N, H, W] gets a channel axis
    ds = pk_dataset(images, labels, p=P, k=K, augment=lambda x, seed: 255.0 - x)
    x, y = next(iter(ds))
    assert set(y) == {"label"}
    assert x.shape == (P * K, 3, 3, 1)
    np.testing.assert_array_equal(x.numpy(), np.full((P * K, 3, 3, 1), 254.0, np.float32))


def test_pk_dataset_shape_errors():
    labels = _labels()
    images = np.zeros((len(labels), 2, 2, 1))
    with pytest.raises(ValueError, match="differ in length"):
        pk_dataset(images[:-1], labels)
    with pytest.raises(ValueError, match=r"per sample \[N=.*item_text\[labels\]"):
        pk_dataset(images, labels, np.zeros((10, 4)))


def test_steps_per_epoch():
    assert steps_per_epoch(100, 4, 5) == 5
    assert steps_per_epoch(101, 4, 5) == 6
    assert steps_per_epoch(0, 4, 5) == 1

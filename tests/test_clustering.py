"""NMI / AMI against an independent reference (every permutation enumerated) and k-means."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from atl_keras.clustering import (
    _expected_mutual_info,
    _contingency,
    adjusted_mutual_info,
    clustering_metrics,
    kmeans,
    normalized_mutual_info,
)


def reference_mi(a, b) -> float:
    """Mutual information by its definition, float64 loops."""
    n = len(a)
    total = 0.0
    for x in set(a):
        for y in set(b):
            nxy = sum(1 for p, q in zip(a, b) if p == x and q == y)
            if nxy:
                total += nxy / n * math.log(n * nxy / (a.count(x) * b.count(y)))
    return total


def reference_entropy(a) -> float:
    return -sum(a.count(x) / len(a) * math.log(a.count(x) / len(a)) for x in set(a))


def reference_ami(a, b) -> float:
    """AMI with E[MI] as the mean MI over ALL orderings of b (the permutation model, no formula)."""
    mis = [reference_mi(a, list(p)) for p in itertools.permutations(b)]
    emi = sum(mis) / len(mis)
    return (reference_mi(a, b) - emi) / ((reference_entropy(a) + reference_entropy(b)) / 2 - emi)


@pytest.mark.parametrize("a,b", [
    ([0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 2, 2]),
    ([0, 1, 1, 1, 2, 2, 3], [1, 1, 0, 0, 0, 2, 2]),
    ([0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 4, 5, 5]),
])
def test_ami_and_nmi_match_the_definitions(a, b):
    emi = np.mean([reference_mi(a, list(p)) for p in itertools.permutations(b)])
    assert _expected_mutual_info(_contingency(a, b)) == pytest.approx(emi, abs=1e-12)
    assert adjusted_mutual_info(a, b) == pytest.approx(reference_ami(a, b), abs=1e-12)
    nmi = reference_mi(a, b) / ((reference_entropy(a) + reference_entropy(b)) / 2)
    assert normalized_mutual_info(a, b) == pytest.approx(nmi, abs=1e-12)


def test_edge_cases_as_scikit_learn():
    assert adjusted_mutual_info([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert adjusted_mutual_info([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.0)
    assert normalized_mutual_info([3, 3, 3], [7, 7, 7]) == 1.0 == adjusted_mutual_info([3, 3, 3], [7, 7, 7])
    assert normalized_mutual_info(["a", "b"], [5, 6]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different lengths"):
        normalized_mutual_info([0, 1], [0])


def test_kmeans_recovers_separated_clusters_and_random_labels_score_near_zero():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 16)) * 5
    labels = rng.integers(0, 12, size=600)
    x = centres[labels] + 0.3 * rng.normal(size=(600, 16))
    clusters = kmeans(x, 12, seed=1)
    assert normalized_mutual_info(labels, clusters) == pytest.approx(1.0)
    metrics = clustering_metrics(x, labels)
    assert metrics["nmi"] == pytest.approx(1.0) and metrics["ami"] == pytest.approx(1.0)
    shuffled = clustering_metrics(x, rng.permutation(labels))
    assert abs(shuffled["ami"]) < 0.03 and shuffled["nmi"] > shuffled["ami"]  # NMI is not chance-corrected


def test_retrieval_metrics_report_nmi_and_ami_beside_recall():
    from atl_keras.metrics import retrieval_metrics

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), 8)
    x = rng.normal(size=(10, 8))[labels] * 4 + rng.normal(size=(80, 8))
    metrics = retrieval_metrics(x, labels, ks=(1,))
    assert metrics["nmi"] == pytest.approx(clustering_metrics(x, labels)["nmi"])
    assert 0.8 < metrics["ami"] <= metrics["nmi"] <= 1.0
    assert "nmi" not in retrieval_metrics(x, labels, ks=(1,), clustering=False)

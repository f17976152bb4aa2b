"""Clustering quality of an embedding: NMI and AMI of k-means clusters against the labels.

As PyTorch Metric Learning's ``AccuracyCalculator``: the embeddings are clustered by k-means
with as many clusters as there are distinct labels, and the clusters are compared with the
labels by normalized mutual information (NMI, arithmetic-mean normalisation) and adjusted
mutual information (AMI: corrected for chance under the permutation model, the expected
mutual information of two random labelings with the same cluster sizes).

    clustering_metrics(embeddings, labels)   # {"nmi": ..., "ami": ...}
    normalized_mutual_info(labels_a, labels_b), adjusted_mutual_info(labels_a, labels_b)

Definitions and edge cases are scikit-learn's (``normalized_mutual_info_score``,
``adjusted_mutual_info_score`` with ``average_method="arithmetic"``); scikit-learn is not a
dependency, so they are written here (numpy) and tested against an enumeration of all
permutations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["adjusted_mutual_info", "clustering_metrics", "kmeans", "normalized_mutual_info"]

_EPS = np.finfo(np.float64).eps


def _contingency(a: Any, b: Any) -> np.ndarray:
    """``[R, C]`` counts of each (label of a, label of b) pair."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"Two labelings of different lengths: {a.shape[0]} and {b.shape[0]}.")
    _, rows = np.unique(a, return_inverse=True)
    _, cols = np.unique(b, return_inverse=True)
    table = np.zeros((rows.max(initial=-1) + 1, cols.max(initial=-1) + 1), np.int64)
    np.add.at(table, (rows.reshape(-1), cols.reshape(-1)), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-np.sum(p * np.log(p)))


def _mutual_info(table: np.ndarray) -> float:
    n = table.sum()
    rows, cols = np.nonzero(table)
    nij = table[rows, cols].astype(np.float64)
    a, b = table.sum(axis=1).astype(np.float64), table.sum(axis=0).astype(np.float64)
    return float(max(np.sum(nij / n * (np.log(nij * n) - np.log(a[rows] * b[cols]))), 0.0))


def _expected_mutual_info(table: np.ndarray) -> float:
    """E[MI] over random labelings with the same cluster sizes (hypergeometric model)."""
    n = int(table.sum())
    a = np.repeat(table.sum(axis=1), table.shape[1])  # every (row, column) pair
    b = np.tile(table.sum(axis=0), table.shape[0])
    start, stop = np.maximum(1, a + b - n), np.minimum(a, b)
    lengths = np.maximum(stop - start + 1, 0)
    pair = np.repeat(np.arange(len(a)), lengths)  # one entry per (pair, possible n_ij)
    nij = start[pair] + np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ai, bj = a[pair], b[pair]
    log_factorial = np.array([math.lgamma(x + 1) for x in range(n + 1)])
    log_p = (log_factorial[ai] + log_factorial[bj] + log_factorial[n - ai] + log_factorial[n - bj]
             - log_factorial[n] - log_factorial[nij] - log_factorial[ai - nij] - log_factorial[bj - nij]
             - log_factorial[n - ai - bj + nij])
    terms = nij / n * (np.log(n * nij.astype(np.float64)) - np.log(ai.astype(np.float64) * bj)) * np.exp(log_p)
    return float(np.sum(terms))


def normalized_mutual_info(labels_a: Any, labels_b: Any) -> float:
    """MI / mean(H(a), H(b)); 1.0 when both labelings have one cluster."""
    table = _contingency(labels_a, labels_b)
    if table.shape[0] == table.shape[1] == 1 or table.size == 0:
        return 1.0
    mi = _mutual_info(table)
    normalizer = max((_entropy(table.sum(axis=1)) + _entropy(table.sum(axis=0))) / 2, _EPS)
    return float(mi / normalizer)


def adjusted_mutual_info(labels_a: Any, labels_b: Any) -> float:
    """(MI - E[MI]) / (mean(H(a), H(b)) - E[MI]); 1.0 for identical partitions, ~0 for chance."""
    table = _contingency(labels_a, labels_b)
    if table.shape[0] == table.shape[1] == 1 or table.size == 0:
        return 1.0
    mi = _mutual_info(table)
    emi = _expected_mutual_info(table)
    denominator = (_entropy(table.sum(axis=1)) + _entropy(table.sum(axis=0))) / 2 - emi
    denominator = min(denominator, -_EPS) if denominator < 0 else max(denominator, _EPS)
    return float((mi - emi) / denominator)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Cluster of each row of ``x [N, D]`` (``[N]`` int) by k-means (k-means++ start, Lloyd steps
    until no row moves or `iterations`; an emptied cluster restarts at the worst-fitted row)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} rows, got {k}.")
    rng = np.random.default_rng(seed)
    sq = np.sum(x * x, axis=1)
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    closest = np.maximum(sq - 2 * x @ centres[0] + centres[0] @ centres[0], 0.0)
    for c in range(1, k):  # k-means++: the next centre with probability ~ squared distance
        total = closest.sum()
        pick = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
        centres[c] = x[pick]
        closest = np.minimum(closest, np.maximum(sq - 2 * x @ centres[c] + centres[c] @ centres[c], 0.0))
    assignment = np.full(n, -1)
    for _ in range(iterations):
        distances = sq[:, None] - 2 * x @ centres.T + np.sum(centres * centres, axis=1)[None, :]
        new = np.argmin(distances, axis=1)
        if np.array_equal(new, assignment):
            break
        assignment = new
        counts = np.bincount(assignment, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, assignment, x)
        fit = distances[np.arange(n), assignment]
        for c in np.flatnonzero(counts == 0):
            worst = int(np.argmax(fit))
            fit[worst] = -np.inf
            counts[assignment[worst]] -= 1
            sums[assignment[worst]] -= x[worst]
            sums[c], counts[c] = x[worst], 1
            assignment[worst] = c
        centres = sums / counts[:, None]
    return assignment


def clustering_metrics(embeddings: Any, labels: Any, seed: int = 0) -> dict[str, float]:
    """``{"nmi", "ami"}`` of k-means (as many clusters as distinct labels) on ``embeddings [N, D]``."""
    labels = np.asarray(labels).reshape(-1)
    embeddings = np.asarray(embeddings, np.float32)
    if len(labels) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings and {len(labels)} labels; give one label per row.")
    clusters = kmeans(embeddings, len(np.unique(labels)), seed=seed)
    return {"nmi": normalized_mutual_info(labels, clusters), "ami": adjusted_mutual_info(labels, clusters)}

"""Independent float64 references for the triplet losses: plain loops, no tricks.

`reference_loss` loops over every (anchor, positive, negative) and implements the
definitions of `atl_keras.losses` literally. `tfa_semihard_loss` and
`tfa_hard_loss` transcribe TensorFlow Addons' `triplet_semihard_loss` and
`triplet_hard_loss` (tensorflow_addons/losses/triplet.py) in numpy, to pin the
claim that our constant-margin modes reproduce them. They are only meaningful on
batches where every anchor has a positive and a negative (tfa's masked max/min
return garbage otherwise).
"""

from __future__ import annotations

import math

import numpy as np

MAX_DISTANCE = {"squared_l2": 4.0, "l2": 2.0, "cosine": 2.0}


def distance(u: np.ndarray, v: np.ndarray, kind: str) -> float:
    """Distance between two vectors, computed from their difference (float64)."""
    u = np.asarray(u, np.float64)
    v = np.asarray(v, np.float64)
    if kind == "squared_l2":
        return float(np.sum((u - v) ** 2))
    if kind == "l2":
        return float(math.sqrt(np.sum((u - v) ** 2)))
    if kind == "cosine":
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        if nu == 0.0 or nv == 0.0:
            return 1.0
        return float(min(max(1.0 - np.dot(u, v) / (nu * nv), 0.0), 2.0))
    raise ValueError(kind)


def distance_matrix(x: np.ndarray, kind: str, y: np.ndarray | None = None) -> np.ndarray:
    """``[B, B2]`` distances by a double loop; the self-distance diagonal is 0."""
    same = y is None
    y = x if same else y
    out = np.zeros((len(x), len(y)))
    for i in range(len(x)):
        for j in range(len(y)):
            out[i, j] = 0.0 if (same and i == j) else distance(x[i], y[j], kind)
    return out


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-6)


def missing_text(text: np.ndarray | None, batch: int) -> list[bool]:
    """Row i's description is missing iff its text embedding is all-zero."""
    if text is None:
        return [False] * batch
    return [bool(np.all(np.asarray(row) == 0)) for row in text]


def margin_matrix(
    batch: int,
    margin: float | None = None,
    text: np.ndarray | None = None,
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    kind: str = "squared_l2",
    missing_text_margin: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Constant margins, or ATL margins from text embeddings. Returns (m, d_text).

    A pair where either text is missing (all-zero) gets ``missing_text_margin``,
    by default the midpoint of ``min_margin`` and ``max_margin``.
    """
    if text is None:
        return np.full((batch, batch), float(margin)), None
    if missing_text_margin is None:
        missing_text_margin = (min_margin + max_margin) / 2.0
    missing = missing_text(text, batch)
    d_text = distance_matrix(normalize(text), kind)
    m = np.zeros((batch, batch))
    for a in range(batch):
        for n in range(batch):
            if missing[a] or missing[n]:
                m[a, n] = missing_text_margin
            else:
                m[a, n] = min_margin + (max_margin - min_margin) * d_text[a, n] / MAX_DISTANCE[kind]
    return m, d_text


def semantically_masked(a: int, n: int, d_text, missing: list[bool], semantic_threshold) -> bool:
    """True if n is not a negative of a because their texts are too close (never when
    either text is missing)."""
    if semantic_threshold is None or missing[a] or missing[n]:
        return False
    return d_text[a, n] < semantic_threshold


def _h(x: float, soft: bool) -> float:
    if soft:
        return math.log1p(math.exp(-abs(x))) + max(x, 0.0)
    return max(x, 0.0)


def reference_loss(
    labels,
    embeddings,
    mining: str,
    kind: str = "squared_l2",
    soft_margin: bool = False,
    margin: float = 0.2,
    text=None,
    min_margin: float = 0.05,
    max_margin: float = 0.4,
    semantic_threshold: float | None = None,
    missing_text_margin: float | None = None,
) -> float:
    """The loss by the book: loops over anchors, positives and negatives."""
    labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    x = np.asarray(embeddings, np.float64)
    b = len(labels)
    d = distance_matrix(x, kind)
    m, d_text = margin_matrix(b, margin, text, min_margin, max_margin, kind, missing_text_margin)
    missing = missing_text(text, b)

    def is_pos(a, p):
        return a != p and labels[a] == labels[p]

    def is_neg(a, n):
        if labels[a] == labels[n]:
            return False
        return not semantically_masked(a, n, d_text, missing, semantic_threshold)

    total, count = 0.0, 0
    if mining == "batch_all":
        for a in range(b):
            for p in range(b):
                if not is_pos(a, p):
                    continue
                for n in range(b):
                    if not is_neg(a, n):
                        continue
                    v = d[a, p] - d[a, n] + m[a, n]
                    if soft_margin:
                        total += _h(v, True)
                        count += 1
                    elif v > 0:
                        total += v
                        count += 1
    elif mining == "batch_hard":
        for a in range(b):
            pos = [p for p in range(b) if is_pos(a, p)]
            neg = [n for n in range(b) if is_neg(a, n)]
            if not pos or not neg:
                continue
            hardest_p = max(d[a, p] for p in pos)
            hardest_n = max(m[a, n] - d[a, n] for n in neg)
            total += _h(hardest_p + hardest_n, soft_margin)
            count += 1
    elif mining == "semi_hard":
        for a in range(b):
            neg = [n for n in range(b) if is_neg(a, n)]
            if not neg:
                continue
            for p in range(b):
                if not is_pos(a, p):
                    continue
                farther = [n for n in neg if d[a, n] > d[a, p]]
                if farther:
                    chosen = max(m[a, n] - d[a, n] for n in farther)
                else:
                    chosen = min(m[a, n] - d[a, n] for n in neg)
                total += _h(d[a, p] + chosen, soft_margin)
                count += 1
    else:
        raise ValueError(mining)
    return total / count if count else 0.0


def reference_statistics(labels, embeddings, kind="squared_l2", margin=0.2, text=None,
                         min_margin=0.05, max_margin=0.4, semantic_threshold=None,
                         missing_text_margin=None) -> dict:
    """fraction_active / mean_active_margin by looping over all triplets."""
    labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    b = len(labels)
    d = distance_matrix(np.asarray(embeddings, np.float64), kind)
    m, d_text = margin_matrix(b, margin, text, min_margin, max_margin, kind, missing_text_margin)
    missing = missing_text(text, b)
    valid = active = 0
    margin_sum = 0.0
    for a in range(b):
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(b):
                if labels[n] == labels[a]:
                    continue
                if semantically_masked(a, n, d_text, missing, semantic_threshold):
                    continue
                valid += 1
                if d[a, p] - d[a, n] + m[a, n] > 0:
                    active += 1
                    margin_sum += m[a, n]
    return {
        "num_valid_triplets": valid,
        "num_active_triplets": active,
        "fraction_active": active / valid if valid else 0.0,
        "mean_active_margin": margin_sum / active if active else 0.0,
    }


# ---------------------------------------------------------------------------
# TensorFlow Addons semantics, transcribed op by op (numpy, float64).
# tfa names: "L_2" = squared Euclidean, "L_1" = (non-squared) Euclidean (sic),
# "angular" = 1 - cos. Here: our distance names.
# ---------------------------------------------------------------------------


def _masked_maximum(data, mask):
    axis_minimums = data.min(axis=1, keepdims=True)
    return ((data - axis_minimums) * mask).max(axis=1, keepdims=True) + axis_minimums


def _masked_minimum(data, mask):
    axis_maximums = data.max(axis=1, keepdims=True)
    return ((data - axis_maximums) * mask).min(axis=1, keepdims=True) + axis_maximums


def tfa_semihard_loss(labels, embeddings, margin: float = 1.0, kind: str = "squared_l2") -> float:
    """tfa.losses.triplet_semihard_loss."""
    labels = np.asarray(labels).reshape(-1, 1)
    pdist = distance_matrix(np.asarray(embeddings, np.float64), kind)
    adjacency = labels == labels.T
    adjacency_not = ~adjacency
    b = labels.shape[0]
    pdist_tile = np.tile(pdist, (b, 1))
    mask = np.tile(adjacency_not, (b, 1)) & (pdist_tile > pdist.T.reshape(-1, 1))
    mask_final = (mask.astype(np.float64).sum(axis=1, keepdims=True) > 0.0).reshape(b, b).T
    adjacency_not = adjacency_not.astype(np.float64)
    mask = mask.astype(np.float64)
    negatives_outside = _masked_minimum(pdist_tile, mask).reshape(b, b).T
    negatives_inside = np.tile(_masked_maximum(pdist, adjacency_not), (1, b))
    semi_hard_negatives = np.where(mask_final, negatives_outside, negatives_inside)
    loss_mat = margin + pdist - semi_hard_negatives
    mask_positives = adjacency.astype(np.float64) - np.eye(b)
    num_positives = mask_positives.sum()
    return float(np.maximum(loss_mat * mask_positives, 0.0).sum() / num_positives)


def tfa_hard_loss(labels, embeddings, margin: float = 1.0, soft: bool = False,
                  kind: str = "squared_l2") -> float:
    """tfa.losses.triplet_hard_loss."""
    labels = np.asarray(labels).reshape(-1, 1)
    pdist = distance_matrix(np.asarray(embeddings, np.float64), kind)
    adjacency = labels == labels.T
    adjacency_not = (~adjacency).astype(np.float64)
    hard_negatives = _masked_minimum(pdist, adjacency_not)
    b = labels.shape[0]
    mask_positives = adjacency.astype(np.float64) - np.eye(b)
    hard_positives = _masked_maximum(pdist, mask_positives)
    if soft:
        loss = np.log1p(np.exp(hard_positives - hard_negatives))
    else:
        loss = np.maximum(hard_positives - hard_negatives + margin, 0.0)
    return float(loss.mean())

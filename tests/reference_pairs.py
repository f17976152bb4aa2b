"""Independent float64 references for the pair losses and ArcFace: plain loops, no tricks.

Each function follows the definition in the loss' module docstring pair by pair (PML 2.9's
semantics), with optional per-pair weak-label values, so the tests can check the
``keras.ops`` code against it beyond the PML reference batches.
"""

from __future__ import annotations

import math

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[B, B]`` bool positive (``i != j``, same label) and negative masks."""
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    return same & ~np.eye(len(labels), dtype=bool), ~same


def text_margins(labels, text, min_margin, max_margin, semantic_threshold=None):
    """ATL's per-pair margins of the texts (squared L2 of unit rows, d_max = 4) and the mask
    of pairs that stay negatives (text distance >= tau)."""
    g = unit(text)
    b = len(labels)
    margins = np.zeros((b, b))
    keep = np.ones((b, b), bool)
    for i in range(b):
        for j in range(b):
            d = float(np.sum((g[i] - g[j]) ** 2))
            margins[i, j] = min_margin + (max_margin - min_margin) * d / 4.0
            if semantic_threshold is not None:
                keep[i, j] = d >= semantic_threshold
    return margins, keep


def _avg_nonzero(values: list[float]) -> float:
    kept = [v for v in values if v > 0]
    return sum(kept) / len(kept) if kept else 0.0


def _lse(values: list[float], add_one: bool = False) -> float:
    if add_one:
        values = values + [0.0]
    if not values:
        return 0.0
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def contrastive(labels, emb, pos_margin=0.0, neg_margin=1.0, neg_margins=None, keep=None):
    x = unit(emb)
    pos, neg = pairs(labels)
    pos_costs, neg_costs = [], []
    for a in range(len(x)):
        for j in range(len(x)):
            d = float(np.linalg.norm(x[a] - x[j]))
            if pos[a, j]:
                pos_costs.append(max(d - pos_margin, 0.0))
            elif neg[a, j] and (keep is None or keep[a, j]):
                m = neg_margin if neg_margins is None else neg_margins[a, j]
                neg_costs.append(max(m - d, 0.0))
    return _avg_nonzero(pos_costs) + _avg_nonzero(neg_costs)


def multi_similarity(labels, emb, alpha=2.0, beta=50.0, base=0.5, neg_bases=None, keep=None):
    x = unit(emb)
    pos, neg = pairs(labels)
    total = 0.0
    for a in range(len(x)):
        p_terms = [-alpha * (float(x[a] @ x[p]) - base) for p in range(len(x)) if pos[a, p]]
        n_terms = [beta * (float(x[a] @ x[n]) - (base if neg_bases is None else neg_bases[a, n]))
                   for n in range(len(x)) if neg[a, n] and (keep is None or keep[a, n])]
        total += (_lse(p_terms, True) if p_terms else 0.0) / alpha
        total += (_lse(n_terms, True) if n_terms else 0.0) / beta
    return total / len(x)


def circle(labels, emb, m=0.4, gamma=80.0, neg_relaxations=None, keep=None):
    x = unit(emb)
    pos, neg = pairs(labels)
    losses = []
    for a in range(len(x)):
        p_terms, n_terms = [], []
        for j in range(len(x)):
            s = float(x[a] @ x[j])
            if pos[a, j]:
                p_terms.append(-gamma * max(1 + m - s, 0.0) * (s - (1 - m)))
            elif neg[a, j] and (keep is None or keep[a, j]):
                mn = m if neg_relaxations is None else neg_relaxations[a, j]
                n_terms.append(gamma * max(s + mn, 0.0) * (s - mn))
        if p_terms and n_terms:
            z = _lse(p_terms) + _lse(n_terms)
            losses.append(max(z, 0.0) + math.log1p(math.exp(-abs(z))))
    return _avg_nonzero(losses)


def supcon(labels, emb, temperature=0.1):
    x = unit(emb)
    pos, neg = pairs(labels)
    if not pos.any() or not neg.any():
        return 0.0
    losses = []
    for a in range(len(x)):
        others = [float(x[a] @ x[j]) / temperature for j in range(len(x)) if pos[a, j] or neg[a, j]]
        positives = [float(x[a] @ x[p]) / temperature for p in range(len(x)) if pos[a, p]]
        if positives:
            norm = _lse(others)
            losses.append(-sum(p - norm for p in positives) / len(positives))
    return _avg_nonzero(losses)


def arcface(labels, emb, proxies, margin=28.6, scale=64.0, sub_centers=1, class_margins=None):
    """``class_margins``: optional ``[C, C]``, the additive margin of class c's logit for a
    sample of class y (``[y, c]``)."""
    x = unit(emb)
    w = unit(proxies)
    classes = len(w) // sub_centers
    m = math.radians(margin)
    total = 0.0
    for i, y in enumerate(labels):
        logits = []
        for c in range(classes):
            cos = max(float(x[i] @ w[c * sub_centers + k]) for k in range(sub_centers))
            if c == y:
                theta = math.acos(min(max(cos, -1.0), 1.0))
                cos = math.cos(theta + m) if theta <= math.pi - m else cos - m * math.sin(m)
            elif class_margins is not None:
                cos += class_margins[y][c]
            logits.append(scale * cos)
        total += _lse(logits) - logits[y]
    return total / len(labels)

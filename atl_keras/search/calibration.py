"""Match calibration: the score above which a query's best result counts as "the same product".

A labelled query set gives, per query, the best result's id and score and the expected id
(``None``: the product is not in the gallery). Accepting every query whose best score is at
least a threshold ``t``:

- precision(t) = correct accepted / accepted (a correct acceptance: best id == expected id);
- recall(t) = correct accepted / queries whose product is in the gallery.

`calibrate_threshold` returns the whole curve and the lowest threshold (highest recall)
whose precision reaches the target. With ``confidence`` (default 0.95) it is the one-sided
Wilson lower bound of the precision that must reach the target, not the point estimate, so
the threshold holds on fresh queries from the same distribution instead of only on the
calibration set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

__all__ = ["Calibration", "calibrate_threshold", "precision_recall"]


@dataclass
class Calibration:
    """The chosen threshold and the curve it was read from.

    ``threshold`` is None when no threshold reaches the target (``precision_lower`` never
    does). Curve arrays ``[T]`` are ordered by decreasing threshold (one entry per distinct
    best score): ``thresholds``, ``precision``, ``precision_lower`` (Wilson bound),
    ``recall``, ``accepted`` (queries at or above the threshold).
    """

    threshold: float | None
    target_precision: float
    confidence: float | None
    precision: float
    recall: float
    thresholds: np.ndarray
    curve_precision: np.ndarray
    precision_lower: np.ndarray
    curve_recall: np.ndarray
    accepted: np.ndarray
    num_queries: int
    num_in_gallery: int

    def to_dict(self, curve: bool = True) -> dict[str, Any]:
        """JSON-able summary (``curve=False``: without the per-threshold arrays)."""
        out = {key: value for key, value in asdict(self).items() if not isinstance(value, np.ndarray)}
        if curve:
            out["curve"] = {
                "threshold": self.thresholds.tolist(), "precision": self.curve_precision.tolist(),
                "precision_lower": self.precision_lower.tolist(), "recall": self.curve_recall.tolist(),
                "accepted": self.accepted.tolist(),
            }
        return out


def _wilson_lower(successes: np.ndarray, trials: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Wilson score lower bound of a binomial proportion ``[T]``."""
    z = NormalDist().inv_cdf(confidence)
    n = np.maximum(trials.astype(np.float64), 1.0)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def precision_recall(
    best_ids: Sequence[Any], best_scores: Any, expected_ids: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The curve over thresholds: ``(thresholds, correct_accepted, accepted, precision, recall,
    in_gallery)``, arrays ``[T]`` by decreasing threshold (each distinct best score)."""
    scores = np.asarray(best_scores, np.float64).reshape(-1)
    if not (len(best_ids) == len(scores) == len(expected_ids)):
        raise ValueError(
            f"{len(scores)} scores, {len(best_ids)} best ids and {len(expected_ids)} expected ids: "
            "give one of each per query."
        )
    if len(scores) == 0:
        raise ValueError("Calibration needs at least one labelled query.")
    correct = np.array([e is not None and b == e for b, e in zip(best_ids, expected_ids)], bool)
    in_gallery = int(sum(e is not None for e in expected_ids))
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    hits = np.cumsum(correct[order])
    # the last position of every run of equal scores: accepting t accepts all of them
    last = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    thresholds = sorted_scores[last]
    accepted = last + 1
    correct_accepted = hits[last]
    precision = correct_accepted / accepted
    recall = correct_accepted / in_gallery if in_gallery else np.zeros(len(last))
    return thresholds, correct_accepted, accepted, precision, recall, in_gallery


def calibrate_threshold(
    best_ids: Sequence[Any],
    best_scores: Any,
    expected_ids: Sequence[Any],
    target_precision: float = 0.95,
    confidence: float | None = 0.95,
) -> Calibration:
    """The lowest best-score threshold whose precision reaches `target_precision`.

    Args:
        best_ids: ``[Q]`` the best result's id per query.
        best_scores: ``[Q]`` its score (higher is closer).
        expected_ids: ``[Q]`` the right id, ``None`` for a product not in the gallery.
        target_precision: in (0, 1].
        confidence: the Wilson lower bound at this one-sided confidence must reach the target
            (None: the point estimate; it then holds on these queries, not necessarily on new ones).
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}.")
    if confidence is not None and not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1) or None, got {confidence}.")
    thresholds, correct, accepted, precision, recall, in_gallery = precision_recall(
        best_ids, best_scores, expected_ids)
    lower = precision if confidence is None else _wilson_lower(correct, accepted, confidence)
    meets = np.flatnonzero(lower >= target_precision)
    chosen = int(meets[-1]) if len(meets) else None  # by decreasing threshold: the last is the lowest
    return Calibration(
        threshold=None if chosen is None else float(thresholds[chosen]),
        target_precision=float(target_precision),
        confidence=confidence,
        precision=math.nan if chosen is None else float(precision[chosen]),
        recall=math.nan if chosen is None else float(recall[chosen]),
        thresholds=thresholds.astype(np.float32),
        curve_precision=precision,
        precision_lower=lower,
        curve_recall=recall,
        accepted=accepted,
        num_queries=len(expected_ids),
        num_in_gallery=in_gallery,
    )

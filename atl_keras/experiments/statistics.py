"""Aggregation over seeds, paired comparisons and the exact paired t-test."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from atl_keras.experiments.protocols import METRICS
from atl_keras.experiments.runs import RunRecord

def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; NaN for fewer than two values)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def aggregate(records: Sequence[RunRecord]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(evaluation, method) -> {metric: (mean, std), "n": seeds, "curve": (mean [K], std [K])}``."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        for evaluation in r.metrics:
            groups.setdefault((evaluation, r.method), []).append(r)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for (evaluation, method), rs in groups.items():
        entry: dict[str, Any] = {"n": len(rs), "seeds": [r.seed for r in rs]}
        for metric in METRICS:
            vals = [r.metrics[evaluation][metric] for r in rs if metric in r.metrics[evaluation]]
            if vals:
                entry[metric] = _mean_std(vals)
        curves = np.asarray([r.curves[evaluation] for r in rs], np.float64)
        entry["curve"] = (curves.mean(0), curves.std(0, ddof=1) if len(rs) > 1 else np.zeros(curves.shape[1]))
        entry["seconds"] = float(np.mean([r.seconds for r in rs]))
        out[(evaluation, method)] = entry
    return out


@dataclass(frozen=True)
class Comparison:
    """Method A vs method B on one evaluation and metric, paired by seed."""

    evaluation: str
    metric: str
    method: str
    baseline: str
    mean: float
    baseline_mean: float
    relative_gain: float  # (mean - baseline_mean) / baseline_mean
    paired_diff: float  # mean over seeds of (A - B)
    paired_std: float  # sample std of the per-seed differences (NaN for one seed)
    wins: int  # seeds where A > B
    n: int
    spread: float  # max of the two methods' seed std (NaN for one seed)
    p_value: float = math.nan  # two-sided paired t-test on the per-seed differences (NaN for one seed)

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` only where the data support it, else ``no clear difference``.

        Supported = every seed agrees on the sign AND the mean difference exceeds both the
        seed-to-seed spread of either method and the spread of the paired differences.
        With one seed nothing is supported.
        """
        if self.n < 2 or not math.isfinite(self.spread):
            return "not testable (1 seed)"
        bar = max(self.spread, self.paired_std)
        if self.wins == self.n and self.paired_diff > bar:
            return "better"
        if self.wins == 0 and -self.paired_diff > bar:
            return "worse"
        return "no clear difference"


def compare(records: Sequence[RunRecord], evaluation: str, metric: str, method: str, baseline: str) -> Comparison | None:
    """Compare `method` to `baseline` over the seeds both ran (None when they share none)."""
    a = {r.seed: r.metrics[evaluation][metric] for r in records if r.method == method and evaluation in r.metrics}
    b = {r.seed: r.metrics[evaluation][metric] for r in records if r.method == baseline and evaluation in r.metrics}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    va, vb = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    diff = va - vb
    n = len(seeds)
    std = lambda x: float(np.std(x, ddof=1)) if n > 1 else math.nan  # noqa: E731
    base = float(vb.mean())
    return Comparison(
        evaluation, metric, method, baseline, float(va.mean()), base,
        (float(va.mean()) - base) / base if base else math.nan,
        float(diff.mean()), std(diff), int(np.sum(diff > 0)), n, max(std(va), std(vb)) if n > 1 else math.nan,
        paired_t_p_value(diff),
    )


def student_t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with integer `df` >= 1 (exact finite series).

    Abramowitz & Stegun 26.7.3-26.7.4 with theta = atan(|t| / sqrt(df)); no SciPy needed.
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: A = (2/pi) * (theta + sin(theta) * cos(theta) * sum)
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = (2 / math.pi) * (theta + math.sin(theta) * math.cos(theta) * total)
    else:  # even: A = sin(theta) * sum
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    return min(1.0, max(0.0, 1.0 - inside))


def paired_t_p_value(differences: Sequence[float]) -> float:
    """Two-sided p of a paired t-test on per-seed differences (NaN for fewer than 2 seeds).

    All-equal non-zero differences give p = 0; all-zero differences give p = 1.
    """
    d = np.asarray(differences, np.float64)
    if d.size < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return student_t_two_sided_p(mean / (sd / math.sqrt(d.size)), int(d.size - 1))

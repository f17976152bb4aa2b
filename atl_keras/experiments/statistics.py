"""Aggregation over seeds, paired comparisons and the paired t-test (`scipy.stats`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import stats

from atl_keras.experiments.protocols import METRICS
from atl_keras.experiments.runs import RunRecord

#: Fewer paired seeds than this never give a verdict (with 2, one t-test df, any agreement looks "significant").
MIN_SEEDS = 3
#: Paired differences whose range is at most this are treated as having zero variance.
ZERO_VARIANCE_ATOL = 1e-9
#: Why the `quick` schedule gives no verdicts (1 x 4 steps: it checks that the pipeline runs).
PIPELINE_CHECK = "the quick schedule checks the pipeline only"

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
    p_value: float = math.nan  # two-sided paired t-test on the per-seed differences (NaN: no verdict)
    no_verdict: str = ""  # why no verdict can be given ("" = one can); see `no_verdict_reason`

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` only where the data support it, else ``no clear difference``.

        Supported = every seed agrees on the sign AND the mean difference exceeds both the
        seed-to-seed spread of either method and the spread of the paired differences.
        ``no verdict (<reason>)`` with fewer than `MIN_SEEDS` seeds, zero variance or the
        `quick` schedule.
        """
        if self.no_verdict:
            return f"no verdict ({self.no_verdict})"
        bar = max(self.spread, self.paired_std)
        if self.wins == self.n and self.paired_diff > bar:
            return "better"
        if self.wins == 0 and -self.paired_diff > bar:
            return "worse"
        return "no clear difference"


def compare(records: Sequence[RunRecord], evaluation: str, metric: str, method: str, baseline: str,
            pipeline_check: bool = False) -> Comparison | None:
    """Compare `method` to `baseline` over the seeds both ran (None when they share none).

    `pipeline_check`: the runs only check the pipeline (the `quick` schedule): no verdict.
    """
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
        paired_t_p_value(diff), PIPELINE_CHECK if pipeline_check else no_verdict_reason(diff),
    )


def student_t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with `df` > 0 degrees of freedom (`scipy.stats.t`)."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    return float(2.0 * stats.t.sf(abs(t), df))


def t_critical(level: float, df: float) -> float:
    """``t`` with ``P(|T| >= t) = 1 - level`` for Student's t with `df` degrees (`scipy.stats.t.ppf`)."""
    if not 0 < level < 1 or not df > 0:
        raise ValueError(f"Need 0 < level < 1 and df > 0, got {level}, {df}.")
    return float(stats.t.ppf(1 - (1 - level) / 2, df))


def no_verdict_reason(differences: Sequence[float]) -> str:
    """Why paired `differences` cannot support a verdict (``""`` when they can).

    Fewer than `MIN_SEEDS` values, non-finite values, or zero variance (all differences equal
    within `ZERO_VARIANCE_ATOL`, e.g. two seeds with the same score difference): a t-test on
    them would report p = 0 or a meaningless p, so no verdict is given.
    """
    d = np.asarray(differences, np.float64)
    if d.size < MIN_SEEDS:
        return f"n = {d.size} < {MIN_SEEDS}"
    if not np.all(np.isfinite(d)):
        return "non-finite values"
    if float(np.ptp(d)) <= ZERO_VARIANCE_ATOL:
        return "zero variance"
    return ""


def paired_t_p_value(differences: Sequence[float]) -> float:
    """Two-sided p of a paired t-test on per-seed differences (`scipy.stats.ttest_1samp` against 0).

    NaN whenever `no_verdict_reason` names a reason (n < 3, zero variance, non-finite): never
    p = 0 from a degenerate sample.
    """
    if no_verdict_reason(differences):
        return math.nan
    return float(stats.ttest_1samp(np.asarray(differences, np.float64), 0.0).pvalue)

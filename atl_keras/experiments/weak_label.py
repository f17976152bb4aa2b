"""Does the weak label help? The pre-registered margin-source experiment and its report.

    from atl_keras.experiments import ReplicationConfig, run_replication, write_report
    config = ReplicationConfig(experiment="weak_label", protocols=("variant_shop",),
                               seeds=tuple(range(8)), schedule="weak_label")
    write_report(run_replication(config), "results")      # results/weak_label.md

Every condition trains ATL through the same margin-table code path
(`atl_keras.losses.MarginTableTripletLoss`) and differs only in the margin table:
``fixed``, ``permuted`` (text margin values, no structure), ``shuffled_text`` (users'
catalogs), ``text`` and ``oracle``; see `atl_keras.experiments.methods.weak_label_methods`.
The decision rules below are the ones pre-registered in docs/replication.md; they are
applied to paired differences over seeds (the same seed draws the same shop and the same
initialisation for every condition) with two-sided paired t-tests, Holm-corrected over the
listed comparisons of the primary metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from atl_keras.experiments.methods import WEAK_LABEL_MINERS, method_title, weak_label_method_name
from atl_keras.experiments.protocols import EVALUATIONS
from atl_keras.experiments.runs import ReplicationResult, RunRecord
from atl_keras.experiments.statistics import PIPELINE_CHECK, no_verdict_reason, paired_t_p_value, t_critical

__all__ = [
    "ALPHA",
    "PRIMARY_METRIC",
    "SECONDARY_METRICS",
    "Difference",
    "holm",
    "paired_differences",
    "planned_comparisons",
    "proxy_comparisons",
    "render_weak_label_report",
    "t_critical",
]

ALPHA = 0.05
#: Pre-registered primary metric: exact-item Recall@1 (the paper's and this project's metric).
PRIMARY_METRIC = "recall_at_1"
#: Reported with the same comparisons, descriptive only (Holm within each metric).
SECONDARY_METRICS = ("variant_recall_at_1", "attribute_agreement_at_10", "recall_at_10", "map_at_r")
METRIC_NAMES = {
    "recall_at_1": "R@1", "recall_at_10": "R@10", "map_at_r": "MAP@R",
    "variant_recall_at_1": "variant R@1", "variant_recall_at_10": "variant R@10",
    "attribute_agreement_at_10": "attr. agreement@10",
}


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> tuple[list[float], list[bool], list[float]]:
    """Holm's step-down correction.

    Returns ``(adjusted p [m], rejected [m], level [m])`` in the input order, where ``level``
    is the confidence level at which that comparison is tested (``1 - alpha / (m - rank)``),
    so its interval at that level excludes 0 exactly when it is rejected (up to the step-down:
    after the first non-rejection nothing further is rejected). NaN p-values are never rejected.
    """
    p = np.asarray(p_values, np.float64)
    m = len(p)
    order = sorted(range(m), key=lambda i: (math.isnan(p[i]), p[i]))
    adjusted, rejected, level = [math.nan] * m, [False] * m, [math.nan] * m
    running, still = 0.0, True
    for rank, i in enumerate(order):
        level[i] = 1 - alpha / (m - rank)
        if math.isnan(p[i]):
            still = False
            continue
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
        still = still and p[i] <= alpha / (m - rank)
        rejected[i] = still
    return adjusted, rejected, level


@dataclass(frozen=True)
class Difference:
    """``method - baseline`` on one metric, paired by seed."""

    label: str
    evaluation: str
    metric: str
    method: str
    baseline: str
    n: int
    mean: float
    sd: float
    low: float  # 95% paired t-interval
    high: float
    p_value: float
    wins: int
    holm_p: float = math.nan
    holds: bool = False  # Holm-rejected AND mean > 0
    holm_low: float = math.nan  # interval at the Holm level of this comparison
    holm_high: float = math.nan
    no_verdict: str = ""  # why the data cannot give a verdict ("" = they can); see `no_verdict_reason`

    @property
    def verdict(self) -> str:
        if self.no_verdict:
            return f"no verdict ({self.no_verdict})"
        if self.holds:
            return "holds (> 0)"
        if self.mean < 0 and self.holm_p <= ALPHA:
            return "reversed (< 0)"
        return "not shown"


def _values(records: Sequence[RunRecord], evaluation: str, metric: str, method: str) -> dict[int, float]:
    return {r.seed: float(r.metrics[evaluation][metric]) for r in records
            if r.method == method and evaluation in r.metrics and metric in r.metrics[evaluation]}


def paired_differences(
    records: Sequence[RunRecord], evaluation: str, metric: str, comparisons: Sequence[tuple[str, str, str]],
    alpha: float = ALPHA, no_verdict: str = "",
) -> list[Difference]:
    """One `Difference` per ``(label, method, baseline)``, Holm-corrected over `comparisons`.

    A comparison gets no verdict (p = NaN, never "holds") with fewer than 3 paired seeds, zero
    variance of the differences, or when `no_verdict` names a reason (e.g. `PIPELINE_CHECK` for
    the `quick` schedule); its intervals are given whenever the differences have a spread (n >= 2).
    """
    raw = []
    for label, method, baseline in comparisons:
        a, b = _values(records, evaluation, metric, method), _values(records, evaluation, metric, baseline)
        seeds = sorted(set(a) & set(b))
        d = np.array([a[s] - b[s] for s in seeds], np.float64)
        n = len(d)
        reason = no_verdict or no_verdict_reason(d)
        mean = float(d.mean()) if n else math.nan
        sd = float(d.std(ddof=1)) if n > 1 else math.nan
        spread = n > 1 and sd > 0
        half = t_critical(1 - alpha, n - 1) * sd / math.sqrt(n) if spread else math.nan
        raw.append((label, method, baseline, n, mean, sd, half, math.nan if reason else paired_t_p_value(d),
                    int(np.sum(d > 0)), reason, spread))
    adjusted, rejected, levels = holm([r[7] for r in raw], alpha)
    out = []
    for (label, method, baseline, n, mean, sd, half, p, wins, reason, spread), adj, rej, level in zip(
            raw, adjusted, rejected, levels):
        holm_half = t_critical(level, n - 1) * sd / math.sqrt(n) if spread else math.nan
        out.append(Difference(label, evaluation, metric, method, baseline, n, mean, sd, mean - half, mean + half,
                              p, wins, adj, bool(rej and mean > 0 and not reason), mean - holm_half,
                              mean + holm_half, reason))
    return out


def planned_comparisons(protocol: str) -> list[tuple[str, str, str]]:
    """The pre-registered comparisons ``(label, method, baseline)`` of a protocol."""
    bh, sh = "batch_hard", "semi_hard"
    n = weak_label_method_name
    if protocol == "catalog":
        return [(f"text - {b}, {m.replace('_', '-')}", n("text", m), n(b, m))
                for m in WEAK_LABEL_MINERS for b in ("permuted", "shuffled_text", "fixed")]
    out = [
        ("C1 text - random, batch-hard", n("text", bh), n("permuted", bh)),
        ("C2 text - random, semi-hard", n("text", sh), n("permuted", sh)),
        ("C3 text - fixed, semi-hard", n("text", sh), n("fixed", sh)),
        ("C4 text - fixed, batch-hard", n("text", bh), n("fixed", bh)),
    ]
    if protocol == "variant_shop":
        out.append(("C5 text + threshold - text, semi-hard", n("text", sh, True), n("text", sh)))
    return out


def context_comparisons(protocol: str) -> list[tuple[str, str, str]]:
    """Not decision rules: does the testbed reward true semantic margins at all? (Users' catalogs:
    what do random margins, which need no text, do against a fixed margin and against the text?)"""
    n = weak_label_method_name
    if protocol == "catalog":
        return [(f"random (uniform) - fixed, {m.replace('_', '-')}", n("random", m), n("fixed", m))
                for m in WEAK_LABEL_MINERS] + \
               [(f"text - random (uniform), {m.replace('_', '-')}", n("text", m), n("random", m))
                for m in WEAK_LABEL_MINERS]
    return [(f"oracle - random, {m.replace('_', '-')}", n("oracle", m), n("permuted", m)) for m in WEAK_LABEL_MINERS] + \
           [(f"random - fixed, {m.replace('_', '-')}", n("permuted", m), n("fixed", m)) for m in WEAK_LABEL_MINERS]


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.{digits}f}"


def _p(x: float) -> str:
    return "n/a" if not math.isfinite(x) else ("< 0.001" if x < 0.001 else f"{x:.3f}")


def _difference_rows(diffs: Sequence[Difference], holm_columns: bool = True) -> list[str]:
    head = "| comparison | n | wins | mean diff | 95% CI | p |"
    sep = "|---|---|---|---|---|---|"
    if holm_columns:
        head += " Holm p | Holm-level CI | verdict |"
        sep += "---|---|---|"
    lines = [head, sep]
    for d in diffs:
        row = (f"| {d.label} (`{d.method}` - `{d.baseline}`) | {d.n} | {d.wins}/{d.n} | {_f(d.mean)} | "
               f"[{_f(d.low)}, {_f(d.high)}] | {_p(d.p_value)} |")
        if holm_columns:
            row += f" {_p(d.holm_p)} | [{_f(d.holm_low)}, {_f(d.holm_high)}] | {d.verdict} |"
        lines.append(row)
    return lines


def _decisions(protocol: str, primary: dict[str, Difference]) -> list[str]:
    def holds(prefix: str) -> bool | None:
        d = next((v for k, v in primary.items() if k.startswith(prefix)), None)
        return None if d is None or d.no_verdict else d.holds

    reasons = sorted({d.no_verdict for d in primary.values() if d.no_verdict})
    lines = []
    if protocol == "catalog":
        used = [d for k, d in primary.items() if "random" in k or "permuted" in k]
        if not used or any(d.no_verdict for d in used):
            verdict = f"NO VERDICT ({'; '.join(reasons) or 'no paired seeds'})"
        else:
            verdict = "YES" if all(d.holds for d in used) else "NOT SHOWN"
        lines.append(f"- **Text is used on this catalog** (text - permuted > 0 under both miners): **{verdict}**.")
        return lines
    c1, c2, c3 = holds("C1"), holds("C2"), holds("C3")
    if None in (c1, c2, c3):
        return [f"- **No verdicts** ({'; '.join(reasons) or 'missing conditions'}): verdicts need at least 3 "
                "paired seeds of every condition, differences that vary between seeds, and a schedule that "
                "trains."]
    lines.append(f"- **Text is used** (C1 and C2 hold): **{'YES' if c1 and c2 else 'NOT SHOWN'}** "
                 f"(C1 {'holds' if c1 else 'not shown'}, C2 {'holds' if c2 else 'not shown'}).")
    lines.append(f"- **ATL helps beyond mining** (C3 holds): **{'YES' if c3 else 'NOT SHOWN'}**.")
    c5 = holds("C5")
    if c5 is not None:
        lines.append(f"- **The semantic threshold at the variants' text distance helps** (C5 holds): "
                     f"**{'YES' if c5 else 'NOT SHOWN'}**.")
    return lines


def _condition_table(records: Sequence[RunRecord], evaluation: str, methods: Sequence, metrics: Sequence[str],
                     config: Any) -> list[str]:
    lines = ["| condition | method | n | " + " | ".join(METRIC_NAMES.get(m, m) for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for method in methods:
        cells = []
        n = 0
        for metric in metrics:
            v = list(_values(records, evaluation, metric, method.name).values())
            n = max(n, len(v))
            if not v:
                cells.append("n/a")
            else:
                sd = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
                cells.append(f"{np.mean(v):.3f} ± {sd:.3f}" if math.isfinite(sd) else f"{np.mean(v):.3f}")
        lines.append(f"| {method_title(method, config)} | `{method.name}` | {n} | " + " | ".join(cells) + " |")
    return lines


def proxy_comparisons(oracle: bool = True) -> list[tuple[str, str, str]]:
    """The proxy losses beside ATL ``(label, method, baseline)``: an addition to the
    pre-registered design (issue 15), descriptive, Holm over this family only."""
    n = weak_label_method_name
    out = [
        ("P1 adaptive proxy: text - random", "adaptive_proxy_text", "adaptive_proxy_permuted"),
        ("P2 adaptive proxy: text - fixed", "adaptive_proxy_text", "adaptive_proxy_fixed"),
        ("P3 adaptive proxy text - ATL text, batch-hard", "adaptive_proxy_text", n("text", "batch_hard")),
        ("P4 adaptive proxy text - ATL text, semi-hard", "adaptive_proxy_text", n("text", "semi_hard")),
        ("P5 ProxyAnchor - ATL text, batch-hard", "proxy_anchor", n("text", "batch_hard")),
        ("P6 adaptive proxy text - ProxyAnchor", "adaptive_proxy_text", "proxy_anchor"),
    ]
    if oracle:
        out.append(("P7 adaptive proxy: oracle - random", "adaptive_proxy_oracle", "adaptive_proxy_permuted"))
    return out


#: ATL conditions shown beside the proxy losses (same seeds).
PROXY_ATL_ROWS = ("text_bh", "permuted_bh", "fixed_bh", "oracle_bh", "text_sh")


def _proxy_section(records: Sequence[RunRecord], evaluation: str, metrics: Sequence[str], atl_methods: Sequence,
                   proxy_methods: Sequence, config: Any) -> list[str]:
    """The proxy losses beside ATL: conditions on the proxies' seeds and paired comparisons."""
    seeds = sorted({r.seed for r in records if r.method in {m.name for m in proxy_methods}})
    if not seeds:
        return []
    on_seeds = [r for r in records if r.seed in seeds]
    proxy_cfg = next((r.train_config for r in records if r.method.startswith("adaptive_proxy")), {}) or {}
    scale = proxy_cfg.get("proxy_scale") or 16.0
    lr_mult = proxy_cfg.get("proxy_lr_multiplier", 10.0)
    lines = [
        "### Addition (not pre-registered): the proxy losses beside ATL", "",
        "Added after the pre-registered experiment ran (issue 15); nothing above depends on these runs, and "
        "the comparisons below are descriptive, not decision rules. Same protocol, shops, seeds (paired), "
        "schedule, sampler (P x K), backbone, optimiser and evaluation as the ATL conditions; the proxy "
        "losses learn one proxy per training item (learning rate x"
        f"{lr_mult:g}). `adaptive_proxy_<source>`: the adaptive proxy loss (scale {scale:g}) with the same "
        "catalog-scaled margin table as the ATL condition of that source, one additive margin per "
        "(class, negative proxy) pair, no mining. `proxy_anchor`: ProxyAnchor (PML semantics, delta 0.1, "
        "alpha 32), no text.", "",
        f"Proxy runs on seeds {', '.join(map(str, seeds))}; the ATL rows here are restricted to the same seeds.", "",
    ]
    shown = [m for m in atl_methods if m.name in PROXY_ATL_ROWS] + list(proxy_methods)
    lines += _condition_table(on_seeds, evaluation, shown, metrics, config) + [""]
    names = {m.name for m in atl_methods} | {m.name for m in proxy_methods}
    comparisons = [c for c in proxy_comparisons() if c[1] in names and c[2] in names]
    lines += [f"#### Paired comparisons, {METRIC_NAMES[metrics[0]]} (paired over the proxy seeds; Holm over "
              "these comparisons; descriptive)", ""]
    withheld = PIPELINE_CHECK if config.schedule_name == "quick" else ""
    lines += _difference_rows(paired_differences(on_seeds, evaluation, metrics[0], comparisons,
                                                 no_verdict=withheld)) + [""]
    for metric in metrics[1:]:
        lines += [f"#### {METRIC_NAMES.get(metric, metric)} (same comparisons; descriptive)", ""]
        lines += _difference_rows(paired_differences(on_seeds, evaluation, metric, comparisons,
                                                     no_verdict=withheld)) + [""]
    return lines


def _steps_line(records: Sequence[RunRecord], config: Any) -> str:
    """Steps each run trained and kept (early stopping), or the fixed budget."""
    used = [r.steps_used for r in records if r.steps_used]
    if config.schedule_obj.early_stopping_patience is None or not used:
        return f"- Steps per run: {config.schedule_obj.epochs * config.schedule_obj.steps_per_epoch} (fixed)"
    trained = [r.steps_trained for r in records if r.steps_used]
    capped = sum(t >= config.schedule_obj.epochs * config.schedule_obj.steps_per_epoch for t in trained)
    return (f"- Steps per run (early stopping; per run in \"Every run\"): scored weights after {min(used)}-{max(used)} "
            f"steps (median {int(np.median(used))}); trained {min(trained)}-{max(trained)}; {capped} of {len(trained)} "
            "runs reached the step cap")


def render_weak_label_report(result: ReplicationResult) -> str:
    """The markdown report of a weak-label experiment (every run, differences, verdicts)."""
    config = result.config
    env = result.environment
    hosts = sorted({r.host or "unrecorded" for r in result.records})
    versions = sorted({r.code_version or "unrecorded" for r in result.records})
    pipeline = config.schedule_name == "quick"
    withheld = PIPELINE_CHECK if pipeline else ""
    users_data = config.dataset is not None
    if users_data:
        origin = ("The comparisons and decision rules are fixed in the library (`atl_keras.experiments.weak_label`), "
                  "not chosen after seeing these results.")
    else:
        origin = ("The design and the decision rules were pre-registered in the project's docs/replication.md "
                  "(source repository) before the published run.")
    lines = [
        "# Does the weak label help? Margin-source experiment", "",
        "Generated by `atl replicate --experiment weak_label` (library: `atl_keras.experiments.weak_label`). "
        f"Do not edit by hand. {origin}", "",
    ]
    if pipeline:
        lines += [f"**No verdicts: {PIPELINE_CHECK}** ({config.schedule_obj.epochs} x "
                  f"{config.schedule_obj.steps_per_epoch} steps on a small shop or catalog): it shows that every "
                  "condition trains and is scored, and nothing about whether the text helps. Use the default "
                  "schedule for an answer.", ""]
    lines += [
        f"- Command: `{result.command or 'n/a'}`",
        f"- Runs: {len(result.records)} ({sum(r.reused for r in result.records)} read back from earlier "
        f"records of the same host and settings); training + evaluation time {sum(r.seconds for r in result.records) / 60:.1f} min",
        f"- Schedule `{config.schedule_name}`: {config.schedule_obj.description}; "
        f"seeds {', '.join(map(str, config.seeds))} (paired: a seed fixes the initialisation and the batches"
        + (")" if users_data else ", and the synthetic shop itself)"),
        _steps_line(result.records, config),
        f"- Text encoder: `{config.text_encoder}`; margins: catalog-scaled mapping (1st-99th percentile of the "
        "training pairs' description distances onto [0.05, 0.4])",
        f"- Hosts: {', '.join(hosts)}; code versions: {', '.join(versions)}"
        + ("  **(records from more than one host or code version are mixed here)**" if len(hosts) > 1 or len(versions) > 1 else ""),
        f"- Machine: {env.get('cpu_count', '?')} CPUs ({env.get('processor', '?')}), {env.get('platform', '?')}, "
        f"Python {env.get('python', '?')}, TensorFlow {env.get('tensorflow', '?')}, Keras {env.get('keras', '?')}, "
        f"GPUs: {env.get('gpus', '?')}",
        "- Results are deterministic for the same machine, seed, code and library versions; other machines give "
        "other numbers (seen: R@1 0.6407 vs 0.6704 for one configuration).",
    ]
    if getattr(config, "proxy_seeds", ()):
        lines.append(f"- Proxy losses (an addition, not pre-registered; see \"Addition\" below): seeds "
                     f"{', '.join(map(str, config.proxy_seeds))}")
    lines.append("")
    for protocol_name in config.protocols:
        protocol = config.protocol(protocol_name)
        all_methods = config.methods(protocol_name)
        methods = [m for m in all_methods if not m.is_proxy]  # the pre-registered conditions
        proxy_methods = [m for m in all_methods if m.is_proxy]
        all_records = [r for r in result.records if r.protocol == protocol_name]
        records = [r for r in all_records if r.method not in {m.name for m in proxy_methods}]
        for evaluation in protocol.evaluations:
            metrics = [PRIMARY_METRIC] + [m for m in SECONDARY_METRICS
                                          if any(m in r.metrics.get(evaluation, {}) for r in records)]
            lines += [f"## {protocol.title}", "", f"Evaluation: {EVALUATIONS.get(evaluation, evaluation)}.", "",
                      "### Every condition (mean ± sd over seeds)", ""]
            lines += _condition_table(records, evaluation, methods, metrics, config) + [""]
            chance = [r.metrics[evaluation].get("attribute_agreement_chance") for r in records
                      if evaluation in r.metrics and "attribute_agreement_chance" in r.metrics[evaluation]]
            if chance:
                lines += [f"Attribute agreement of a random ranking: {np.mean(chance):.3f}.", ""]
            thresholds = [r.semantic_threshold for r in records if r.semantic_threshold is not None]
            if thresholds:
                lines += ["Semantic threshold (median text distance of training variant pairs), per seed: "
                          + ", ".join(f"{t:.3f}" for t in thresholds) + ".", ""]
            comparisons = planned_comparisons(protocol_name)
            primary = paired_differences(records, evaluation, PRIMARY_METRIC, comparisons, no_verdict=withheld)
            lines += [f"### Pre-registered comparisons, primary metric {METRIC_NAMES[PRIMARY_METRIC]} "
                      "(paired over seeds; Holm over these comparisons)", ""]
            lines += _difference_rows(primary) + ["", "### Verdicts", ""]
            lines += _decisions(protocol_name, {d.label: d for d in primary}) + [""]
            for metric in metrics[1:]:
                lines += [f"### Secondary: {METRIC_NAMES.get(metric, metric)} (same comparisons; descriptive)", ""]
                lines += _difference_rows(paired_differences(records, evaluation, metric, comparisons,
                                                             no_verdict=withheld)) + [""]
            context = context_comparisons(protocol_name)
            if context:
                lines += ["### Context (not decision rules): " + (
                    "what do random margins (no text) do against a fixed margin and against the text?"
                    if protocol_name == "catalog" else
                    "does this testbed reward true semantic margins, and what does margin spread alone do?"), ""]
                for metric in metrics:
                    lines += [f"{METRIC_NAMES.get(metric, metric)}:", ""]
                    lines += _difference_rows(paired_differences(records, evaluation, metric, context,
                                                                 no_verdict=withheld), False) + [""]
            if proxy_methods:
                lines += _proxy_section(all_records, evaluation, metrics, methods, proxy_methods, config)
            order = [m.name for m in all_methods]
            lines += ["### Every run", "", "| method | seed | " + " | ".join(METRIC_NAMES.get(m, m) for m in metrics)
                      + " | steps (scored / trained) | seconds | host | code |",
                      "|---|---|" + "---|" * len(metrics) + "---|---|---|---|"]
            for r in sorted(all_records, key=lambda r: (order.index(r.method) if r.method in order else 99, r.seed)):
                cells = [f"{r.metrics.get(evaluation, {}).get(m, math.nan):.4f}" for m in metrics]
                steps = f"{r.steps_used} / {r.steps_trained}" if r.steps_used else "n/a"
                lines.append(f"| `{r.method}` | {r.seed} | " + " | ".join(cells)
                             + f" | {steps} | {r.seconds:.0f} | {r.host or 'n/a'} | {r.code_version or 'n/a'} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"

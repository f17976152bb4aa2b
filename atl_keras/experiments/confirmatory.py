"""The confirmatory weak-label experiment (Block C, pre-registered in docs/replication.md).

    from atl_keras.experiments import ReplicationConfig
    from atl_keras.experiments.confirmatory import run_confirmatory
    config = ReplicationConfig(experiment="weak_label_confirmatory", protocols=("variant_shop",),
                               seeds=tuple(range(100, 110)), schedule="converged")
    run_confirmatory(config, "results")   # results/weak_label_confirmatory.md + _records.json

Block C trains the variant shop at the `converged` schedule: miners {batch_hard, semi_hard} x
margin sources {fixed, random, permuted, text, oracle} x 10 paired seeds. It runs in **seed
blocks** (the 10 runs of one seed): a block is completed on one host, the records file gets a
block only when it is complete, and a rerun (on any host) keeps every complete block of the
records file whose settings match and trains the missing seeds. Within a block, runs of the same
host and settings are read back from ``<work_dir>/records`` (so a stopped block resumes).

Decision rules (applied only when every pre-registered seed is complete; before that the report
says "incomplete: k of 10 seeds" and gives no verdict): Holm over the four primary comparisons on
exact-item R@1 (`PRIMARY`); the positive control (oracle - permuted, batch-hard) gates the text
verdict; "text is used" iff text - permuted holds under both miners; "margin spread helps" iff
random - fixed holds under batch-hard. Effect sizes with 95% and Holm-level paired t-intervals on
R@1, variant R@1 and attribute agreement@10.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from atl_keras.experiments.methods import weak_label_method_name
from atl_keras.experiments.protocols import CONFIRMATORY_SEEDS, EVALUATIONS, ReplicationConfig
from atl_keras.experiments.runs import (
    ReplicationResult,
    RunRecord,
    environment_info,
    run_one,
    settings_key,
)
from atl_keras.experiments.weak_label import (
    METRIC_NAMES,
    Difference,
    _condition_table,
    _difference_rows,
    paired_differences,
)

__all__ = [
    "DESCRIPTIVE",
    "METRICS",
    "PRIMARY",
    "REPORT",
    "RECORDS",
    "confirmatory_result",
    "load_blocks",
    "render_confirmatory_report",
    "run_confirmatory",
    "write_confirmatory",
]

REPORT = "weak_label_confirmatory.md"
RECORDS = "weak_label_confirmatory_records.json"
#: R@1 decides; the other two get effect sizes with intervals (Holm within each metric).
METRICS = ("recall_at_1", "variant_recall_at_1", "attribute_agreement_at_10")
_n = weak_label_method_name
#: The pre-registered primary family (Holm over these four, per metric).
PRIMARY = (
    ("PC oracle - permuted, batch-hard (positive control)", _n("oracle", "batch_hard"), _n("permuted", "batch_hard")),
    ("T1 text - permuted, batch-hard", _n("text", "batch_hard"), _n("permuted", "batch_hard")),
    ("T2 text - permuted, semi-hard", _n("text", "semi_hard"), _n("permuted", "semi_hard")),
    ("S random - fixed, batch-hard", _n("random", "batch_hard"), _n("fixed", "batch_hard")),
)
#: Reported for context, never decisions (Holm within this family).
DESCRIPTIVE = (
    ("oracle - permuted, semi-hard", _n("oracle", "semi_hard"), _n("permuted", "semi_hard")),
    ("random - fixed, semi-hard", _n("random", "semi_hard"), _n("fixed", "semi_hard")),
    ("permuted - fixed, batch-hard", _n("permuted", "batch_hard"), _n("fixed", "batch_hard")),
    ("text - fixed, batch-hard", _n("text", "batch_hard"), _n("fixed", "batch_hard")),
    ("text - fixed, semi-hard", _n("text", "semi_hard"), _n("fixed", "semi_hard")),
    ("text - random, batch-hard", _n("text", "batch_hard"), _n("random", "batch_hard")),
)


def _read_records(path: str) -> list[RunRecord]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    fields = {f.name for f in dataclasses.fields(RunRecord)}
    return [RunRecord(**{k: v for k, v in r.items() if k in fields}) for r in payload.get("records", [])]


def load_blocks(path: str, config: ReplicationConfig) -> dict[int, list[RunRecord]]:
    """Complete seed blocks of `config` in the records file at `path`: ``seed -> records`` (in
    method order). A block counts when every method of the design has a record with the expected
    settings (`settings_key`) and all of them come from one host; anything else is ignored."""
    protocol = config.protocol(config.protocols[0])
    methods = config.methods(protocol.name)
    stored = {(r.method, int(r.seed)): r for r in _read_records(path) if r.protocol == protocol.name}
    blocks = {}
    for seed in config.seeds:
        block = [stored.get((m.name, seed)) for m in methods]
        if any(r is None for r in block) or len({r.host for r in block}) != 1:
            continue
        if all(r.settings_key == settings_key(protocol, m, seed, config) for r, m in zip(block, methods)):
            blocks[seed] = [dataclasses.replace(r, reused=True) for r in block]
    return blocks


def run_confirmatory(
    config: ReplicationConfig,
    output_dir: str = "results",
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
    on_block: Callable[[int, dict[str, str]], None] | None = None,
) -> ReplicationResult:
    """Run the missing seed blocks of `config`, writing report + records after each block.

    Args:
        config: the design (``experiment="weak_label_confirmatory"``, one protocol).
        output_dir: holds `REPORT` and `RECORDS`; complete blocks already in `RECORDS` are kept.
        progress: called with one line before and after each run.
        command: the command line, quoted in the report.
        on_block: called with ``(seed, paths)`` after each block's files are written (e.g. to commit them).
    """
    if config.experiment != "weak_label_confirmatory" or len(config.protocols) != 1:
        raise ValueError("run_confirmatory needs experiment='weak_label_confirmatory' and one protocol.")
    start = time.perf_counter()
    protocol = config.protocol(config.protocols[0])
    methods = config.methods(protocol.name)
    blocks = load_blocks(os.path.join(output_dir, RECORDS), config)
    say = progress or (lambda message: None)
    result = ReplicationResult(config, [], 0.0, command, environment_info())
    for seed in config.seeds:
        if seed in blocks:
            say(f"seed {seed}: complete block of {blocks[seed][0].host} read from {RECORDS}")
            continue
        block = []
        for i, method in enumerate(methods, 1):
            say(f"seed {seed} [{i}/{len(methods)}] {method.name} ...")
            record = run_one(protocol, method, seed, config)
            block.append(record)
            value = record.metrics[protocol.evaluations[0]].get("recall_at_1", math.nan)
            say(f"seed {seed} [{i}/{len(methods)}] {method.name}: R@1={value:.4f} "
                f"({'read back' if record.reused else f'{record.seconds:.0f} s'})")
        blocks[seed] = block
        result.records = [r for s in config.seeds if s in blocks for r in blocks[s]]
        result.wall_seconds = time.perf_counter() - start
        paths = write_confirmatory(result, output_dir)
        if on_block:
            on_block(seed, paths)
    result.records = [r for s in config.seeds if s in blocks for r in blocks[s]]
    result.wall_seconds = time.perf_counter() - start
    return result


def write_confirmatory(result: ReplicationResult, output_dir: str) -> dict[str, str]:
    """Write `REPORT` and `RECORDS` (complete blocks only) into `output_dir`, atomically."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"report": os.path.join(output_dir, REPORT), "records": os.path.join(output_dir, RECORDS)}
    payload = {"wall_seconds": result.wall_seconds, "command": result.command, "environment": result.environment,
               "records": [r.to_json() for r in result.records]}
    for path, text in ((paths["records"], json.dumps(payload, indent=1, default=str)),
                       (paths["report"], render_confirmatory_report(result))):
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(f"{path}.tmp", path)
    return paths


def _is_preregistered(config: ReplicationConfig) -> bool:
    return (tuple(config.seeds) == CONFIRMATORY_SEEDS and config.schedule_name == "converged"
            and tuple(config.protocols) == ("variant_shop",))


def _verdicts(primary: Sequence[Difference]) -> list[str]:
    control, text_bh, text_sh, spread = primary
    lines = []
    if control.holds:
        lines.append("- **Positive control** (oracle - permuted > 0, batch-hard): **HOLDS**: semantic margins can "
                     "help on this testbed, so it can answer the text question.")
        used = text_bh.holds and text_sh.holds
        lines.append(f"- **Text is used** (text - permuted > 0 under both miners): **{'YES' if used else 'NOT SHOWN'}** "
                     f"(batch-hard: {text_bh.verdict}; semi-hard: {text_sh.verdict}).")
    else:
        lines.append(f"- **Positive control** (oracle - permuted > 0, batch-hard): **NOT SHOWN** ({control.verdict}): "
                     "this testbed cannot show that semantic margins help, so it cannot answer the text question.")
        lines.append(f"- **Text is used**: **NOT INTERPRETABLE** (the positive control failed); for the record, "
                     f"text - permuted is {text_bh.verdict} under batch-hard and {text_sh.verdict} under semi-hard.")
    lines.append(f"- **Margin spread helps** (random - fixed > 0, batch-hard): "
                 f"**{'YES' if spread.holds else 'NOT SHOWN'}** ({spread.verdict}).")
    return lines


def render_confirmatory_report(result: ReplicationResult) -> str:
    """The Markdown report of Block C, complete or not (verdicts only when complete)."""
    config, env = result.config, result.environment
    protocol = config.protocol(config.protocols[0])
    evaluation = protocol.evaluations[0]
    methods = config.methods(protocol.name)
    records = result.records
    done = sorted({r.seed for r in records})
    total = len(config.seeds)
    preregistered = _is_preregistered(config)
    if not preregistered:
        withheld = "not the pre-registered design"
    elif len(done) < total:
        withheld = f"incomplete: {len(done)} of {total} seeds"
    else:
        withheld = ""
    schedule = config.schedule_obj
    lines = [
        "# Confirmatory weak-label experiment (Block C): does ATL use the text on trained models?", "",
        "Generated by `atl replicate --experiment weak_label_confirmatory` (library: "
        "`atl_keras.experiments.confirmatory`). Do not edit by hand. The design, the seeds and the decision rules "
        "were pre-registered in docs/replication.md (\"Block C\") and committed before the first run.", "",
    ]
    if not preregistered:
        lines += ["**Not the pre-registered design** (seeds, schedule or protocol differ): no verdicts.", ""]
    elif withheld:
        lines += [f"**Status: {withheld}.** No verdicts until all {total} pre-registered seeds are complete; the "
                  "numbers below are interim and descriptive.", ""]
    else:
        lines += [f"**Status: complete ({total} of {total} seeds).**", ""]
    lines += [
        f"- Command: `{result.command or 'n/a'}`",
        f"- Design: {protocol.title}; miners batch-hard and semi-hard x margin sources fixed, random, permuted, "
        f"text, oracle = {len(methods)} conditions per seed; seeds {', '.join(map(str, config.seeds))} (paired: a seed "
        "fixes the shop, the split, the initialisation and the batches for every condition)",
        f"- Schedule `{config.schedule_name}`: {schedule.epochs} x {schedule.steps_per_epoch} steps, P x K = "
        f"{schedule.shop_pk[0]} x {schedule.shop_pk[1]}, Adam {schedule.learning_rate}, small_cnn from scratch, "
        f"{schedule.embedding_dim}-d",
        f"- Text encoder: `{config.text_encoder}`; margins in [0.05, 0.4]: catalog-scaled text margins (1st-99th "
        "percentile of the training pairs' description distances); `fixed` = their mean; `permuted` = their values "
        "permuted across pairs; `oracle` = attribute disagreement matched to their mean and sd; `random` = i.i.d. "
        "uniform in [0.05, 0.4]",
        f"- Runs: {len(records)} in {len(done)} complete seed blocks; training + evaluation "
        f"{sum(r.seconds for r in records) / 60:.1f} min"
        + (f" (mean {np.mean([r.seconds for r in records]):.0f} s per run)" if records else ""),
        f"- Machine of this invocation: {env.get('cpu_count', '?')} CPUs ({env.get('processor', '?')}), "
        f"{env.get('platform', '?')}, Python {env.get('python', '?')}, TensorFlow {env.get('tensorflow', '?')}, "
        f"Keras {env.get('keras', '?')}, GPUs: {env.get('gpus', '?')}",
        "- Results are deterministic per machine, seed, code and library versions; a seed block is always "
        "completed on one host, blocks of different hosts may be combined (listed below).", "",
        "## Seed blocks and hosts", "",
        "| seed | host | code versions | runs | minutes |", "|---|---|---|---|---|",
    ]
    for seed in done:
        block = [r for r in records if r.seed == seed]
        lines.append(f"| {seed} | {block[0].host or 'n/a'} | {', '.join(sorted({r.code_version for r in block}))} | "
                     f"{len(block)} | {sum(r.seconds for r in block) / 60:.1f} |")
    missing = [s for s in config.seeds if s not in done]
    if missing:
        lines += ["", f"Not yet run: seeds {', '.join(map(str, missing))}."]
    lines += ["", f"## Every condition (mean ± sd over the {len(done)} complete seeds)", "",
              f"Evaluation: {EVALUATIONS.get(evaluation, evaluation)}.", ""]
    lines += _condition_table(records, evaluation, methods, METRICS, config) + [""]
    chance = [r.metrics[evaluation].get("attribute_agreement_chance") for r in records
              if "attribute_agreement_chance" in r.metrics.get(evaluation, {})]
    if chance:
        lines += [f"Attribute agreement of a random ranking: {np.mean(chance):.3f}.", ""]
    primary = paired_differences(records, evaluation, METRICS[0], PRIMARY, no_verdict=withheld)
    lines += [f"## Pre-registered comparisons, {METRIC_NAMES[METRICS[0]]} (paired over seeds; Holm over these four)", ""]
    lines += _difference_rows(primary) + ["", "## Verdicts", ""]
    if withheld:
        lines += [f"- **No verdicts** ({withheld}).", ""]
    else:
        lines += _verdicts(primary) + [""]
    for metric in METRICS[1:]:
        lines += [f"## Effect sizes, {METRIC_NAMES[metric]} (same comparisons; Holm within this metric; descriptive)", ""]
        lines += _difference_rows(paired_differences(records, evaluation, metric, PRIMARY, no_verdict=withheld)) + [""]
    lines += ["## Context (descriptive, not decision rules)", ""]
    for metric in METRICS:
        lines += [f"{METRIC_NAMES[metric]}:", ""]
        lines += _difference_rows(paired_differences(records, evaluation, metric, DESCRIPTIVE, no_verdict=withheld),
                                  False) + [""]
    order = [m.name for m in methods]
    lines += ["## Every run", "", "| method | seed | " + " | ".join(METRIC_NAMES[m] for m in METRICS)
              + " | seconds | host | code |", "|---|---|" + "---|" * len(METRICS) + "---|---|---|"]
    for r in sorted(records, key=lambda r: (r.seed, order.index(r.method) if r.method in order else 99)):
        cells = [f"{r.metrics.get(evaluation, {}).get(m, math.nan):.4f}" for m in METRICS]
        lines.append(f"| `{r.method}` | {r.seed} | " + " | ".join(cells)
                     + f" | {r.seconds:.0f} | {r.host or 'n/a'} | {r.code_version or 'n/a'} |")
    return "\n".join(lines).rstrip() + "\n"


def confirmatory_result(config: ReplicationConfig, path: str, command: str | None = None) -> ReplicationResult:
    """The complete seed blocks of the records file at `path` as a result (to re-render the report)."""
    blocks = load_blocks(path, config)
    records = [r for s in config.seeds if s in blocks for r in blocks[s]]
    env: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        env, command = payload.get("environment", {}), command or payload.get("command")
    return ReplicationResult(config, records, 0.0, command, env)


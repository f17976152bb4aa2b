"""Pilot for the `converged` schedule: fixed-margin R@1 on the variant shop at several step counts.

    python tools/weak_label_pilot.py --steps 900,1800 --seeds 0,1      # results/weak_label_pilot.{json,md}

Trains the weak-label experiment's ``fixed_bh`` condition (fixed margin, batch-hard, the same
margin-table code path, shop, sampler and evaluation as the experiment; `atl_keras.experiments.run_one`)
for each step count (epochs of 150 steps) and seed, and reports the street -> catalog R@1 on the
unseen designs. The rule it informs: the `converged` schedule is the step count after which doubling
the steps gains < 2% (relative) fixed-margin R@1. Each run's record is kept under
``--work-dir/steps<N>/records`` and reused by a rerun (resumable). The pilot's seeds must not be
the confirmatory experiment's (100-109).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS_PER_EPOCH = 150


def _validation_curve(output_dir: str) -> list[float]:
    """Validation R@1 per epoch from the run's ``training_log.csv`` (empty when not logged)."""
    path = os.path.join(output_dir, "training_log.csv")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    key = next((k for k in (rows[0] if rows else {}) if k.endswith("recall_at_1")), None)
    return [float(r[key]) for r in rows] if key else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="900,1800", help="comma-separated step counts (multiples of 150)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (not 100-109)")
    parser.add_argument("--work-dir", default="runs/weak-label-pilot")
    parser.add_argument("--output", default="results", help="writes weak_label_pilot.json and .md here")
    args = parser.parse_args(argv)

    from atl_keras.experiments import PROTOCOLS, ReplicationConfig, Schedule, run_one
    from atl_keras.experiments.methods import weak_label_methods
    from atl_keras.experiments.runs import environment_info, host_name

    steps = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(s % STEPS_PER_EPOCH for s in steps):
        print(f"error: --steps must be multiples of {STEPS_PER_EPOCH}", file=sys.stderr)
        return 2
    if set(seeds) & set(range(100, 110)):
        print("error: seeds 100-109 belong to the confirmatory experiment", file=sys.stderr)
        return 2
    method = next(m for m in weak_label_methods() if m.name == "fixed_bh")
    protocol = PROTOCOLS["variant_shop"]
    runs = []
    for n in steps:
        config = ReplicationConfig(experiment="weak_label", protocols=("variant_shop",), seeds=tuple(seeds),
                                   schedule=Schedule(epochs=n // STEPS_PER_EPOCH, steps_per_epoch=STEPS_PER_EPOCH),
                                   work_dir=os.path.join(args.work_dir, f"steps{n}"))
        for seed in seeds:
            start = time.perf_counter()
            record = run_one(protocol, method, seed, config)
            output_dir = record.train_config.get("output_dir", "")
            runs.append({"steps": n, "seed": seed, **{k: record.metrics["variant_shop"].get(k) for k in
                         ("recall_at_1", "variant_recall_at_1", "attribute_agreement_at_10", "map_at_r")},
                         "validation_recall_at_1": _validation_curve(output_dir),
                         "seconds": record.seconds, "host": record.host, "code_version": record.code_version})
            print(f"steps={n} seed={seed}: R@1={runs[-1]['recall_at_1']:.4f} ({record.seconds:.0f} s; "
                  f"this call {time.perf_counter() - start:.0f} s)", flush=True)
    os.makedirs(args.output, exist_ok=True)
    payload = {"method": method.name, "protocol": protocol.name, "steps_per_epoch": STEPS_PER_EPOCH,
               "host": host_name(), "environment": environment_info(), "runs": runs}
    with open(os.path.join(args.output, "weak_label_pilot.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    lines = ["| steps | seed | R@1 | variant R@1 | attr. agreement@10 | MAP@R | seconds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['seed']} | {r['recall_at_1']:.4f} | {r['variant_recall_at_1']:.4f} | "
              f"{r['attribute_agreement_at_10']:.4f} | {r['map_at_r']:.4f} | {r['seconds']:.0f} |" for r in runs]
    means = {n: sum(r["recall_at_1"] for r in runs if r["steps"] == n) / len(seeds) for n in steps}
    lines += ["", "Mean R@1 per step count: " + ", ".join(f"{n}: {v:.4f}" for n, v in means.items())]
    for a, b in zip(steps, steps[1:]):
        lines.append(f"- {a} -> {b} steps: relative gain {(means[b] - means[a]) / means[a]:+.1%}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

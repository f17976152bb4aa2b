"""Convergence: steps to reach the triplet baseline's final R@1, adaptive proxy vs ATL batch-hard.

For each seed: train the batch-hard triplet baseline (fixed margin) for the whole schedule;
its final validation R@1 is the target. Then train ATL (batch-hard) and the adaptive proxy
loss (and optionally ProxyAnchor) on the same seed and schedule, evaluating validation R@1
every `--eval-every` steps (one Keras epoch each, via run_training's RetrievalEvaluation),
and report the first evaluated step at which each reaches the target.

    nice -n 15 .venv/bin/python tools/proxy_convergence.py --seeds 0 1 2 --out runs/proxy_convergence
    # or one process per seed, then: tools/proxy_convergence.py --combine runs/conv*/convergence.json

Prints a markdown table and writes `<out>/convergence.json` (per-run curves included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from atl_keras.train import TrainConfig, run_training  # noqa: E402

METHODS = {
    "triplet": dict(loss="triplet", mining="batch_hard"),
    "atl": dict(loss="atl", mining="batch_hard"),
    "adaptive_proxy": dict(loss="adaptive_proxy"),
    "proxy_anchor": dict(loss="proxy_anchor"),
}


def curve(history: dict[str, list[float]], eval_every: int) -> list[tuple[int, float]]:
    return [((i + 1) * eval_every, float(r)) for i, r in enumerate(history["val_recall_at_1"])]


def steps_to(points: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, r1 in points if r1 >= target), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["atl", "adaptive_proxy", "proxy_anchor"],
                        choices=[m for m in METHODS if m != "triplet"])
    parser.add_argument("--steps", type=int, default=450, help="training steps per run (full schedule: 450)")
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--validation-size", type=int, default=2000)
    parser.add_argument("--proxy-lr-multiplier", type=float, default=10.0)
    parser.add_argument("--proxy-scale", type=float, default=None)
    parser.add_argument("--out", default="runs/proxy_convergence")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="only print the table of these convergence.json files (e.g. one per seed)")
    args = parser.parse_args()
    if args.combine:
        payloads = [json.load(open(path, encoding="utf-8")) for path in args.combine]
        merged = {"runs": [run for payload in payloads for run in payload["runs"]]}
        methods = [m for m in METHODS if m != "triplet" and any(r["method"] == m for r in merged["runs"])]
        print(table(merged, methods))
        return 0
    if args.steps % args.eval_every:
        parser.error("--steps must be a multiple of --eval-every")
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "convergence.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    payload = {"args": vars(args), "commit": commit, "machine": platform.node(), "runs": []}

    for seed in args.seeds:
        for method in ["triplet", *args.methods]:
            config = TrainConfig(
                dataset="synthetic-shop", synthetic_items=args.items, image_size=args.image_size,
                epochs=args.steps // args.eval_every, steps_per_epoch=args.eval_every,
                validation_size=args.validation_size, seed=seed, projector_size=0,
                output_dir=os.path.join(args.out, method, f"seed{seed}"),
                proxy_lr_multiplier=args.proxy_lr_multiplier, proxy_scale=args.proxy_scale,
                **METHODS[method],
            )
            start = time.perf_counter()
            result = run_training(config, verbose=0)
            points = curve(result.history, args.eval_every)
            run = {"seed": seed, "method": method, "curve": points,
                   "final_val_r1": points[-1][1], "test_r1": float(result.test_metrics["recall_at_1"]),
                   "seconds": time.perf_counter() - start}
            payload["runs"].append(run)
            print(f"seed {seed} {method:15s} val R@1 {run['final_val_r1']:.4f} test R@1 {run['test_r1']:.4f} "
                  f"({run['seconds']:.0f} s)", flush=True)
            with open(results_path, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1)

    print()
    print(table(payload, args.methods))
    return 0


def table(payload: dict, methods: list[str]) -> str:
    runs = {(r["seed"], r["method"]): r for r in payload["runs"]}
    seeds = sorted({r["seed"] for r in payload["runs"]})
    header = "| seed | triplet final val R@1 (target) | " + " | ".join(
        f"{m}: steps to target (final val R@1)" for m in methods) + " |"
    lines = [header, "|" + "---|" * (2 + len(methods))]
    reached: dict[str, list[int | None]] = {m: [] for m in methods}
    for seed in seeds:
        target = runs[(seed, "triplet")]["final_val_r1"]
        target_step = steps_to(runs[(seed, "triplet")]["curve"], target)
        cells = [str(seed), f"{target:.4f} (reached at step {target_step})"]
        for m in methods:
            run = runs.get((seed, m))
            if run is None:
                cells.append("-")
                continue
            step = steps_to(run["curve"], target)
            reached[m].append(step)
            cells.append(f"{step if step is not None else 'not reached'} ({run['final_val_r1']:.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    summary = ["median", ""]
    for m in methods:
        steps = [s for s in reached[m] if s is not None]
        summary.append(f"{np.median(steps):.0f} ({len(steps)}/{len(reached[m])} seeds reached)" if steps
                       else f"- (0/{len(reached[m])} seeds reached)")
    lines.append("| " + " | ".join(summary) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

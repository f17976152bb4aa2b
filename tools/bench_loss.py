"""Forward + backward time of TripletLoss and AdaptiveTripletLoss per mining mode.

Each configuration is a `tf.function` computing the loss and its gradient with
respect to the embeddings, warmed up, then timed ``--repeats`` times, all
configurations of one batch size round-robin; the median is reported. Batches are P x K (K=4 images per item), D=128 unit embeddings,
T=512 text embeddings. Ratios are measured in the same run:

- ATL / Triplet per mining mode and batch size (target <= 1.25 at B=256),
- semi_hard / batch_hard per loss and batch size (target <= 3 at B=1024).

As in real data every image of an item carries the item's text, so ATL
computes its text distances once per item. ``--per-row-text`` also times ATL
on a batch where one image per item carries a different text: the loss then
detects that the texts are not shared per label and computes the full
``[B, T] x [T, B]`` text distances (the cost before the per-label path).

Usage:
    python tools/bench_loss.py [--batch-sizes 64 256 1024] [--repeats 10]
        [--per-row-text] [--output results/bench_loss.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # each (loss, B) traces its own step: retracing notes are expected

from atl_keras.losses import MINING_MODES, AdaptiveTripletLoss, TripletLoss  # noqa: E402

EMBEDDING_DIM = 128
TEXT_DIM = 512
IMAGES_PER_ITEM = 4


def make_batch(batch_size: int, seed: int = 0) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """P x K batch: labels [B] int64, embeddings [B, D], text embeddings [B, T]."""
    rng = np.random.default_rng(seed)
    items = batch_size // IMAGES_PER_ITEM
    labels = np.repeat(rng.choice(10**9, size=items, replace=False), IMAGES_PER_ITEM)
    labels = np.resize(labels, batch_size).astype(np.int64)
    emb = rng.normal(size=(batch_size, EMBEDDING_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    text_per_item = rng.normal(size=(items + 1, TEXT_DIM)).astype(np.float32)
    _, item_index = np.unique(labels, return_inverse=True)
    text = text_per_item[item_index]
    return tf.constant(labels), tf.constant(emb), tf.constant(text)


def unshare_text(text: tf.Tensor) -> tf.Tensor:
    """``text`` with every ``IMAGES_PER_ITEM``-th row changed: texts no longer per label."""
    values = text.numpy().copy()
    values[::IMAGES_PER_ITEM] += 0.5
    return tf.constant(values)


def make_step(loss: tf.keras.losses.Loss, y_true, embeddings: tf.Tensor):
    """A warmed-up `tf.function` running one forward + backward pass."""

    @tf.function
    def step(emb: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(emb)
            value = loss(y_true, emb)
        return value, tape.gradient(value, emb)

    for _ in range(2):  # trace + warm-up
        value, grad = step(embeddings)
    if not (np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy()))):
        raise RuntimeError(f"non-finite loss or gradient for {loss.get_config()}")
    return lambda: [t.numpy() for t in step(embeddings)]


def time_interleaved(steps: dict[str, object], repeats: int) -> dict[str, float]:
    """Median milliseconds per step, timing the steps round-robin.

    Interleaving makes the ratios robust to load that changes during the run
    (the machine is shared): every configuration sees the same conditions.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--per-row-text", action="store_true",
                        help="also time ATL when texts are not shared per label (full path)")
    parser.add_argument("--output", default="results/bench_loss.json")
    args = parser.parse_args(argv)

    rows = []
    for batch_size in args.batch_sizes:
        labels, emb, text = make_batch(batch_size)
        targets = {"label": labels, "text_embedding": text}
        steps = {}
        for mining in MINING_MODES:
            steps[("triplet", mining)] = make_step(TripletLoss(mining=mining), labels, emb)
            steps[("atl", mining)] = make_step(AdaptiveTripletLoss(mining=mining), targets, emb)
            if args.per_row_text:
                per_row = {"label": labels, "text_embedding": unshare_text(text)}
                steps[("atl_per_row_text", mining)] = make_step(
                    AdaptiveTripletLoss(mining=mining), per_row, emb
                )
        ms = time_interleaved(steps, args.repeats)
        for mining in MINING_MODES:
            triplet_ms, atl_ms = ms[("triplet", mining)], ms[("atl", mining)]
            row = {
                "batch_size": batch_size,
                "mining": mining,
                "triplet_ms": triplet_ms,
                "atl_ms": atl_ms,
                "atl_over_triplet": atl_ms / triplet_ms,
            }
            line = (f"  B={batch_size:5d} {mining:10s} triplet {triplet_ms:9.2f} ms  "
                    f"atl {atl_ms:9.2f} ms")
            if args.per_row_text:
                row["atl_per_row_text_ms"] = ms[("atl_per_row_text", mining)]
                row["atl_per_row_text_over_triplet"] = row["atl_per_row_text_ms"] / triplet_ms
                line += f"  atl (per-row text) {row['atl_per_row_text_ms']:9.2f} ms"
            rows.append(row)
            print(line, flush=True)

    by_key = {(r["batch_size"], r["mining"]): r for r in rows}
    semi_over_hard = {}
    for batch_size in args.batch_sizes:
        hard = by_key[(batch_size, "batch_hard")]
        semi = by_key[(batch_size, "semi_hard")]
        semi_over_hard[str(batch_size)] = {
            "triplet": semi["triplet_ms"] / hard["triplet_ms"],
            "atl": semi["atl_ms"] / hard["atl_ms"],
        }

    print()
    print(f"forward+backward ms (median of {args.repeats}), D={EMBEDDING_DIM}, T={TEXT_DIM}, "
          f"P x K batches with K={IMAGES_PER_ITEM}")
    extra = f" {'ATL per-row text':>17} {'ratio':>6}" if args.per_row_text else ""
    print(f"{'B':>5} {'mining':<11} {'Triplet':>10} {'ATL':>10} {'ATL/Triplet':>12}{extra}")
    for r in rows:
        extra = (f" {r['atl_per_row_text_ms']:>17.2f} {r['atl_per_row_text_over_triplet']:>6.2f}"
                 if args.per_row_text else "")
        print(f"{r['batch_size']:>5} {r['mining']:<11} {r['triplet_ms']:>10.2f} "
              f"{r['atl_ms']:>10.2f} {r['atl_over_triplet']:>12.2f}{extra}")
    print()
    print(f"{'B':>5} {'semi_hard/batch_hard (Triplet)':>31} {'(ATL)':>8}")
    for batch_size, ratio in semi_over_hard.items():
        print(f"{batch_size:>5} {ratio['triplet']:>31.2f} {ratio['atl']:>8.2f}")

    result = {
        "config": {
            "batch_sizes": args.batch_sizes,
            "repeats": args.repeats,
            "embedding_dim": EMBEDDING_DIM,
            "text_dim": TEXT_DIM,
            "images_per_item": IMAGES_PER_ITEM,
            "per_row_text": args.per_row_text,
            "tensorflow": tf.__version__,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "rows": rows,
        "semi_hard_over_batch_hard": semi_over_hard,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

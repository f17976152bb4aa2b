"""Training throughput on 1 vs 2 replicas (logical CPU devices), with and without cross-replica mining.

    python tools/bench_distribute.py [--steps 30] [--p 16] [--k 4] [--image-size 32]

One process, one run: the CPU is split into 2 logical devices first, then for each setting a
model is built and compiled under its strategy, one warm-up `fit` (tracing) runs, and the
timed `fit` of `--steps` steps gives steps/second. "cross-replica" all-gathers embeddings,
labels and text embeddings so the loss mines over the global batch; "per-replica" mines inside
each replica's slice. On CPU stand-ins the 2 "replicas" share the same cores, so 2-replica
speed-ups are not expected here; the all-gather overhead ratio is the portable number.
Prints a table and writes results/bench_distribute.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from atl_keras.distribute import logical_cpu_devices  # noqa: E402

logical_cpu_devices(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from atl_keras.data.sampler import pk_dataset  # noqa: E402
from atl_keras.distribute import distribute_batches, get_strategy  # noqa: E402
from atl_keras.losses import AdaptiveTripletLoss  # noqa: E402
from atl_keras.model import ATLModel  # noqa: E402


def measure(strategy, cross: bool, data, args) -> float:
    images, labels, text = data
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = ATLModel("small_cnn", images.shape[1:], 64, cross_replica_mining=cross)
        model.compile(keras.optimizers.Adam(1e-3), loss=AdaptiveTripletLoss(mining=args.mining))
    dataset = distribute_batches(strategy, pk_dataset(images, labels, text, p=args.p, k=args.k))
    model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)  # trace + warm up
    best = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0)
        best = max(best, args.steps / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--p", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--mining", default="batch_hard")
    parser.add_argument("--output", default="results/bench_distribute.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(64), 6).astype(np.int64)
    images = rng.integers(0, 256, size=(len(labels), args.image_size, args.image_size, 3)).astype(np.uint8)
    text = rng.normal(size=(64, 32)).astype(np.float32)[labels]
    data = (images, labels, text)

    one, two = get_strategy("one_device"), get_strategy("mirrored")
    rows = {
        "1 replica": measure(one, True, data, args),
        "2 replicas, cross-replica mining": measure(two, True, data, args),
        "2 replicas, per-replica mining": measure(two, False, data, args),
    }
    result = {
        "steps_per_second": rows,
        "global_batch": args.p * args.k,
        "image_size": args.image_size,
        "mining": args.mining,
        "speedup_2_vs_1_replica": rows["2 replicas, cross-replica mining"] / rows["1 replica"],
        "all_gather_cost": 1.0 - rows["2 replicas, cross-replica mining"] / rows["2 replicas, per-replica mining"],
        "devices": "2 logical CPU devices on one host CPU",
    }
    print(f"global batch {args.p}x{args.k}={args.p * args.k}, {args.image_size}px, {args.mining}")
    for name, value in rows.items():
        print(f"  {name:<34} {value:7.2f} steps/s")
    print(f"  2 vs 1 replica speed-up:           {result['speedup_2_vs_1_replica']:.2f}x")
    print(f"  all-gather cost vs per-replica:    {100 * result['all_gather_cost']:.1f}% of step time")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

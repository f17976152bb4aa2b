"""Forward + backward time of the proxy losses, and their ratio to ATL measured in the same run.

Contenders per (B, C): `AdaptiveProxyLoss` with margins from class text embeddings
computed per batch (``[B, T] x [T, C]``, ``precompute_margins=False``), with a precomputed
``[C, C]`` margin matrix (C <= 4096 only: C^2 floats; the loss's default up to C = 2048), `ProxyAnchorLoss`, and ATL (`AdaptiveTripletLoss`, batch_hard; no proxies, so
it does not depend on C). Each is a `tf.function` computing the loss and its gradient with
respect to the embeddings and the proxies, warmed up, then timed ``--repeats`` times with the
contenders of one (B, C) round-robin; medians and ratios to ATL's median are printed.
Batches are P x K (K=4), D=128 unit embeddings, T=512 text embeddings.

    python tools/bench_proxy_loss.py [--batch-sizes 256 1024 4096] [--classes 1000 10000]
        [--repeats 7] [--output results/bench_proxy_loss.json]
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

from atl_keras.losses import AdaptiveTripletLoss  # noqa: E402
from atl_keras.proxy_losses import AdaptiveProxyLoss, ProxyAnchorLoss, class_margin_matrix  # noqa: E402

EMBEDDING_DIM = 128
TEXT_DIM = 512
IMAGES_PER_ITEM = 4
MAX_MATRIX_CLASSES = 4096


def make_batch(batch: int, classes: int, seed: int = 0):
    """labels [B] in [0, C) (P x K, or with repeats when B/K > C), unit embeddings [B, D],
    class texts [C, T], the batch rows' texts [B, T], proxies [C, D]."""
    rng = np.random.default_rng(seed)
    items = batch // IMAGES_PER_ITEM
    chosen = rng.choice(classes, size=items, replace=items > classes)
    labels = np.repeat(chosen, IMAGES_PER_ITEM).astype(np.int64)
    emb = rng.normal(size=(batch, EMBEDDING_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    class_text = rng.normal(size=(classes, TEXT_DIM)).astype(np.float32)
    proxies = rng.normal(size=(classes, EMBEDDING_DIM)).astype(np.float32)
    return labels, emb, class_text, class_text[labels], proxies


def make_step(loss, labels, text, emb, proxies):
    """A warmed-up callable running one forward + backward pass (grads w.r.t. emb, proxies)."""
    y = {"label": tf.constant(labels), "text_embedding": tf.constant(text)}
    emb = tf.constant(emb)
    proxies = None if proxies is None else tf.constant(proxies)

    @tf.function
    def step(e, p):
        with tf.GradientTape() as tape:
            tape.watch(e)
            if p is None:
                value = loss(y, e)
                return value, tape.gradient(value, e)
            tape.watch(p)
            value = loss(y, e, proxies=p)
            return value, *tape.gradient(value, [e, p])

    for _ in range(2):
        out = step(emb, proxies)
    if not all(np.all(np.isfinite(t.numpy())) for t in out):
        raise RuntimeError(f"non-finite loss or gradient for {type(loss).__name__}")
    return lambda: [t.numpy() for t in step(emb, proxies)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", help="write the medians as JSON here")
    args = parser.parse_args()

    rows = []
    print(f"{'B':>5} {'C':>6} {'contender':<28} {'median ms':>10} {'/ ATL':>7}")
    for batch in args.batch_sizes:
        for classes in args.classes:
            labels, emb, class_text, text, proxies = make_batch(batch, classes)
            contenders = {
                "atl_batch_hard": make_step(AdaptiveTripletLoss(0.05, 0.4, mining="batch_hard"), labels, text, emb, None),
                "adaptive_proxy_text": make_step(AdaptiveProxyLoss(class_text_embeddings=class_text, precompute_margins=False),
                                                 labels, text, emb, proxies),
                "proxy_anchor": make_step(ProxyAnchorLoss(), labels, text, emb, proxies),
            }
            if classes <= MAX_MATRIX_CLASSES:
                matrix = class_margin_matrix(class_text)
                contenders["adaptive_proxy_matrix"] = make_step(AdaptiveProxyLoss(margin_matrix=matrix), labels, text, emb, proxies)
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.repeats):  # interleaved: every contender once per round
                for name, run in contenders.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            atl = statistics.median(times["atl_batch_hard"])
            for name, values in times.items():
                median = statistics.median(values)
                rows.append({"batch": batch, "classes": classes, "contender": name,
                             "median_ms": 1e3 * median, "ratio_to_atl": median / atl})
                print(f"{batch:>5} {classes:>6} {name:<28} {1e3 * median:>10.2f} {median / atl:>7.2f}", flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"machine": platform.node(), "processor": platform.processor(), "tensorflow": tf.__version__,
                       "repeats": args.repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

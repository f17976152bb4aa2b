"""Benchmark exact search and retrieval metrics on CPU (prints; not a test).

    .venv/bin/python tools/bench_metrics.py                 # ~1 min on 2 cores
    .venv/bin/python tools/bench_metrics.py --queries 100000 --gallery 100000

1. ``exact_search`` (TensorFlow matmul + ``tf.math.top_k`` per chunk) against a numpy
   baseline (BLAS matmul + ``argpartition`` + stable sort of the k winners) on the same
   data, in one run, reported as a ratio; also checks that both agree.
2. ``retrieval_metrics`` in leave-one-out on a Fashion-MNIST-sized problem
   (10 classes x 1000 items, so R = 999 and MAP@R ranks the top 999 of every query).
Peak RSS (``ru_maxrss``) is printed to show memory stays O(chunk * N).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from atl_keras.metrics import format_metrics_table, retrieval_metrics  # noqa: E402
from atl_keras.search import exact_search  # noqa: E402


def numpy_search(queries: np.ndarray, gallery: np.ndarray, k: int, chunk_size: int):
    """Squared-L2 top-k with numpy (``argpartition``; tie order at the k-th place is arbitrary)."""
    g_sq = np.sum(gallery * gallery, axis=1)
    out_i = np.empty((queries.shape[0], k), np.int64)
    out_d = np.empty((queries.shape[0], k), np.float32)
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start : start + chunk_size]
        d = np.sum(q * q, axis=1, keepdims=True) + g_sq[None, :] - 2.0 * (q @ gallery.T)
        np.maximum(d, 0.0, out=d)
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        part_d = np.take_along_axis(d, part, axis=1)
        order = np.lexsort((part, part_d), axis=1)
        out_i[start : start + chunk_size] = np.take_along_axis(part, order, axis=1)
        out_d[start : start + chunk_size] = np.take_along_axis(part_d, order, axis=1)
    return out_i, out_d


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--gallery", type=int, default=50000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--metrics-items", type=int, default=10000, help="leave-one-out set size")
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(args.gallery, args.dim)).astype(np.float32)
    queries = rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    print(f"exact search: Q={args.queries} N={args.gallery} D={args.dim} k={args.k} chunk={args.chunk_size}")
    exact_search(queries[:8], gallery[:64], 4)  # trace the tf.function once
    rss0 = peak_rss_mb()
    t_tf, (idx_tf, dist_tf) = timed(exact_search, queries, gallery, args.k, chunk_size=args.chunk_size)
    rss_tf = peak_rss_mb()
    t_np, (idx_np, dist_np) = timed(numpy_search, queries, gallery, args.k, args.chunk_size)
    agree = float(np.mean(idx_tf == idx_np))
    print(f"  tensorflow top_k : {t_tf:8.2f} s  ({args.queries / t_tf:9.0f} queries/s)")
    print(f"  numpy argpartition: {t_np:8.2f} s  ({args.queries / t_np:9.0f} queries/s)")
    print(f"  ratio numpy / tensorflow = {t_np / t_tf:.2f}  (> 1: TensorFlow faster)")
    print(f"  index agreement {agree:.6f}, max |distance diff| {np.abs(dist_tf - dist_np).max():.2e}")
    full_mb = args.queries * args.gallery * 4 / 2**20
    print(
        f"  peak RSS: {rss0:.0f} MB before, {rss_tf:.0f} MB after exact_search, {peak_rss_mb():.0f} MB after "
        f"numpy; one full Q x N float32 matrix would be {full_mb:.0f} MB"
    )
    del gallery, queries

    n, c = args.metrics_items, args.classes
    centers = rng.normal(size=(c, 64)).astype(np.float32)
    labels = rng.permutation(np.arange(n) % c)
    x = (centers[labels] + 1.5 * rng.normal(size=(n, 64))).astype(np.float32)
    print(f"\nretrieval_metrics leave-one-out: {n} items, {c} classes (R up to {n // c - 1}), D=64")
    t_m, metrics = timed(retrieval_metrics, x, labels, ks=(1, 10, 20), chunk_size=args.chunk_size)
    print(f"  {t_m:.2f} s ({n / t_m:.0f} queries/s), peak RSS {peak_rss_mb():.0f} MB")
    print(format_metrics_table(metrics))


if __name__ == "__main__":
    main()

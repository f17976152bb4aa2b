"""Training memory against catalog size: does peak RSS grow with the rows of a catalog?

    python tools/bench_train_memory.py                 # 300 vs 3,000 rows, streaming (the default)
    python tools/bench_train_memory.py --rows 300,3000,6000   # growth between each pair of sizes
    python tools/bench_train_memory.py --no-stream     # also the in-memory path, for comparison

1. Writes 3,000 JPEGs of 256 x 256 (4 per item) and CSV catalogs of the first 300 and of all
   3,000 rows, then runs, for each, under ``/usr/bin/time -v``::

       atl train --dataset catalog:CSV --image-size 224 --epochs 1 --steps-per-epoch 2 \\
           --text-encoder hashing --quiet

   and reads the peak RSS ("Maximum resident set size"), ``--repeats`` times per size with
   the sizes interleaved (one run's peak varies by ~0.1 GB on a shared machine). Growth per
   row = (median peak(3,000) - median peak(300)) / 2,700 (target <= 55 KB per row).
2. Streaming index of a 1M-row synthetic path list (``/data/catalog/images/0000123/4.jpg``,
   8 rows per item), measured without decoding: RSS before and after building `FileImages`,
   the labels, the P x K pipeline and drawing 10 batches of paths through it (the path list
   itself is kept alive, so only the index is counted), in two processes (100k and 1M rows):
   bytes per row = the slope between them (TensorFlow's fixed costs cancel). Target <= 200.

Saves ``results/bench_train_memory.json`` with the machine, commit and load averages.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_input import machine, save, write_jpegs  # noqa: E402

PER_ITEM = 4

INDEX_CODE = r"""
import json, os, sys
import numpy as np, tensorflow as tf

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

from atl_keras.data.sampler import pk_index_dataset
from atl_keras.data.sources import FileImages
from atl_keras.data.streaming import pk_stream_dataset
from atl_keras.preprocessing import Preprocessing
n = int(sys.argv[1])
list(tf.data.Dataset.range(3).map(lambda x: x + 1))          # initialise the tf.data runtime
before_list = rss()
paths = [f"/data/catalog/images/{i // 8:07d}/{i % 8}.jpg" for i in range(n)]
before = rss()
labels = np.arange(n, dtype=np.int64) // 8
source = FileImages(paths)
stream = pk_stream_dataset(source, labels, None, Preprocessing((224, 224)), p=16, k=4, seed=0)
index = pk_index_dataset(labels, p=16, k=4, seed=0).map(lambda idx: tf.map_fn(source.path_tensor, idx,
                                                                      fn_output_signature=tf.string))
drawn = [batch for batch in index.take(10)]
assert drawn[0].shape == (64,) and drawn[0][0].numpy().decode().startswith("/data/catalog/images/")
after = rss()
print("RESULT " + json.dumps({"rows": n, "path_list_bytes_per_row": (before - before_list) / n,
                              "index_bytes": after - before, "numpy_index_bytes_per_row":
                              (source.nbytes + labels.nbytes) / n}))
"""


def write_catalog(folder: str, paths: list[str], rows: int) -> str:
    path = os.path.join(folder, f"catalog_{rows}.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "item_id", "description"])
        for i, image in enumerate(paths[:rows]):
            item = i // PER_ITEM
            writer.writerow([image, f"sku-{item:05d}", f"product {item % 37} in colour {item % 11}"])
    return path


def peak_rss(catalog: str, output: str, stream: bool) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "atl_keras.cli", "train", "--dataset",
               f"catalog:{catalog}", "--image-size", "224", "--epochs", "1", "--steps-per-epoch", "2",
               "--text-encoder", "hashing", "--quiet", "--output", output]
    if not stream:
        command.append("--no-stream")
    proc = subprocess.run(command, capture_output=True, text=True)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode or not match:
        raise RuntimeError(f"atl train failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr)
    return {"peak_rss_bytes": int(match.group(1)) * 1024, "wall": wall.group(1) if wall else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="300,3000")
    parser.add_argument("--index-rows", type=int, default=1_000_000)
    parser.add_argument("--no-stream", action="store_true", help="also measure the in-memory path")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per size, interleaved; the growth uses the median peak of each size")
    parser.add_argument("--output", default=os.path.join("results", "bench_train_memory.json"))
    args = parser.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]
    figures: dict = {"machine": machine(), "train": {}}
    print(f"machine: {figures['machine']['cpu']}, {figures['machine']['cores']} cores, commit "
          f"{figures['machine']['commit']}, load {' '.join(f'{x:.2f}' for x in figures['machine']['load_before'])}")
    with tempfile.TemporaryDirectory() as tmp:
        images = write_jpegs(tmp, max(sizes), 256, 256)
        catalogs = {rows: write_catalog(tmp, images, rows) for rows in sizes}
        modes = [True, False] if args.no_stream else [True]
        for stream in modes:
            name = "stream" if stream else "in-memory"
            runs_of: dict[int, list] = {rows: [] for rows in sizes}
            for repeat in range(args.repeats):  # sizes interleaved: drift on a shared machine hits all
                for rows in sizes:
                    result = peak_rss(catalogs[rows], os.path.join(tmp, f"run-{name}-{rows}-{repeat}"), stream)
                    result["load"] = list(os.getloadavg())
                    runs_of[rows].append(result)
                    print(f"[train] {name:9s} {rows:6d} rows, repeat {repeat + 1}/{args.repeats}: peak RSS "
                          f"{result['peak_rss_bytes'] / 1e9:.3f} GB (wall {result['wall']}, load "
                          f"{result['load'][0]:.2f})", flush=True)
            figures["train"][name] = {
                rows: {"runs": runs_of[rows],
                       "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs_of[rows])}
                for rows in sizes}
            for rows in sizes:
                peaks = [r["peak_rss_bytes"] / 1e9 for r in runs_of[rows]]
                print(f"[train] {name:9s} {rows:6d} rows: median peak RSS "
                      f"{figures['train'][name][rows]['peak_rss_bytes'] / 1e9:.3f} GB "
                      f"(runs {', '.join(f'{p:.3f}' for p in peaks)})")
            ordered = sorted(sizes)
            for low, high in zip(ordered, ordered[1:]):
                growth = (figures["train"][name][high]["peak_rss_bytes"]
                          - figures["train"][name][low]["peak_rss_bytes"]) / (high - low)
                figures["train"][name][f"growth_bytes_per_row_{low}_{high}"] = growth
                print(f"[train] {name}: {growth / 1e3:.1f} KB per extra row ({low} -> {high} rows, medians; "
                      "target <= 55 KB)")
    runs = {}
    for rows in (args.index_rows // 10, args.index_rows):  # the slope between two sizes: fixed costs cancel
        proc = subprocess.run([sys.executable, "-c", INDEX_CODE, str(rows)], capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"index measurement failed:\n{proc.stderr[-3000:]}")
        runs[rows] = json.loads(lines[-1][len("RESULT "):])
        print(f"[index] {rows} synthetic paths: RSS +{runs[rows]['index_bytes'] / 1e6:.1f} MB for the index and "
              f"pipeline ({runs[rows]['index_bytes'] / rows:.1f} bytes per row); numpy arrays "
              f"{runs[rows]['numpy_index_bytes_per_row']:.1f} bytes per row; the Python path list itself "
              f"{runs[rows]['path_list_bytes_per_row']:.1f}")
    small, large = sorted(runs)
    slope = (runs[large]["index_bytes"] - runs[small]["index_bytes"]) / (large - small)
    figures["index"] = {"runs": runs, "bytes_per_row": slope}
    print(f"[index] streaming index: {slope:.1f} bytes per row ({small} -> {large} rows; target <= 200)")
    save(figures, args.output)


if __name__ == "__main__":
    main()

"""The main job, end to end: train -> export (SavedModel + ScaNN) -> serve over gRPC -> query.

    python tools/main_job.py [--dataset synthetic-shop] [--output runs/main]
        [--export-base saved_models/shop] [--epochs 3] [--steps-per-epoch 150] [--queries 5] [--k 5]
        [--verbose]   # TensorFlow's and ScaNN's log lines (quiet by default, like `atl`)

1. `atl train` on the synthetic shop (items never seen in training are evaluated street
   photo -> catalog) with the adaptive triplet loss, margins from the built-in USE encoder
   on the product descriptions; prints the retrieval table.
2. Indexes the test items' catalog images (written as PNGs + a products CSV) with
   `atl_keras.index_catalog` as the next version of `--export-base` (and the portable variant
   for stock TF Serving); then renders a larger catalog (2,400 images, above ScaNN's
   brute-force threshold) into `<export-base>-catalog` with a tuned tree index, twice (the
   second run reuses the embedding cache).
3. Starts `python -m serving.server` on a free 127.0.0.1 port and queries it through TF
   Serving's gRPC API with street photos; prints the top-k per query.
4. Stops the server with SIGTERM (it drains and exits 0).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from atl_keras.cli.environment import configure_logging, pop_verbose  # noqa: E402  (no TensorFlow)
from atl_keras.cli.native_logs import filtered_native_stderr  # noqa: E402


def start_server(model_name: str, base_path: str, timeout: float = 180.0):
    """Start the gRPC server on a free port; returns (process, "127.0.0.1:port")."""
    process = subprocess.Popen(
        [
            sys.executable, "-m", "serving.server", "--port", "0",
            "--model_name", model_name, "--model_base_path", base_path,
            "--file_system_poll_wait_seconds", "0",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode}")
            continue
        match = re.search(r"listening on (\S+)", line)
        if match:
            return process, match.group(1)
    process.kill()
    raise RuntimeError("the server did not start in time")


def stop_server(process: subprocess.Popen, timeout: float = 30.0) -> int:
    process.terminate()  # SIGTERM: drain in-flight requests, then exit 0
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def write_example_images(output: str, test, count: int, seed: int) -> tuple[str, str]:
    """PNG files for trying `atl query` by hand: `count` query photos (`<output>/queries/`)
    and every gallery image named by its id (`<output>/gallery/<id>.png`, for --grid)."""
    import numpy as np
    import tensorflow as tf

    query_dir, gallery_dir = os.path.join(output, "queries"), os.path.join(output, "gallery")
    picks = np.random.default_rng(seed + 1).choice(len(test.query_images), size=count, replace=False)
    for n, pick in enumerate(picks):
        path = os.path.join(query_dir, f"query-{n}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tf.io.write_file(path, tf.io.encode_png(test.query_images[pick]))
    for image, image_id in zip(test.index_images, test.gallery_ids):
        path = os.path.join(gallery_dir, f"{image_id}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tf.io.write_file(path, tf.io.encode_png(image))
    return query_dir, gallery_dir


def write_catalog_csv(path: str, image_dir: str, image_ids, item_ids, descriptions) -> str:
    """The `atl index` catalog of PNGs in `image_dir` (named by image id): image, item_id, image_id, description."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "item_id", "image_id", "description"])
        for image_id, item_id, description in zip(image_ids, item_ids, descriptions):
            writer.writerow([os.path.relpath(os.path.join(image_dir, f"{image_id}.png"), os.path.dirname(path)),
                             item_id, image_id, description or ""])
    return path


def index_larger_catalog(model, output: str, export_base: str, data, seed: int, items: int = 800) -> None:
    """Render a catalog above ScaNN's brute-force threshold and index it twice (tuned tree, then the cache)."""
    import tensorflow as tf

    from atl_keras.catalog_index import index_catalog
    from atl_keras.data.synthetic_shop import make_synthetic_shop
    from atl_keras.preprocessing import Preprocessing

    size = Preprocessing.for_model(model).image_size[0]
    shop = make_synthetic_shop(num_items=items, catalog_per_item=3, street_per_item=0, image_size=size, seed=seed + 1)
    folder = os.path.join(output, "large_catalog")
    os.makedirs(folder, exist_ok=True)
    image_ids = [f"{shop.item_ids[int(label)]}#{row}" for row, label in enumerate(shop.labels)]
    for image, image_id in zip(shop.images, image_ids):
        path = os.path.join(folder, f"{image_id}.png")
        if not os.path.exists(path):
            tf.io.write_file(path, tf.io.encode_png(image))
    catalog = write_catalog_csv(os.path.join(output, "large_catalog.csv"), folder, image_ids,
                                [shop.item_ids[int(l)] for l in shop.labels],
                                [shop.descriptions[int(l)] for l in shop.labels])
    first = index_catalog(model, catalog, export_base, k=10)
    chosen, recall = first.export.manifest["scann_config"], first.export.manifest["recall"]
    print(f"larger catalog: {len(image_ids)} images -> {first.export.path}: {chosen['scoring']} scoring, "
          f"{'adaptive, up to ' if chosen.get('spill_threshold') else ''}"
          f"{chosen['num_leaves_to_search']}/{chosen['num_leaves']} leaves, set recall@10 "
          f"{recall['set_recall']:.4f} (tie-aware {recall['tie_aware_recall']:.4f}); embedded {first.counts['embedded']}")
    again = index_catalog(model, catalog, export_base, k=10)
    print(f"re-indexed unchanged catalog -> {again.export.path}: embedded {again.counts['embedded']}, "
          f"cached {again.counts['cached']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic-shop")
    parser.add_argument("--output", default="runs/main")
    parser.add_argument("--export-base", default="saved_models/shop")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=150)
    parser.add_argument("--text-encoder", default="use-m3")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from atl_keras.catalog_index import index_catalog
    from atl_keras.metrics import format_metrics_table
    from atl_keras.train import TrainConfig, run_training
    from serving.client import connect, retrieve

    print(f"[1/4] training ({args.epochs} x {args.steps_per_epoch} steps) ...", flush=True)
    config = TrainConfig(
        dataset=args.dataset,
        output_dir=args.output,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        text_encoder=args.text_encoder,
        seed=args.seed,
    )
    result = run_training(config, verbose=2)
    print(f"Test retrieval ({result.data.test.protocol}, items unseen in training):")
    print(format_metrics_table(result.test_metrics))

    data = result.data
    test = data.test
    print(f"\n[2/4] indexing the test catalog into {args.export_base} (gallery: {len(test.gallery_ids)} "
          f"{'catalog' if test.gallery_images is not None else 'test'} images, `atl index` path) ...", flush=True)
    query_dir, gallery_dir = write_example_images(args.output, test, args.queries, args.seed)
    print(f"example query photos in {query_dir}/, gallery images in {gallery_dir}/ "
          "(for `atl query --image ... --grid out.png --gallery-dir ...`)")
    catalog_csv = write_catalog_csv(
        os.path.join(args.output, "test_catalog.csv"), gallery_dir, test.gallery_ids,
        [data.item_ids[int(label)] for label in test.index_labels],
        [data.descriptions[int(label)] for label in test.index_labels],
    )
    indexed = index_catalog(
        result.model, catalog_csv, args.export_base, portable_output_base=f"{args.export_base}-portable",
        k=10, extra_manifest={"source_model": result.model_path, "dataset": config.dataset},
    )
    exported = indexed.export
    recall = exported.manifest["recall"]
    print(f"version {exported.version} at {exported.path} (+ {exported.portable_path}): set recall@10 vs "
          f"exact {recall['set_recall']:.4f} (tie-aware {recall['tie_aware_recall']:.4f}); {indexed.counts}")
    index_larger_catalog(result.model, args.output, f"{args.export_base}-catalog", data, args.seed)

    print("\n[3/4] serving over gRPC (TF Serving API) ...", flush=True)
    model_name = os.path.basename(os.path.normpath(args.export_base))
    process, address = start_server(model_name, os.path.abspath(args.export_base))
    exit_code = None
    try:
        kind = "street photos" if test.protocol == "street->catalog" else "test images"
        print(f"server at {address}; querying with {args.queries} {kind} of unseen items")
        rng = np.random.default_rng(args.seed)
        picks = rng.choice(len(test.query_images), size=args.queries, replace=False)
        queries = [tf.io.encode_png(test.query_images[i]).numpy() for i in picks]
        results = retrieve(connect(address), model_name, queries, k=args.k, wait_for_ready=True)
        hits = 0
        for pick, neighbors in zip(picks, results):
            label = int(test.query_labels[pick])
            item = data.item_ids[label]
            print(f"\nquery: {kind[:-1]} of {item}: {data.descriptions[label]}")
            for rank, (result_id, score) in enumerate(zip(neighbors.ids, neighbors.scores), 1):
                same = result_id == item  # catalog exports answer with the row's item_id
                hits += same
                print(f"  {rank}. {result_id:<28} score {score:.4f} {'<- same item' if same else ''}")
        print(f"\n{hits}/{args.queries * args.k} served results above are the query's item")
        if test.gallery_images is not None:  # leave-one-out: each query is in the index
            served_top1 = []
            for start in range(0, len(test.query_images), 64):
                batch = [tf.io.encode_png(image).numpy() for image in test.query_images[start:start + 64]]
                served_top1 += [n.ids[0] for n in retrieve(connect(address), model_name, batch, k=1)]
            served_recall = float(np.mean(
                [i == data.item_ids[int(label)] for i, label in zip(served_top1, test.query_labels)]
            ))
            print(f"Recall@1 of the served model over all {len(served_top1)} queries: "
                  f"{served_recall:.4f} (offline evaluation: {result.test_metrics['recall_at_1']:.4f})")
    finally:
        print("\n[4/4] stopping the server (SIGTERM) ...", flush=True)
        exit_code = stop_server(process)
    print(f"server exited with code {exit_code}")
    return 0 if exit_code == 0 else 1


if __name__ == "__main__":
    # Quiet like `atl` (TensorFlow's C++ lines, ScaNN's Abseil lines); --verbose shows them.
    arguments, verbose = pop_verbose(sys.argv[1:])
    configure_logging(verbose)
    with contextlib.nullcontext() if verbose else filtered_native_stderr():
        code = main(arguments)
    sys.exit(code)

"""The main job, end to end: train -> export (SavedModel + ScaNN) -> serve over gRPC -> query.

    python tools/main_job.py [--output runs/main] [--export-base saved_models/fashion]
        [--epochs 3] [--steps-per-epoch 150] [--queries 5] [--k 5]

1. `atl train` on Fashion-MNIST with the adaptive triplet loss and the built-in USE
   encoder for the class descriptions; prints the retrieval table.
2. Exports the model with a ScaNN index over the test split as the next version of
   `--export-base` (and the portable variant for stock TF Serving).
3. Starts `python -m serving.server` on a free 127.0.0.1 port, queries it through TF
   Serving's gRPC API with held-out training images, prints the top-k per query.
4. Stops the server with SIGTERM (it drains and exits 0).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/main")
    parser.add_argument("--export-base", default="saved_models/fashion")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=150)
    parser.add_argument("--text-encoder", default="use-m3")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from atl_keras.data.fashion_mnist import load_fashion_mnist
    from atl_keras.export import export_model
    from atl_keras.metrics import format_metrics_table
    from atl_keras.train import TrainConfig, run_training
    from serving.client import connect, retrieve

    print(f"[1/4] training ({args.epochs} x {args.steps_per_epoch} steps) ...", flush=True)
    config = TrainConfig(
        output_dir=args.output,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        text_encoder=args.text_encoder,
        seed=args.seed,
    )
    result = run_training(config, verbose=2)
    print("Test retrieval (leave-one-out, Fashion-MNIST test split):")
    print(format_metrics_table(result.test_metrics))

    print(f"\n[2/4] exporting to {args.export_base} ...", flush=True)
    test = load_fashion_mnist("test")
    train = load_fashion_mnist("train")
    gallery_ids = [f"{test.class_names[int(label)]}/test-{i:05d}" for i, label in enumerate(test.labels)]
    held_out = train.images[-1000:]
    exported = export_model(
        result.model, test.images, gallery_ids, args.export_base,
        query_images=held_out, k=10, extra_manifest={"source_model": result.model_path},
    )
    export_model(
        result.model, test.images, gallery_ids, f"{args.export_base}-portable",
        exported.version, include_scann=False, force=True,
    )
    recall = exported.manifest["scann_recall_at_10"]
    print(f"version {exported.version} at {exported.path}: gallery {len(gallery_ids)}, "
          f"ScaNN recall@10 vs exact {recall:.4f}")

    print("\n[3/4] serving over gRPC (TF Serving API) ...", flush=True)
    model_name = os.path.basename(os.path.normpath(args.export_base))
    process, address = start_server(model_name, os.path.abspath(args.export_base))
    exit_code = None
    try:
        print(f"server at {address}; querying with {args.queries} held-out training images")
        rng = np.random.default_rng(args.seed)
        picks = rng.choice(1000, size=args.queries, replace=False)
        queries = [tf.io.encode_png(held_out[i]).numpy() for i in picks]
        query_labels = [train.class_names[int(train.labels[-1000 + i])] for i in picks]
        results = retrieve(connect(address), model_name, queries, k=args.k, wait_for_ready=True)
        hits = 0
        for label, neighbors in zip(query_labels, results):
            print(f"\nquery: a held-out {label!r}")
            for rank, (item, score) in enumerate(zip(neighbors.ids, neighbors.scores), 1):
                same = item.split("/")[0] == label
                hits += same
                print(f"  {rank}. {item:<28} score {score:.4f} {'(same class)' if same else ''}")
        print(f"\n{hits}/{args.queries * args.k} served results share the query's class")
    finally:
        print("\n[4/4] stopping the server (SIGTERM) ...", flush=True)
        exit_code = stop_server(process)
    print(f"server exited with code {exit_code}")
    return 0 if exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

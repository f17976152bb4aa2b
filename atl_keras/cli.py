"""`atl` command line: a thin layer over `atl_keras.train` that parses flags and prints.

    atl train --dataset fashion-mnist --loss atl --output runs/main
    atl evaluate --model runs/main/model.keras
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

def _train_defaults():
    from atl_keras.train import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    d = _train_defaults()
    p = subparsers.add_parser("train", help="train an embedding model and evaluate it")
    p.add_argument("--dataset", default=d["dataset"], help="fashion-mnist")
    p.add_argument(
        "--data-dir",
        default=os.environ.get("ATL_FASHION_MNIST_DIR"),
        help="directory with the dataset files (default: $ATL_FASHION_MNIST_DIR, "
        "then the Debian package dataset-fashion-mnist)",
    )
    p.add_argument("--output", dest="output_dir", default=d["output_dir"])
    p.add_argument("--loss", default=d["loss"], choices=["atl", "triplet"])
    p.add_argument("--mining", default=d["mining"], choices=["batch_all", "batch_hard", "semi_hard"])
    p.add_argument("--distance", default=d["distance"], choices=["squared_l2", "l2", "cosine"])
    p.add_argument("--margin", type=float, default=d["margin"], help="triplet loss margin")
    p.add_argument("--min-margin", type=float, default=d["min_margin"])
    p.add_argument("--max-margin", type=float, default=d["max_margin"])
    p.add_argument("--semantic-threshold", type=float, default=d["semantic_threshold"])
    p.add_argument(
        "--text-encoder",
        default=d["text_encoder"],
        help="use-m3 (built-in, offline), hashing, a local TF-Hub SavedModel dir or a URL",
    )
    p.add_argument("--text-cache-dir", default=d["text_cache_dir"])
    p.add_argument("--backbone", default=d["backbone"])
    p.add_argument("--embedding-dim", type=int, default=d["embedding_dim"])
    p.add_argument("--p", type=int, default=d["p"], help="labels per batch")
    p.add_argument("--k", type=int, default=d["k"], help="samples per label per batch")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--steps-per-epoch", type=int, default=d["steps_per_epoch"])
    p.add_argument("--learning-rate", type=float, default=d["learning_rate"])
    p.add_argument("--validation-size", type=int, default=d["validation_size"])
    p.add_argument("--test-size", type=int, default=d["test_size"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="retrieval metrics of a saved .keras model")
    p.add_argument("--model", required=True, help="path to model.keras")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--data-dir", default=os.environ.get("ATL_FASHION_MNIST_DIR"))
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    p.add_argument("--distance", default="squared_l2", choices=["squared_l2", "l2", "cosine"])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atl", description="Adaptive triplet loss: train, evaluate, export, serve."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from atl_keras.metrics import format_metrics_table
    from atl_keras.train import TrainConfig, run_training

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    print(f"atl train: {config.loss} loss ({config.mining}) on {config.dataset}, "
          f"text encoder {config.text_encoder}, output {config.output_dir}")
    result = run_training(config, verbose=0 if args.quiet else "auto")
    print(f"\nTest retrieval (leave-one-out on the {config.dataset} test split), "
          f"trained in {result.seconds:.0f} s:")
    print(format_metrics_table(result.test_metrics))
    print(f"\nModel: {result.model_path}\nMetrics: {os.path.join(result.output_dir, 'metrics.json')}"
          f"\nTensorBoard: tensorboard --logdir {os.path.join(result.output_dir, 'logs')}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from atl_keras.metrics import format_metrics_table
    from atl_keras.train import evaluate_saved_model

    metrics = evaluate_saved_model(
        args.model,
        dataset=args.dataset,
        split=args.split,
        data_dir=args.data_dir,
        distance=args.distance,
        limit=args.limit,
    )
    print(json.dumps(metrics, indent=2) if args.json else format_metrics_table(metrics))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"train": _cmd_train, "evaluate": _cmd_evaluate}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"atl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

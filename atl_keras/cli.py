"""`atl` command line: a thin layer over the library that parses flags and prints.

    atl train --dataset synthetic-shop --loss atl --output runs/main
    atl train --config run.yaml --epochs 5          # flags override the YAML file
    atl evaluate --model runs/main/model.keras --dataset synthetic-shop
    atl inspect-margins --dataset synthetic-shop --output runs/margins
    atl export --model runs/main/model.keras --output-base saved_models/shop
    atl serve --port 8500 --model_name shop --model_base_path saved_models/shop
    atl query --server localhost:8500 --model shop --image street.jpg --k 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DATASET_HELP = (
    "fashion-mnist | synthetic-shop | deepfashion-inshop:ROOT | catalog:PATH.csv|.jsonl"
)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help=DATASET_HELP)
    p.add_argument(
        "--data-dir",
        help="Fashion-MNIST IDX directory (default: $ATL_FASHION_MNIST_DIR, then the "
        "Debian package dataset-fashion-mnist)",
    )
    p.add_argument("--image-size", type=int, help="square image size for decoded files")
    p.add_argument("--synthetic-items", type=int, help="items of the synthetic shop")
    p.add_argument(
        "--unseen-classes",
        type=lambda text: tuple(x.strip() for x in text.split(",") if x.strip()),
        help="comma-separated classes/categories held out of training (unseen-class test)",
    )
    p.add_argument("--strict", action="store_true", default=argparse.SUPPRESS,
                   help="stop at a corrupt or missing image instead of skipping it")
    p.add_argument("--seed", type=int)


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an embedding model and evaluate it",
        argument_default=argparse.SUPPRESS,
        description="Flags override --config (YAML with TrainConfig field names), which "
        "overrides the defaults.",
    )
    p.add_argument("--config", dest="config_file", help="YAML file of TrainConfig fields")
    _add_data_arguments(p)
    p.add_argument("--output", dest="output_dir")
    p.add_argument("--loss", choices=["atl", "triplet"])
    p.add_argument("--mining", choices=["batch_all", "batch_hard", "semi_hard"])
    p.add_argument("--distance", choices=["squared_l2", "l2", "cosine"])
    p.add_argument("--margin", type=float, help="triplet loss margin")
    p.add_argument("--min-margin", type=float, help="ATL margin of identical descriptions")
    p.add_argument("--max-margin", type=float, help="ATL margin of opposite descriptions")
    p.add_argument("--semantic-threshold", type=float,
                   help="negatives whose description distance is below this are not negatives")
    p.add_argument("--missing-text-margin", type=float,
                   help="margin for pairs where an item has no description (default: midpoint)")
    p.add_argument("--text-encoder",
                   help="use-m3 (built-in, offline), hashing, a local TF-Hub SavedModel dir or a URL")
    p.add_argument("--text-cache-dir")
    p.add_argument("--backbone")
    p.add_argument("--embedding-dim", type=int)
    p.add_argument("--p", type=int, help="labels (items) per batch")
    p.add_argument("--k", type=int, help="images per label per batch")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--validation-size", type=int)
    p.add_argument("--test-size", type=int, help="evaluate on the first N test queries")
    p.add_argument("--strategy", choices=["auto", "one_device", "mirrored", "multi_worker", "tpu"],
                   help="tf.distribute strategy (auto: all GPUs if >= 2, else one device; "
                   "multi_worker reads TF_CONFIG); see docs/distributed.md")
    p.add_argument("--logical-cpus", type=int,
                   help="split the CPU into N logical devices first (test the mirrored path without GPUs)")
    p.add_argument("--tpu", help="TPU name or grpc:// address for --strategy tpu")
    p.add_argument("--no-cross-replica-mining", dest="cross_replica_mining", action="store_false",
                   help="mine triplets inside each replica's slice instead of the global batch")
    p.add_argument("--augment", action="store_true",
                   help="random flip, translation, zoom, brightness and contrast on training batches")
    p.add_argument("--mixed-precision", action="store_true",
                   help="mixed_float16 on GPUs (loss scaling), mixed_bfloat16 on CPUs/TPUs")
    p.add_argument("--save-freq", type=lambda v: v if v == "epoch" else int(v),
                   help="back up for resumption every N steps or 'epoch' (default)")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="skip TF op determinism (faster on GPUs; runs no longer bit-reproducible)")
    p.add_argument("--projector-size", type=int,
                   help="test gallery images in the TensorBoard projector export (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="retrieval metrics of a saved .keras model",
        argument_default=argparse.SUPPRESS,
        description="The dataset options default to the config.json that `atl train` wrote "
        "next to the model; flags override them.",
    )
    p.add_argument("--model", required=True, help="path to model.keras")
    _add_data_arguments(p)
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N queries")
    p.add_argument("--distance", choices=["squared_l2", "l2", "cosine"])
    p.add_argument("--json", action="store_true", default=False, help="print JSON")


def _add_inspect_margins_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect-margins",
        help="distribution of description distances and the margins they give (PNG + text)",
        argument_default=argparse.SUPPRESS,
    )
    _add_data_arguments(p)
    p.add_argument("--text-encoder")
    p.add_argument("--text-cache-dir")
    p.add_argument("--min-margin", type=float)
    p.add_argument("--max-margin", type=float)
    p.add_argument("--semantic-threshold", type=float)
    p.add_argument("--distance", choices=["squared_l2", "l2", "cosine"])
    p.add_argument("--output", dest="output_dir", default="runs/margins")
    p.add_argument("--examples", type=int, default=5, help="items whose nearest descriptions are listed")


#: Commands whose flags belong to another entry point: `atl NAME ...` runs `module.main(...)`.
PASSTHROUGH = {
    "export": ("atl_keras.export_cli", "SavedModel + ScaNN index as saved_models/NAME/N (atl export -h)"),
    "serve": ("serving.server", "gRPC server speaking TF Serving's API (atl serve -h)"),
    "query": ("serving.client", "query a served model with images (atl query -h)"),
    "replicate": ("atl_keras.replicate_cli", "triplet baselines vs ATL over seeds, report in results/ (atl replicate -h)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atl", description="Adaptive triplet loss: train, evaluate, export, serve, query, replicate."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_inspect_margins_parser(subparsers)
    for name, (_, help_text) in PASSTHROUGH.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _data_dir_from_environment(values: dict[str, Any]) -> None:
    """`--data-dir` defaults to $ATL_FASHION_MNIST_DIR (the library reads no env vars)."""
    if "data_dir" not in values and os.environ.get("ATL_FASHION_MNIST_DIR"):
        values["data_dir"] = os.environ["ATL_FASHION_MNIST_DIR"]


def _train_config(values: dict[str, Any]):
    """TrainConfig from defaults < YAML config file < explicit flags."""
    from atl_keras.run_config import train_config_from
    from atl_keras.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    merged: dict[str, Any] = {}
    config_file = values.pop("config_file", None)
    if config_file:
        import yaml

        if not os.path.exists(config_file):
            raise FileNotFoundError(f"No config file at {config_file!r}.")
        with open(config_file, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file} must hold a mapping of TrainConfig fields.")
        unknown = sorted(set(loaded) - fields)
        if unknown:
            raise ValueError(
                f"{config_file}: unknown keys {unknown}; valid keys: {sorted(fields)}."
            )
        merged.update(loaded)
    _data_dir_from_environment(values)
    merged.update(values)
    return train_config_from(merged)


def _cmd_train(args: argparse.Namespace) -> int:
    from atl_keras.metrics import format_metrics_table
    from atl_keras.train import run_training

    values = vars(args)
    quiet = values.pop("quiet", False)
    config = _train_config(values)
    print(f"atl train: {config.loss} loss ({config.mining}) on {config.dataset}, "
          f"text encoder {config.text_encoder}, output {config.output_dir}", flush=True)
    result = run_training(config, verbose=0 if quiet else "auto")
    protocol = result.data.test.protocol if result.data else "test"
    print(f"\nTest retrieval ({protocol}, items unseen in training) on {config.dataset}, "
          f"trained in {result.seconds:.0f} s:")
    print(format_metrics_table(result.test_metrics))
    print(f"\nModel: {result.model_path}\nMetrics: {os.path.join(result.output_dir, 'metrics.json')}"
          f"\nTensorBoard: tensorboard --logdir {os.path.join(result.output_dir, 'logs')}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from atl_keras.metrics import format_metrics_table
    from atl_keras.run_config import load_run_config
    from atl_keras.train import evaluate_saved_model

    values = vars(args)
    model_path, split, limit, as_json = (
        values.pop("model"), values.pop("split"), values.pop("limit"), values.pop("json")
    )
    _data_dir_from_environment(values)
    config = load_run_config(model_path, values)
    metrics, protocol = evaluate_saved_model(model_path, config, split=split, limit=limit)
    if as_json:
        print(json.dumps({"protocol": protocol, **metrics}, indent=2))
    else:
        print(f"{config.dataset} {split} ({protocol}):")
        print(format_metrics_table(metrics))
    return 0


def _cmd_inspect_margins(args: argparse.Namespace) -> int:
    from atl_keras.margins import inspect_margins

    values = vars(args)
    output_dir, examples = values.pop("output_dir"), values.pop("examples")
    config = _train_config(values)
    report = inspect_margins(config, output_dir=output_dir, examples=examples)
    print(report.text)
    print(f"\nPlot: {report.plot_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        module = importlib.import_module(PASSTHROUGH[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    commands = {
        "train": _cmd_train,
        "evaluate": _cmd_evaluate,
        "inspect-margins": _cmd_inspect_margins,
    }
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, ConnectionError) as error:
        print(f"atl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

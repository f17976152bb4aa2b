"""`atl evaluate`: retrieval metrics of a saved .keras model."""

from __future__ import annotations

import argparse
import json

from atl_keras.cli.common import add_data_arguments, data_dir_from_environment


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="retrieval metrics of a saved .keras model",
        argument_default=argparse.SUPPRESS,
        description="The dataset options default to the config.json that `atl train` wrote "
        "next to the model; flags override them.",
    )
    p.add_argument("--model", required=True, help="path to model.keras")
    add_data_arguments(p)
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N queries")
    p.add_argument("--distance", choices=["squared_l2", "l2", "cosine"])
    p.add_argument("--json", action="store_true", default=False, help="print JSON")


def run(args: argparse.Namespace) -> int:
    from atl_keras.metrics import format_metrics_table
    from atl_keras.cli.config import load_run_config
    from atl_keras.train import evaluate_saved_model

    values = vars(args)
    model_path, split, limit, as_json = (
        values.pop("model"), values.pop("split"), values.pop("limit"), values.pop("json")
    )
    data_dir_from_environment(values)
    config = load_run_config(model_path, values)
    metrics, protocol = evaluate_saved_model(model_path, config, split=split, limit=limit)
    if as_json:
        print(json.dumps({"protocol": protocol, **metrics}, indent=2))
    else:
        print(f"{config.dataset} {split} ({protocol}):")
        print(format_metrics_table(metrics))
    return 0

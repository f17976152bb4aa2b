"""`atl inspect-margins`: how description distances spread, and the margins they give."""

from __future__ import annotations

import argparse

from atl_keras.cli.common import add_data_arguments, show_train_config_defaults, train_config
from atl_keras.cli.environment import apply_home


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect-margins",
        help="distribution of description distances and the margins they give (PNG + text)",
        argument_default=argparse.SUPPRESS,
    )
    add_data_arguments(p)
    p.add_argument("--text-encoder")
    p.add_argument("--text-cache-dir")
    p.add_argument("--min-margin", type=float)
    p.add_argument("--max-margin", type=float)
    p.add_argument("--semantic-threshold", type=float)
    p.add_argument("--distance", choices=["squared_l2", "l2", "cosine"])
    p.add_argument("--output", dest="output_dir", default="runs/margins", help="default: runs/margins")
    p.add_argument("--examples", type=int, default=5, help="items whose nearest descriptions are listed (default: 5)")
    show_train_config_defaults(p)


def run(args: argparse.Namespace) -> int:
    from atl_keras.margins.report import inspect_margins
    from atl_keras.train import load_data

    values = vars(args)
    output_dir, examples = values.pop("output_dir"), values.pop("examples")
    config = apply_home(train_config(values), "inspect-margins")
    report = inspect_margins(config, load_data(config), output_dir=output_dir, examples=examples)
    print(report.text)
    print(f"\nPlot: {report.plot_path}")
    return 0

"""`atl` command line: a thin layer over the library that parses flags and prints.

    atl train --dataset synthetic-shop --loss atl --output runs/main
    atl train --config run.yaml --epochs 5          # flags override the YAML file
    atl evaluate --model runs/main/model.keras --dataset synthetic-shop
    atl inspect-margins --dataset synthetic-shop --output runs/margins
    atl shards --dataset catalog:shop.csv --output data/shop-shards   # then --dataset shards:data/shop-shards
    atl export --model runs/main/model.keras --output-base saved_models/shop
    atl embed --catalog products.csv --model saved_models/shop --output embeddings/ [--runner ...]
    atl serve --port 8500 --model_name shop --model_base_path saved_models/shop
    atl query --server localhost:8500 --model shop --image street.jpg --k 10
    atl calibrate --index saved_models/shop/1 --queries labelled.csv --output calibration.json
    atl dedupe --index saved_models/shop/1 --threshold calibration.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Sequence

from atl_keras.cli import evaluate, inspect_margins, shards, train
from atl_keras.cli.common import train_config as _train_config  # noqa: F401  (tests use it)
from atl_keras.cli.environment import configure_logging, pop_verbose
from atl_keras.cli.native_logs import filtered_native_stderr

#: Subcommands parsed here: name -> module with add_parser(subparsers) and run(args).
COMMANDS = {"train": train, "evaluate": evaluate, "inspect-margins": inspect_margins, "shards": shards}

#: Commands whose flags belong to another entry point: `atl NAME ...` runs `module.main(...)`.
PASSTHROUGH = {
    "export": ("atl_keras.cli.export", "SavedModel + ScaNN index as saved_models/NAME/N (atl export -h)"),
    "embed": ("atl_keras.cli.embed", "embed a catalog with an exported model on Apache Beam (atl embed -h)"),
    "index": ("atl_keras.cli.index", "index a product catalog with a trained model as saved_models/NAME/N (atl index -h)"),
    "serve": ("atl_keras.serving.server", "gRPC server speaking TF Serving's API (atl serve -h)"),
    "query": ("atl_keras.serving.client", "query a served model with images (atl query -h)"),
    "calibrate": ("atl_keras.cli.calibrate", "the match threshold of an index from labelled query photos (atl calibrate -h)"),
    "dedupe": ("atl_keras.cli.dedupe", "near-duplicate groups of a catalog index at a match threshold (atl dedupe -h)"),
    "replicate": ("atl_keras.cli.replicate", "triplet baselines vs ATL over seeds, report in results/ (atl replicate -h)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atl", description="Adaptive triplet loss: train, evaluate, export, serve, query, replicate."
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's and Keras' log lines (quiet by default; may stand anywhere)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(subparsers)
    for name, (_, help_text) in PASSTHROUGH.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


#: Errors that mean "the command was given something wrong": exit code 2, one line.
USAGE_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                FileExistsError, RuntimeError, ConnectionError)


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """Library warnings print as ``atl <command>: warning: <message>`` (no file:line, no source)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"atl {command}: warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    argv, verbose = pop_verbose(list(sys.argv[1:] if argv is None else argv))
    configure_logging(verbose)  # before anything imports TensorFlow
    # ScaNN's and gRPC's Abseil INFO/WARNING lines ignore TF_CPP_MIN_LOG_LEVEL.
    with contextlib.nullcontext() if verbose else filtered_native_stderr():
        return _run(argv)


def _run(argv: list[str]) -> int:
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        try:
            module = importlib.import_module(PASSTHROUGH[argv[0]][0])
            with _warnings_as_lines(argv[0]):
                return int(module.main(argv[1:]) or 0)
        except KeyboardInterrupt:
            print(f"atl {argv[0]}: interrupted.", file=sys.stderr)
            return 130
    args = build_parser().parse_args(argv)
    with _warnings_as_lines(args.command):
        try:
            return COMMANDS[args.command].run(args)
        except KeyboardInterrupt:
            print(f"atl {args.command}: interrupted.", file=sys.stderr)
            return 130
        except USAGE_ERRORS as error:
            print(f"atl {args.command}: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # the disk is full, not writable, ...: not the user's input
            print(f"atl {args.command}: error: {error}", file=sys.stderr)
            return 1

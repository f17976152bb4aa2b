"""Flags and helpers shared by several `atl` subcommands."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from typing import Any

DATASET_HELP = (
    "fashion-mnist | synthetic-shop | deepfashion-inshop:ROOT | catalog:PATH.csv|.jsonl | "
    "shards:DIR (written by `atl shards`)"
)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help=DATASET_HELP)
    p.add_argument(
        "--data-dir",
        help="Fashion-MNIST IDX directory (default: $ATL_FASHION_MNIST_DIR, then the "
        "Debian package dataset-fashion-mnist)",
    )
    p.add_argument("--image-size", type=int, help="square image size for decoded files")
    p.add_argument("--synthetic-items", type=int, help="items (listings) of the synthetic shop")
    p.add_argument("--synthetic-variants", type=float, metavar="FRACTION",
                   help="share of the synthetic shop's designs listed 2-3 times under different item ids "
                   "(re-listings, colour variants): the weak-label testbed (default 0)")
    p.add_argument("--synthetic-street-views", type=int, help="street photos (test queries) per synthetic item")
    p.add_argument(
        "--unseen-classes",
        type=lambda text: tuple(x.strip() for x in text.split(",") if x.strip()),
        help="comma-separated classes/categories held out of training (unseen-class test)",
    )
    p.add_argument("--strict", action="store_true", default=argparse.SUPPRESS,
                   help="stop at a corrupt or missing image instead of skipping it")
    p.add_argument("--no-stream", dest="stream", action="store_false", default=argparse.SUPPRESS,
                   help="decode the training images of catalog:/deepfashion-inshop:/shards: data into memory "
                   "instead of reading them per step (the default streams: memory holds an index, not pixels)")
    p.add_argument("--seed", type=int)


def data_dir_from_environment(values: dict[str, Any]) -> None:
    """`--data-dir` defaults to $ATL_FASHION_MNIST_DIR (the library reads no env vars)."""
    if "data_dir" not in values and os.environ.get("ATL_FASHION_MNIST_DIR"):
        values["data_dir"] = os.environ["ATL_FASHION_MNIST_DIR"]


def train_config(values: dict[str, Any]):
    """TrainConfig from defaults < YAML config file < explicit flags."""
    from atl_keras.cli.config import train_config_from
    from atl_keras.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    merged: dict[str, Any] = {}
    config_file = values.pop("config_file", None)
    if config_file:
        import yaml

        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"No config file at {config_file!r}.")
        with open(config_file, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(error, "problem", None) or str(error).splitlines()[0]
                raise ValueError(f"{config_file} is not valid YAML: {problem}{where}.") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file} must hold a mapping of TrainConfig fields.")
        unknown = sorted(set(loaded) - fields)
        if unknown:
            raise ValueError(
                f"{config_file}: unknown keys {unknown}; valid keys: {sorted(fields)}."
            )
        merged.update(loaded)
    data_dir_from_environment(values)
    merged.update(values)
    try:
        return train_config_from(merged)
    except ValueError as error:
        from_file = [k for k in merged if config_file and k not in values]
        if any(str(error).startswith((k, f"Unknown {k} ")) for k in from_file):
            raise ValueError(f"{config_file}: {error}") from None
        raise


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type of ``--ks 1,10,20``: comma-separated integers >= 1."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 (e.g. 1,10,20), got {text!r}")
    return values


def save_freq(text: str) -> int | str:
    """argparse type of ``--save-freq``: ``epoch`` or a number of steps >= 1."""
    if text == "epoch":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 'epoch' or a number of steps >= 1, got {text!r}")


def train_config_defaults() -> dict[str, Any]:
    """TrainConfig's field defaults, read from the source of `atl_keras.train` (so `-h` does
    not import TensorFlow); tests/test_cli.py checks them against the class."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec("atl_keras.train").origin
    with open(origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    (config,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig"]
    return {
        node.target.id: ast.literal_eval(node.value)
        for node in config.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None
    }


#: `-h` defaults of TrainConfig fields whose default depends on the dataset (None in TrainConfig).
DATASET_DEFAULTS = {
    "p": "16; 10 on fashion-mnist",
    "k": "4; 12 on fashion-mnist",
    "image_size": "64 for image files; the synthetic shop is rendered at 32, Fashion-MNIST is 28",
    "test_size": "every test query",
    "semantic_threshold": "none: every other item is a negative",
    "weights": "random",
    "text_encoder_dir": "$ATL_HOME/text_encoders",
    "text_cache_dir": "$ATL_HOME/text_encoders/cache ($ATL_HOME: ~/.cache/atl-keras)",
}


def show_train_config_defaults(parser: argparse.ArgumentParser) -> None:
    """Append TrainConfig's default to the help of every flag that sets a TrainConfig field
    (these parsers use argparse.SUPPRESS, so argparse cannot show them), unless the help
    already names its default."""
    defaults = {**train_config_defaults(), **DATASET_DEFAULTS}
    for action in parser._actions:
        if not action.option_strings or action.dest not in defaults or action.nargs == 0:
            continue
        if "default" in (action.help or ""):
            continue
        value = defaults[action.dest]
        if value is None:
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value) or "none"
        action.help = f"{action.help} (default: {value})" if action.help else f"(default: {value})"


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`-h` shows ``(default: X)`` after every option with a real default (not None, "" or a
    switch) whose help does not name its default already; descriptions keep their layout."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return bool(action.option_strings) and action.nargs != 0 and not isinstance(action.default, bool) \
            and action.default not in (None, "", argparse.SUPPRESS)

    def add_argument(self, action: argparse.Action) -> None:
        if not action.help and self._shows_default(action):  # argparse skips options without help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def load_trained_model(path: str):
    """A model `atl train` saved (.keras), with atl_keras' losses and layers registered."""
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"No model at {path!r}; train one with `atl train`.")
    import keras

    import atl_keras.model  # noqa: F401  (registers ATLModel)
    from atl_keras.losses.registry import import_losses

    import_losses()  # registers the losses
    return keras.models.load_model(path)

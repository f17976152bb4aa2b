"""What the `atl` command reads from its environment (the library reads none of it).

- Logging: TensorFlow's C++ log level is fixed when TensorFlow loads, so `configure_logging`
  runs before anything imports it. Quiet by default; ``atl --verbose ...`` brings every
  TensorFlow / Keras log line back.
- ``$ATL_HOME``: where text encoders (the built-in ``use-m3``, ~80 MB) and their description
  caches live (`atl_keras.home`). Default ``~/.cache/atl-keras`` (``$XDG_CACHE_HOME/atl-keras``),
  never the current directory; ``make`` sets it to the checkout's ``saved_models/``.
- ``$ATL_ALLOW_DOWNLOAD=1``: the same as ``--allow-download`` (``--weights imagenet`` may let
  Keras download the ImageNet weights into its cache).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

VERBOSE_FLAG = "--verbose"


def configure_logging(verbose: bool) -> None:
    """Quiet TensorFlow and Keras unless `verbose` (call before TensorFlow is imported).

    Quiet: ``TF_CPP_MIN_LOG_LEVEL=3`` hides TensorFlow's C++ INFO/WARNING/ERROR lines
    (CPU feature notes, "failed call to cuInit" on machines without a GPU, type-inference
    notes); TensorFlow still raises its errors as Python exceptions with their message.
    A value the user already set in the environment wins.
    """
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # absl "WARNING:tensorflow:" lines


def pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``--verbose`` may stand anywhere on the command line; remove it, say if it was there."""
    verbose = VERBOSE_FLAG in argv
    return [a for a in argv if a != VERBOSE_FLAG], verbose


def apply_home(config, command: str):
    """`config` with the text encoder and cache directories it leaves at ``None`` (no flag, no
    YAML value) set under the ATL home (`atl_keras.home`); prints where that is."""
    from atl_keras.home import atl_home, with_home_dirs

    home, why = atl_home()
    resolved = with_home_dirs(config, home)
    if resolved is not config:
        print(f"atl {command}: text encoders and caches in {home} ({why})", flush=True)
    return resolved


def truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def add_weight_arguments(p: argparse.ArgumentParser) -> None:
    """--weights / --pooling / --allow-download (argparse.SUPPRESS defaults: TrainConfig's win)."""
    p.add_argument("--weights",
                   help="backbone initialisation: imagenet (Keras' cache; see --allow-download) "
                   "or a local .weights.h5 / no-top .h5 file (default: random)")
    p.add_argument("--pooling", choices=["avg", "max", "gem"], help="feature-map pooling (default avg)")
    p.add_argument("--allow-download", action="store_true", default=argparse.SUPPRESS,
                   help="--weights imagenet may download the weights into Keras' cache when they "
                   "are not there (also: ATL_ALLOW_DOWNLOAD=1); default: fail fast offline")


def apply_allow_download(values: dict[str, Any]) -> None:
    """``$ATL_ALLOW_DOWNLOAD`` is `--allow-download`."""
    if "allow_download" not in values and truthy(os.environ.get("ATL_ALLOW_DOWNLOAD")):
        values["allow_download"] = True

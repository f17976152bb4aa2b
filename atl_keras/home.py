"""The ATL home: where text encoders and description caches live when no directory is given.

``$ATL_HOME`` if set, else ``$XDG_CACHE_HOME/atl-keras``, else ``~/.cache/atl-keras``; never
the current directory. Only the entry points read it (the `atl` command, and
`load_text_encoder` / `run_training` when their directory argument is ``None``); every
function below them takes its directories as parameters.

    >>> from atl_keras.home import atl_home
    >>> atl_home({"ATL_HOME": "/data/atl"})
    ('/data/atl', '$ATL_HOME')
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

#: Sub-directory of the home holding text encoders (``use-m3/``) and ``cache/``.
TEXT_ENCODERS = "text_encoders"


def atl_home(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(absolute home directory, why that one) from `environ` (default: ``os.environ``)."""
    environ = os.environ if environ is None else environ
    if environ.get("ATL_HOME"):
        return os.path.abspath(os.path.expanduser(environ["ATL_HOME"])), "$ATL_HOME"
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(cache, "atl-keras")), "the default; set ATL_HOME to move it"


def text_encoder_dir(home: str | None = None) -> str:
    """``<home>/text_encoders``: where ``use-m3`` is built on first use."""
    return os.path.join(atl_home()[0] if home is None else home, TEXT_ENCODERS)


def text_cache_dir(home: str | None = None) -> str:
    """``<home>/text_encoders/cache``: description-embedding caches (``.npz`` per encoder)."""
    return os.path.join(text_encoder_dir(home), "cache")


def with_home_dirs(config: Any, home: str | None = None) -> Any:
    """`config` (a dataclass with ``text_encoder_dir`` and/or ``text_cache_dir`` fields) with
    those left at ``None`` set under `home` (default: :func:`atl_home`); others unchanged."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    if "text_encoder_dir" in fields and config.text_encoder_dir is None:
        changes["text_encoder_dir"] = text_encoder_dir(home)
    if "text_cache_dir" in fields and config.text_cache_dir is None:
        changes["text_cache_dir"] = text_cache_dir(home)
    return dataclasses.replace(config, **changes) if changes else config

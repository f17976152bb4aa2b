"""Serving for atl exports: a gRPC server speaking TF Serving's API, and its client.

- :mod:`serving.server`: ``ModelServer``, ``ServerConfig`` (``python -m serving.server``).
- :mod:`serving.client`: ``retrieve``, ``embed``, ``predict`` (``python -m serving.client``).
- :mod:`serving.model_config`: ``models.config`` parsing, version policies.

Importing this package is cheap; TensorFlow is imported by the submodules.
"""

from __future__ import annotations

from serving.model_config import (
    ServedModel,
    TLSConfig,
    VersionPolicy,
    list_version_dirs,
    load_model_config_file,
    parse_model_config,
    single_model,
)

__all__ = [
    "ModelServer",
    "ServerConfig",
    "ServedModel",
    "TLSConfig",
    "VersionPolicy",
    "list_version_dirs",
    "load_model_config_file",
    "parse_model_config",
    "single_model",
]


def __getattr__(name: str):
    if name in ("ModelServer", "ServerConfig"):
        from serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")

"""Serving for atl exports: a model server speaking TF Serving's API, and its client.

Laid out as TF Serving is:

- :mod:`~atl_keras.serving.model_config`: ``models.config``, version policies, TLS flags.
- :mod:`~atl_keras.serving.loader`: one loaded SavedModel version and its signatures.
- :mod:`~atl_keras.serving.manager`: ``ModelManager`` (poll, load, swap, unload versions).
- :mod:`~atl_keras.serving.requests`: validate Predict inputs, run a signature.
- :mod:`~atl_keras.serving.servicers`: the gRPC ``PredictionService`` / ``ModelService``.
- :mod:`~atl_keras.serving.server`: ``ModelServer``, ``ServerConfig``, flags (``atl serve``).
- :mod:`~atl_keras.serving.client`: ``retrieve``, ``embed``, ``predict`` (``atl query``).

``ModelServer`` and ``ServerConfig`` are imported lazily (they pull in TensorFlow).
"""

from __future__ import annotations

from atl_keras._optional import require_extra

require_extra("serving", "atl_keras.serving (gRPC server and client)")

from atl_keras.serving.model_config import (
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
        from atl_keras.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'atl_keras.serving' has no attribute {name!r}")

"""Checkout shim: the server lives in :mod:`atl_keras.serving` (``atl serve``).

    python -m serving.server --port 8500 --model_name atl --model_base_path saved_models/atl
"""

import sys

from atl_keras.serving.errors import RequestError, invalid_argument, not_found  # noqa: F401
from atl_keras.serving.loader import LoadedVersion, SignatureInfo, read_signature_defs, signature_info  # noqa: F401
from atl_keras.serving.manager import ModelManager, State  # noqa: F401
from atl_keras.serving.requests import prepare_inputs, run_signature  # noqa: F401
from atl_keras.serving.servicers import DEFAULT_SIGNATURE, ModelServicer, PredictionServicer  # noqa: F401
from atl_keras.serving.server import ModelServer, ServerConfig, build_arg_parser, config_from_args, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

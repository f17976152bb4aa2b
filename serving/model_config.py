"""Checkout shim: ``models.config`` parsing lives in :mod:`atl_keras.serving.model_config`."""

from atl_keras.serving.model_config import *  # noqa: F401,F403

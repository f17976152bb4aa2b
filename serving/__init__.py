"""Checkout shims for :mod:`atl_keras.serving` (the code ships inside the atl_keras package).

This folder holds the deployment files (``README.md``, ``models.config``,
``docker-compose.yml``) and keeps ``python -m serving.server`` / ``python -m
serving.client`` working from a checkout; import from ``atl_keras.serving`` in new code.
"""

from atl_keras.serving import *  # noqa: F401,F403
from atl_keras.serving import __all__, __getattr__  # noqa: F401

"""Checkout shim: the client lives in :mod:`atl_keras.serving.client` (``atl query``).

    python -m serving.client --server localhost:8500 --model atl --image q.jpg --k 10
"""

import sys

from atl_keras.serving.client import *  # noqa: F401,F403
from atl_keras.serving.client import main

if __name__ == "__main__":
    sys.exit(main())

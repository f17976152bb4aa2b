"""Reproduce the paper's claim (ATL vs the triplet baseline) and publish the results.

    python tools/replicate.py --quick                         # CI-sized, < 2 min, hashing encoder
    python tools/replicate.py --seeds 5 --ablations           # the published replication (~80 min, 2 cores)

The same as `atl replicate`; the implementation is `atl_keras.cli.replicate`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atl_keras.cli.replicate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python tools/replicate.py"))

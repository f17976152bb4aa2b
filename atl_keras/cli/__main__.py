"""`python -m atl_keras.cli` is `atl`."""

import sys

from atl_keras.cli import main

sys.exit(main())

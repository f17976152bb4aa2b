"""Export a trained model with a ScaNN gallery index as saved_models/NAME/VERSION.

    python tools/export.py --model runs/main/model.keras --output-base saved_models/shop

The same as `atl export`; the implementation is `atl_keras.cli.export`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atl_keras.cli.export import build_parser, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Build the offline Universal Sentence Encoder multilingual v3 (TF-Hub-format SavedModel).

    .venv/bin/python tools/build_text_encoder.py [--output saved_models/text_encoders/use-m3] [--force]

Thin CLI over ``atl_keras.text_use.build_use_m3``; idempotent (skips a valid build).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atl_keras.text_use import build_use_m3, is_valid_use_m3  # noqa: E402

DEFAULT_OUTPUT = Path("saved_models/text_encoders/use-m3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"target directory (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid build exists")
    args = parser.parse_args(argv)

    if is_valid_use_m3(args.output) and not args.force:
        print(f"use-m3 already built at {args.output} (use --force to rebuild)")
        return 0
    start = time.perf_counter()
    try:
        path = build_use_m3(args.output, force=args.force)
    except (ImportError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"built use-m3 at {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

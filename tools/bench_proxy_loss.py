"""Alias: the proxy-loss rows of tools/bench_loss.py (``bench_loss.py --proxy --skip-default``).

    python tools/bench_proxy_loss.py [--batch-sizes 256 1024 4096] [--classes 1000 10000]
        [--repeats 7] [--output results/bench_proxy_loss.json]

One implementation: the contenders, timing and table are `tools/bench_loss.py`'s ``--proxy``.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

BENCH_LOSS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_loss.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default=["256", "1024", "4096"], nargs="+")
    parser.add_argument("--classes", default=["1000", "10000"], nargs="+")
    parser.add_argument("--repeats", default="7")
    parser.add_argument("--output", default="results/bench_proxy_loss.json")
    args = parser.parse_args(argv)
    sys.argv = [BENCH_LOSS, "--proxy", "--skip-default", "--proxy-batch-sizes", *args.batch_sizes,
                "--proxy-classes", *args.classes, "--repeats", args.repeats, "--output", args.output]
    try:
        runpy.run_path(BENCH_LOSS, run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

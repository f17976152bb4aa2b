"""`atl dedupe`: near-duplicate groups of a catalog index at a calibrated match threshold.

    atl dedupe --index saved_models/shop/3 [--threshold 0.93 | --threshold calibration.json] \
        [--k 10] [--output duplicates.json]

Two catalog images are near-duplicates when one is among the other's ``--k`` nearest and
their score reaches the threshold (default: the one the index was published or saved
with); groups are the connected sets of such pairs. Prints one group per line (image ids,
item ids) and writes them as JSON. A thin CLI over `RetrievalIndex.duplicate_groups`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from atl_keras.cli.common import DefaultsHelpFormatter  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atl dedupe", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--index", required=True, help="an export version (saved_models/NAME/N) or a saved index")
    p.add_argument("--threshold", dest="match_threshold", default=None,
                   help="a score or a calibration JSON (default: the index's own match threshold)")
    p.add_argument("--k", type=int, default=10, help="neighbours looked at per image")
    p.add_argument("--output", default=None, help="write the groups here (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from atl_keras.cli.index import match_threshold
        from atl_keras.search import RetrievalIndex

        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}.")
        threshold = match_threshold(args)
        index = RetrievalIndex.load(args.index)
        if threshold is None and index.threshold is None:
            raise ValueError(f"{args.index} has no match threshold: pass --threshold (a score or the JSON "
                             "`atl calibrate` wrote).")
        groups = index.duplicate_groups(threshold, k=args.k)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"atl dedupe: error: {error}", file=sys.stderr)
        return 2
    named = [{"image_ids": [index.image_ids[r] for r in group], "item_ids": [index.ids[r] for r in group]}
             for group in groups]
    used = threshold if threshold is not None else index.threshold
    print(f"{len(groups)} near-duplicate groups ({sum(len(g) for g in groups)} of {len(index)} images) "
          f"at threshold {used:.6f}")
    for group in named:
        print("  " + "  ".join(f"{image} ({item})" for image, item in zip(group["image_ids"], group["item_ids"])))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"threshold": used, "groups": named}, f, indent=2)
        print(f"groups written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`atl calibrate`: the match threshold of an index, from a labelled query set.

    atl calibrate --index saved_models/shop/3 --queries labelled.csv --target-precision 0.95 \
        --output calibration.json [--plot calibration.png]
    atl index ... --match-threshold calibration.json      # publish it with the next version

``--queries``: a CSV (or JSONL) with ``image`` (a path, relative to the file) and ``item_id``
(the product the photo shows; empty = a product not in the catalog). ``--index``: an export
version (its own model embeds the photos) or a directory `RetrievalIndex.save` wrote
(``--model`` then embeds them; ``--save`` stores the threshold in it). A thin CLI over
`atl_keras.search.RetrievalIndex.calibrate`; prints the threshold, precision and recall.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from atl_keras.cli.common import DefaultsHelpFormatter  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atl calibrate", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--index", required=True, help="an export version (saved_models/NAME/N) or a saved index")
    p.add_argument("--queries", required=True, help="labelled query photos: CSV/JSONL with image, item_id")
    p.add_argument("--model", default=None, help="model (.keras) that embeds the photos (default: the export's)")
    p.add_argument("--target-precision", type=float, default=0.95)
    p.add_argument("--confidence", type=float, default=0.95,
                   help="the precision's lower confidence bound must reach the target (0 = the point estimate)")
    p.add_argument("--output", default="calibration.json", help="where the threshold and curve go (JSON)")
    p.add_argument("--plot", default=None, help="also draw precision / recall against the threshold (PNG)")
    p.add_argument("--save", action="store_true", help="store the threshold in the saved index (not an export)")
    return p


def read_labelled(path: str) -> tuple[list[str], list[str | None]]:
    """``(image paths, expected item ids or None)`` of a labelled query file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No labelled query file at {path!r}.")
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", newline="") as f:
        if path.lower().endswith((".jsonl", ".json")):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = list(csv.DictReader(f))
    if not records or "image" not in records[0]:
        raise ValueError(f"{path}: needs rows with an `image` column (and `item_id`, empty when not in the catalog).")
    images = [r["image"] if os.path.isabs(r["image"]) else os.path.join(root, r["image"]) for r in records]
    expected = [str(r["item_id"]).strip() or None if r.get("item_id") not in (None, "") else None for r in records]
    return images, expected


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        images, expected = read_labelled(args.queries)
        from atl_keras.cli.common import load_trained_model
        from atl_keras.search import RetrievalIndex

        model = load_trained_model(args.model) if args.model else None
        index = RetrievalIndex.load(args.index, model=model)
        calibration = index.calibrate(images, expected, args.target_precision, args.confidence or None)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"atl calibrate: error: {error}", file=sys.stderr)
        return 2
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(calibration.to_dict(), f, indent=2)
    in_gallery = calibration.num_in_gallery
    print(f"{calibration.num_queries} queries ({in_gallery} of catalog products, "
          f"{calibration.num_queries - in_gallery} not in the catalog)")
    if calibration.threshold is None:
        print(f"no threshold reaches precision {args.target_precision} on these queries "
              f"(best precision {max(calibration.curve_precision):.3f}); curve in {args.output}")
    else:
        print(f"match threshold {calibration.threshold:.6f}: precision {calibration.precision:.4f}, "
              f"recall {calibration.recall:.4f} -> {args.output}")
        if args.save:
            index.save(args.index)
            print(f"threshold saved in {args.index}")
        else:
            print(f"publish it: atl index ... --match-threshold {args.output}")
    if args.plot:
        from atl_keras.search.pictures import plot_precision_recall

        plot_precision_recall(args.plot, calibration)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

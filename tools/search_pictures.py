"""The README's "Search from Python" pictures, made by the library: a neighbour grid and a calibration curve.

    python tools/search_pictures.py --model runs/main/model.keras --output docs/

A synthetic shop (`make_synthetic_shop`, items the model never saw) is indexed with
`RetrievalIndex(model).add(...)` from the catalog photos of half of its items; street photos
of every item are the queries (the other half's products are not in the gallery). The match
threshold is calibrated on half of the street photos and checked on the other half; the grid
shows four fresh queries with their top 5 (green: the right item, red: another). Prints the
numbers, the machine's load and the commit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/main/model.keras")
    p.add_argument("--output", default="docs")
    p.add_argument("--items", type=int, default=240)
    p.add_argument("--target-precision", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)

    import numpy as np

    from atl_keras.cli.common import load_trained_model
    from atl_keras.data.synthetic_shop import make_synthetic_shop
    from atl_keras.preprocessing import Preprocessing
    from atl_keras.search import RetrievalIndex
    from atl_keras.search.pictures import plot_precision_recall

    model = load_trained_model(args.model)
    size = Preprocessing.for_model(model).image_size[0]
    shop = make_synthetic_shop(num_items=args.items, catalog_per_item=2, street_per_item=2, image_size=size,
                               seed=args.seed)
    item_of = np.array([shop.item_ids[int(label)] for label in shop.labels], dtype=object)
    in_gallery = set(shop.item_ids[: args.items // 2])
    catalog = np.flatnonzero((shop.domains == "catalog") & np.isin(item_of, list(in_gallery)))
    street = np.flatnonzero(shop.domains == "street")
    expected = [item if item in in_gallery else None for item in item_of[street]]
    import tempfile

    import tensorflow as tf

    folder = tempfile.mkdtemp(prefix="atl-search-pictures-")  # catalog photos as files: image ids are paths
    paths = [os.path.join(folder, f"{row}.png") for row in catalog]
    for path, row in zip(paths, catalog):
        tf.io.write_file(path, tf.io.encode_png(shop.images[row]))
    index = RetrievalIndex(model).add(paths, item_of[catalog].tolist())
    calibrate_rows, fresh_rows = street[::2], street[1::2]
    calibration = index.calibrate(shop.images[calibrate_rows], expected[::2], args.target_precision)
    matched = index.match(shop.images[fresh_rows]) if calibration.threshold is not None else [None] * len(fresh_rows)
    fresh_expected = expected[1::2]
    accepted = [(m, e) for m, e in zip(matched, fresh_expected) if m is not None]
    correct = sum(m == e for m, e in accepted)
    os.makedirs(args.output, exist_ok=True)
    plot_precision_recall(os.path.join(args.output, "search_calibration.png"), calibration)
    shown = [n for n, e in enumerate(fresh_expected) if e is not None][:3] + \
        [n for n, e in enumerate(fresh_expected) if e is None][:1]
    index.grid(os.path.join(args.output, "search_grid.png"), shop.images[fresh_rows[shown]], k=5,
               expected_ids=[fresh_expected[n] for n in shown])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"gallery {len(index)} catalog photos of {len(in_gallery)} items; {len(street)} street photos "
          f"({sum(e is not None for e in expected)} of gallery items)")
    print(f"calibrated on {len(calibrate_rows)}: threshold {calibration.threshold}, precision "
          f"{calibration.precision:.3f}, recall {calibration.recall:.3f} (target {args.target_precision}; "
          f"precision over all {calibration.curve_precision[-1]:.3f})")
    print(f"fresh {len(fresh_rows)}: accepted {len(accepted)}, precision {correct / max(len(accepted), 1):.3f}, "
          f"recall {correct / max(sum(e is not None for e in fresh_expected), 1):.3f}")
    print(f"pictures in {args.output}/search_grid.png, search_calibration.png; commit {commit}, "
          f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`atl index`: a trained model + a product catalog -> a new search version in saved_models/NAME.

    atl index --model runs/x/model.keras --catalog products.csv --output-base saved_models/shop \
        [--portable-output-base saved_models/shop-portable] [--strict] [--cache-dir DIR]
    atl index --model runs/x/model.keras --output-base saved_models/shop --add new.csv --remove gone.txt
    atl index --model runs/x/model.keras --output-base saved_models/shop --embeddings embeddings/

The catalog is a CSV/JSONL (`image, item_id[, image_id][, metadata columns]`) or a folder of
images. Unchanged images are never embedded twice (on-disk cache keyed by model + image
content). A thin CLI over `atl_keras.index_catalog`; prints progress and what it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from atl_keras.cli.progress import progress_reporter
from atl_keras.cli.common import DefaultsHelpFormatter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def add_index_flags(p: argparse.ArgumentParser) -> None:
    """Index knobs shared by `atl export` and `atl index` (default: tuned to --min-recall)."""
    p.add_argument("--k", type=int, default=10, help="neighbours the recall gate and tuning measure")
    p.add_argument("--min-recall", type=float, default=0.95,
                   help="refuse the export below this set recall@k vs exact search (held-out queries)")
    p.add_argument("--num-leaves", type=int, default=None, help="ScaNN tree leaves (default ~sqrt(N); 0 = brute force)")
    p.add_argument("--leaves-to-search", type=int, default=None, help="leaves searched per query (default: tuned)")
    p.add_argument("--reorder", type=int, default=None, help="exact re-rank size after AH scoring (default: tuned)")
    quantize = p.add_mutually_exclusive_group()
    quantize.add_argument("--quantize", dest="quantize", action="store_true", default=None,
                          help="score the searched leaves with asymmetric hashing (+ exact re-rank)")
    quantize.add_argument("--no-quantize", dest="quantize", action="store_false",
                          help="score the searched leaves exactly")
    p.add_argument("--match-threshold", default=None,
                   help="a score, or the JSON `atl calibrate` wrote: results scoring at least it are flagged "
                        "as matches (retrieve's `match` output) and the manifest records it")


def match_threshold(args: argparse.Namespace) -> float | None:
    """--match-threshold as a float: a number, or the ``threshold`` of a calibration JSON file."""
    value = args.match_threshold
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    if not os.path.isfile(value):
        raise ValueError(f"--match-threshold {value!r} is neither a number nor a calibration file.")
    with open(value, encoding="utf-8") as f:
        try:
            threshold = json.load(f).get("threshold")
        except (ValueError, AttributeError):
            threshold = None
    if not isinstance(threshold, (int, float)):
        raise ValueError(f"{value} holds no calibrated threshold (write one with `atl calibrate`).")
    return float(threshold)


def index_options(args: argparse.Namespace):
    from atl_keras.export import IndexOptions

    for name in ("num_leaves", "leaves_to_search", "reorder"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_leaves" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'num_leaves' else 1}, got {value}.")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}.")
    if not 0.0 <= args.min_recall <= 1.0:
        raise ValueError(f"--min-recall must be in [0, 1], got {args.min_recall}.")
    return IndexOptions(num_leaves=args.num_leaves, leaves_to_search=args.leaves_to_search,
                        reorder=args.reorder, quantize=args.quantize)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atl index", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="trained model (.keras)")
    p.add_argument("--catalog", default=None, help="products.csv | products.jsonl | a folder of images")
    p.add_argument("--output-base", required=True, help="e.g. saved_models/NAME")
    p.add_argument("--portable-output-base", default=None,
                   help="also write the same version without ScaNN ops (stock TF Serving); remembered in the "
                   "manifest: later runs on this --output-base keep writing it (default: the latest version's)")
    p.add_argument("--no-portable", action="store_true",
                   help="stop writing the portable version remembered from an earlier run")
    p.add_argument("--embeddings", default=None,
                   help="publish embeddings written by `atl embed` (Apache Beam) instead of embedding --catalog")
    p.add_argument("--add", default=None, help="catalog file of rows to add to the latest version")
    p.add_argument("--remove", default=None,
                   help="item ids / image ids to drop: a comma list, or the path of an existing file (one id "
                        "per line); ids in neither the index nor --add stop the run (exit 2, nothing published)")
    p.add_argument("--strict", action="store_true", help="stop on a missing or undecodable image")
    p.add_argument("--image-root", default=None, help="folder the catalog's image paths are relative to")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default OUTPUT_BASE/.embedding-cache)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--resize", choices=["pad", "stretch"], default=None,
                   help="how photos become the model's square input (default: the latest version's manifest, "
                   "else pad, as `atl train` decodes)")
    p.add_argument("--pad-value", type=int, default=None,
                   help="grey level of the padding (default: the latest version's manifest, else 255)")
    p.add_argument("--version", type=int, default=None, help="default: the next free integer")
    p.add_argument("--force", action="store_true", help="replace an existing version")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_index_flags(p)
    return p


def latest_manifest(output_base: str) -> tuple[int | None, dict]:
    """(latest version of `output_base`, its manifest) or (None, {}) when there is none."""
    from atl_keras.export import MANIFEST_NAME, existing_versions

    versions = existing_versions(output_base) if os.path.isdir(output_base) else []
    if not versions:
        return None, {}
    path = os.path.join(output_base, str(versions[-1]), "assets", MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return versions[-1], json.load(f)
    except (OSError, ValueError):
        return versions[-1], {}


def remembered_settings(args: argparse.Namespace) -> list[str]:
    """Fill the portable base and preprocessing the user did not give from the latest
    version's manifest (else the training defaults); returns one line per value taken."""
    version, manifest = latest_manifest(args.output_base)
    notes = []
    remembered = manifest.get("portable_output_base")
    if args.portable_output_base is None and remembered and not args.no_portable:
        args.portable_output_base = remembered
        notes.append(f"also writing the portable version to {remembered} (remembered from version {version}; "
                     "--no-portable stops it)")
    previous = manifest.get("preprocessing") or {}
    for name, default in (("resize", "pad"), ("pad_value", 255)):
        if getattr(args, name) is None:
            if name in previous:
                setattr(args, name, previous[name])
                notes.append(f"--{name.replace('_', '-')} {previous[name]} (as version {version} of {args.output_base})")
            else:
                setattr(args, name, default)
    return notes


def report(result, args: argparse.Namespace) -> None:
    """What `atl index` did, on the console: versions, skipped rows, the image ids, the index."""
    export, counts = result.export, result.counts
    print(f"Indexed version {export.version} at {export.path}")
    if export.portable_path:
        print(f"Portable (stock TF Serving, retrieve_exact) version at {export.portable_path}")
    skipped = counts.get("skipped_missing", 0) + counts.get("skipped_corrupt", 0)
    if skipped:
        named = ", ".join(s.get("image", "?") for s in result.skipped[:3])
        print(f"Skipped {skipped} of {counts.get('rows', skipped)} rows: {counts.get('skipped_missing', 0)} with a "
              f"missing or empty image, {counts.get('skipped_corrupt', 0)} undecodable (e.g. {named}; listed "
              f"in {os.path.join(export.path, 'assets', 'manifest.json')}; --strict stops instead)")
    from atl_keras.export import IMAGE_IDS_NAME

    ids_path = os.path.join(export.path, "assets", IMAGE_IDS_NAME)
    if os.path.exists(ids_path):
        with open(ids_path, encoding="utf-8") as f:
            example = f.readline().strip()
        print(f"Image ids (query results, --remove): the catalog's image_id column, else each row's image path "
              f"as written in the catalog (e.g. {example!r})")
    if "scann_config" in export.manifest:
        config, recall = export.manifest["scann_config"], export.manifest.get("recall", {})
        where = "brute force (every item)" if not config.get("num_leaves") else \
            f"{config['num_leaves_to_search']} of {config['num_leaves']} leaves"
        print(f"Index: ScaNN, {where}, {config.get('scoring')} scoring; set recall@{recall.get('k')} "
              f"{recall.get('set_recall', float('nan')):.4f} vs exact search")
    print(f"Embedded {counts.get('embedded', 0)} images, {counts.get('cached', 0)} from the cache")
    if not args.portable_output_base:
        print("No portable version (stock TF Serving): add --portable-output-base BASE once; later runs keep it")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = index_options(args)
        if args.embeddings is not None and (args.catalog or args.add or args.remove):
            raise ValueError("--embeddings publishes what `atl embed` wrote; it does not combine with "
                             "--catalog, --add or --remove.")
        if args.catalog is None and args.add is None and args.remove is None and args.embeddings is None:
            raise ValueError("Give --catalog (CSV, JSONL or a folder of images), --embeddings, or --add / --remove.")
        from atl_keras.catalog_index import index_catalog, index_embeddings
        from atl_keras.cli.common import load_trained_model
        from atl_keras.preprocessing import Preprocessing

        if not os.path.exists(args.model):
            raise FileNotFoundError(f"No model at {args.model!r}; train one with `atl train`.")
        for note in remembered_settings(args):
            print(f"atl index: {note}", flush=True)
        model = load_trained_model(args.model)
        prep = Preprocessing.for_model(model, resize=args.resize, pad_value=args.pad_value)
        extra = {"source_model": os.path.abspath(args.model), **(
            {"portable_output_base": os.path.abspath(args.portable_output_base)}
            if args.portable_output_base else {})}
        if args.embeddings is not None:
            result = index_embeddings(
                model, args.embeddings, args.output_base, portable_output_base=args.portable_output_base,
                k=args.k, min_recall=args.min_recall, index_options=options, version=args.version,
                force=args.force, extra_manifest=extra,
            )
        else:
            result = index_catalog(
                model, args.catalog, args.output_base, portable_output_base=args.portable_output_base,
                add=args.add, remove=args.remove, strict=args.strict, cache_dir=args.cache_dir,
                image_root=args.image_root, batch_size=args.batch_size, k=args.k,
                min_recall=args.min_recall, index_options=options, preprocessing=prep,
                version=args.version, force=args.force,
                progress=progress_reporter("embedding", unit="img", quiet=args.quiet),
                extra_manifest=extra, match_threshold=match_threshold(args),
            )
    except (ValueError, FileNotFoundError) as error:  # CatalogError / ExportError are ValueErrors
        print(f"atl index: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, not writable: the cache keeps only whole records
        print(f"atl index: error: {error.strerror or error}"
              f"{f' ({error.filename})' if error.filename else ''}; nothing was published "
              "(the embeddings cached so far are kept): free space and rerun.", file=sys.stderr)
        return 1
    report(result, args)
    summary = {key: result.export.manifest[key] for key in ("gallery_size", "embedding_dim")
               if key in result.export.manifest}
    summary["catalog"] = result.counts
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

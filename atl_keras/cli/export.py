"""`atl export` / `tools/export.py`: a trained model + its evaluation split's index -> saved_models/NAME/VERSION.

For a product catalog use `atl index` (`atl_keras/cli/index.py`); this is the replication path.

    atl export --model runs/main/model.keras --output-base saved_models/shop \
        [--dataset synthetic-shop] [--split test] [--version 3] [--force] [--min-recall 0.95] \
        [--portable-output-base saved_models/shop-portable] \
        [--num-leaves N] [--leaves-to-search L] [--reorder R] [--quantize | --no-quantize]

The gallery is the evaluation set of a dataset spec (see `atl train --help`): the catalog
images of the test items for street->catalog datasets, every test image for leave-one-out
ones. By default the dataset and its options come from the `config.json` that `atl train`
wrote next to the model, so the export indexes exactly the catalog the model was tested on.
A thin CLI over `atl_keras.export.export_model`; prints what it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from atl_keras.cli.index import add_index_flags, index_options, match_threshold  # noqa: E402
from atl_keras.cli.common import DefaultsHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atl export", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="trained model (.keras)")
    p.add_argument("--dataset", default=None, help="dataset spec (default: the model's config.json)")
    p.add_argument("--data-dir", default=os.environ.get("ATL_FASHION_MNIST_DIR"))
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--output-base", required=True, help="e.g. saved_models/NAME")
    p.add_argument("--version", type=int, default=None, help="default: the next integer")
    p.add_argument("--force", action="store_true", help="replace an existing version")
    p.add_argument(
        "--portable-output-base",
        default=None,
        help="also write the same version without ScaNN ops (for stock TF Serving), "
        "e.g. saved_models/NAME-portable",
    )
    add_index_flags(p)
    return p


#: TensorFlow errors that mean "could not write" (a full disk raises ResourceExhaustedError in SaveV2).
WRITE_ERRORS = ("ResourceExhaustedError", "PermissionDeniedError", "UnavailableError", "DataLossError")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = index_options(args)
        if not os.path.exists(args.model):
            raise FileNotFoundError(f"No model at {args.model!r}; train one with `atl train`.")
        import keras

        from atl_keras.losses.registry import import_losses
        import atl_keras.model  # noqa: F401  (registers ATLModel)

        import_losses()  # registers the losses
        from atl_keras.export import export_model
        from atl_keras.cli.config import load_run_config
        from atl_keras.train import load_data

        config = load_run_config(args.model, {"dataset": args.dataset, "data_dir": args.data_dir})
        evaluation = getattr(load_data(config), args.split)
        model = keras.models.load_model(args.model)
        queries = evaluation.query_images if evaluation.gallery_images is not None else None
        provenance = {
            "source_model": os.path.abspath(args.model),
            "dataset": config.dataset,
            "split": args.split,
            "protocol": evaluation.protocol,
        }
        result = export_model(
            model,
            evaluation.index_images,
            evaluation.gallery_ids,
            args.output_base,
            args.version,
            query_images=queries,
            k=args.k,
            min_recall=args.min_recall,
            index_options=options,
            force=args.force,
            extra_manifest=provenance,
            portable_export_base=args.portable_output_base,
            match_threshold=match_threshold(args),
        )
    except (ValueError, FileNotFoundError) as error:  # ExportError is a ValueError
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a full disk or an unwritable base: one line, nothing published
        if not (isinstance(error, OSError) or type(error).__name__ in WRITE_ERRORS):
            raise
        print(f"export: error: writing the export failed ({type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else 'no details'}); nothing was published. "
              "Free disk space (or choose another --output-base) and rerun.", file=sys.stderr)
        return 1
    print(f"Exported version {result.version} to {result.path}")
    if result.portable_path is not None:
        print(f"Portable (stock TF Serving, retrieve_exact) version to {result.portable_path}")
    summary = {key: result.manifest[key] for key in ("gallery_size", "embedding_dim", "scann_config")}
    summary["recall"] = {k: result.manifest["recall"][k] for k in ("k", "set_recall", "tie_aware_recall")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

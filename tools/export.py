"""Export a trained model with a ScaNN gallery index as saved_models/NAME/VERSION.

    python tools/export.py --model runs/main/model.keras --gallery fashion-mnist:test \
        --output-base saved_models/fashion [--version 3] [--force] [--min-recall 0.95]

A thin CLI over `atl_keras.export.export_model`; prints what it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_gallery(spec: str, data_dir: str | None, limit: int | None, offset: int = 0):
    """`fashion-mnist[:train|test]` -> (images [N, 28, 28, 1], ids [N]) ."""
    from atl_keras.data.fashion_mnist import load_fashion_mnist

    name, _, split = spec.partition(":")
    if name != "fashion-mnist":
        raise ValueError(f"Unknown gallery {spec!r}; supported: fashion-mnist[:train|test].")
    data = load_fashion_mnist(split or "test", data_dir=data_dir)
    end = None if limit is None else offset + limit
    images, labels = data.images[offset:end], data.labels[offset:end]
    ids = [
        f"{data.class_names[int(label)]}/{split or 'test'}-{offset + i:05d}"
        for i, label in enumerate(labels)
    ]
    return images, ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="trained model (.keras)")
    p.add_argument("--gallery", default="fashion-mnist:test", help="gallery dataset spec")
    p.add_argument("--gallery-limit", type=int, default=None, help="use the first N images")
    p.add_argument(
        "--queries",
        default="fashion-mnist:train",
        help="held-out queries for the ScaNN recall check ('none': a gallery sample)",
    )
    p.add_argument("--query-limit", type=int, default=1000)
    p.add_argument("--output-base", required=True, help="e.g. saved_models/NAME")
    p.add_argument("--version", type=int, default=None, help="default: the next integer")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--min-recall", type=float, default=0.95)
    p.add_argument("--force", action="store_true", help="replace an existing version")
    p.add_argument(
        "--portable-output-base",
        default=None,
        help="also write the same version without ScaNN ops (for stock TF Serving), "
        "e.g. saved_models/NAME-portable",
    )
    p.add_argument("--data-dir", default=os.environ.get("ATL_FASHION_MNIST_DIR"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import keras

    import atl_keras  # noqa: F401  (registers ATLModel and the losses)
    from atl_keras.export import ExportError, export_model

    try:
        if not os.path.exists(args.model):
            raise FileNotFoundError(f"No model at {args.model!r}; train one with `atl train`.")
        model = keras.models.load_model(args.model)
        images, ids = load_gallery(args.gallery, args.data_dir, args.gallery_limit)
        queries = None
        if args.queries != "none":
            queries, _ = load_gallery(args.queries, args.data_dir, args.query_limit)
        result = export_model(
            model,
            images,
            ids,
            args.output_base,
            args.version,
            query_images=queries,
            k=args.k,
            min_recall=args.min_recall,
            force=args.force,
            extra_manifest={"source_model": os.path.abspath(args.model), "gallery": args.gallery},
        )
        portable = None
        if args.portable_output_base:
            portable = export_model(
                model,
                images,
                ids,
                args.portable_output_base,
                result.version,
                k=args.k,
                force=args.force,
                include_scann=False,
                extra_manifest={"source_model": os.path.abspath(args.model), "gallery": args.gallery},
            )
    except (ExportError, ValueError, FileNotFoundError) as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    recall_key = next(key for key in result.manifest if key.startswith("scann_recall_at_"))
    print(f"Exported version {result.version} to {result.path}")
    if portable is not None:
        print(f"Portable (stock TF Serving, retrieve_exact) version to {portable.path}")
    print(json.dumps({key: result.manifest[key] for key in (
        "gallery_size", "embedding_dim", recall_key, "scann_config")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

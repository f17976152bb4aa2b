"""`atl shards`: write a catalog as TFRecord shards + row index (`atl_keras.data.write_shards`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shards",
        help="write a catalog's images as TFRecord shards with a row index (train with --dataset shards:DIR)",
        description="Reads every image file once and writes its bytes (not re-encoded) into TFRecord "
        "shards, with the item table and per-row offsets beside them. `atl train --dataset shards:DIR` "
        "then streams P x K batches from the shards.",
    )
    p.add_argument("--dataset", required=True,
                   help="catalog:PATH.csv|.jsonl | deepfashion-inshop:ROOT | synthetic-shop")
    p.add_argument("--output", required=True, help="folder to create (local or a tf.io.gfile URL)")
    p.add_argument("--rows-per-shard", type=int, default=4096)
    p.add_argument("--max-pixels", type=int, default=None,
                   help="skip images whose header declares more pixels (default 64,000,000; 0: no bound)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--seed", type=int, default=0, help="split assignment seed of catalogs without a split column")


def _catalog(spec: str, seed: int):
    name, _, argument = spec.partition(":")
    if name == "catalog" and argument:
        from atl_keras.data.catalog import read_catalog

        return read_catalog(argument, seed=seed)
    if name == "deepfashion-inshop" and argument:
        from atl_keras.data.deepfashion import read_deepfashion_inshop

        return read_deepfashion_inshop(argument)
    if name == "synthetic-shop":
        from atl_keras.data.synthetic_shop import make_synthetic_shop

        return make_synthetic_shop(seed=seed)
    raise ValueError(f"--dataset must be catalog:PATH, deepfashion-inshop:ROOT or synthetic-shop, got {spec!r}.")


def run(args: argparse.Namespace) -> int:
    from atl_keras.data.shards import write_shards
    from atl_keras.preprocessing import DEFAULT_MAX_PIXELS

    catalog = _catalog(args.dataset, args.seed)
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    print(f"atl shards: {len(catalog)} rows of {args.dataset} -> {args.output}", flush=True)
    result = write_shards(
        catalog, args.output, rows_per_shard=args.rows_per_shard, max_pixels=max_pixels, overwrite=args.overwrite,
        progress=lambda done, total: print(f"atl shards: {done}/{total} rows", flush=True),
    )
    print(f"atl shards: wrote {result.summary()}")
    print(f"Train with: atl train --dataset shards:{result.directory}")
    return 0

"""`atl embed`: embed a catalog with an exported model on Apache Beam -> sharded embedding files.

    atl embed --catalog products.csv --model saved_models/shop --output embeddings/       # DirectRunner
    atl embed --catalog 'gs://b/catalog/*.jsonl' --model gs://b/models/shop/3 --output gs://b/emb \
        --runner DataflowRunner --project P --region R --temp_location gs://b/tmp
    atl index --embeddings embeddings/ --model run/model.keras --output-base saved_models/shop

Flags this command does not know go to Beam (``--runner`` and the runner's options). A thin
CLI over `atl_keras.beam.embed_catalog`; needs the extra ``atl-keras[beam]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atl embed", description=__doc__.splitlines()[0],
                                epilog="Other flags (--runner, --project, ...) are passed to Apache Beam.")
    p.add_argument("--catalog", required=True, help="catalog file, glob or folder (.csv, .jsonl, .tfrecord)")
    p.add_argument("--model", required=True, help="exported model: saved_models/NAME (latest version) or NAME/N")
    p.add_argument("--output", required=True, help="folder for the embedding files")
    p.add_argument("--image-root", default=None, help="folder the catalog's image paths are relative to")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-shards", type=int, default=0, help="output shards (default: the runner decides)")
    p.add_argument("--force", action="store_true", help="replace embedding files already in --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args, beam_args = build_parser().parse_known_args(argv)
    try:
        from atl_keras.beam import embed_catalog

        manifest = embed_catalog(args.catalog, args.model, args.output, pipeline_args=beam_args,
                                 image_root=args.image_root, batch_size=args.batch_size,
                                 num_shards=args.num_shards, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"atl embed: error: {error}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(f"Embedded {counts.get('embedded', 0)} of {counts.get('rows', 0)} rows into {args.output} "
          f"({manifest['runner']})")
    if counts.get("skipped"):
        print(f"Skipped {counts['skipped']}: {json.dumps(counts.get('reasons', {}))} "
              f"(listed in {args.output}/skipped-*.jsonl)")
    print(f"Next: atl index --embeddings {args.output} --model MODEL.keras --output-base saved_models/NAME")
    return 0


if __name__ == "__main__":
    sys.exit(main())

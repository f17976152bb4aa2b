"""Catalog embedding beyond one machine: an Apache Beam pipeline around the exported SavedModel.

    embed_catalog("products.csv", "saved_models/shop/3", "embeddings/")              # DirectRunner
    embed_catalog("gs://b/catalog/part-*.jsonl", "gs://b/models/shop/3", "gs://b/emb/",
                  pipeline_args=["--runner=DataflowRunner", "--project=P", "--region=R",
                                 "--temp_location=gs://b/tmp"])
    # then, on one machine: atl index --embeddings embeddings/ --model run/model.keras ...

Steps: match the catalog files (CSV / JSONL with ``image, item_id[, image_id][, metadata]``,
or TFRecord shards of ``tf.train.Example`` with ``image`` bytes, ``item_id`` and optional
``image_id`` / string metadata) -> read each file, numbering its rows (the order `atl index`
keeps) -> reshuffle across workers -> batch (``BatchElements``) -> `EmbedRows`: read the
image bytes (Beam's file systems), hash them, and embed them with the export's
``embed_pixels`` signature behind `atl_keras.embedding.embed_batches` (the same decode,
preprocessing, pixel budget and bad-row rules as training, `atl index` and serving; the
export's manifest supplies the preprocessing) -> sharded embedding files + skipped rows
(`atl_keras.embedding_files`) -> ``manifest.json`` once the pipeline has finished.

`EmbedRows` is Beam's RunInference pattern written as a DoFn: the model loads once per
worker (``setup``) and runs on batches; it keeps the row's key, hash and metadata beside
each vector, which `RunInference`'s TensorFlow handler (tensor in, tensor out) does not.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from typing import Any, Iterable, Sequence

from atl_keras._optional import require

beam = require("beam", "apache_beam")

from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.metrics import Metrics  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions  # noqa: E402

from atl_keras.embedding_files import (  # noqa: E402
    EMBEDDINGS_PREFIX,
    SKIPPED_PREFIX,
    encode_record,
    read_manifest,
    shard_paths,
    write_manifest,
)

__all__ = ["EmbedRows", "ReadCatalogFile", "embed_catalog", "match_catalog"]

_NAMESPACE = "atl_embed"
_MAX_NAMED = 5


# ------------------------------------------------------------------------------ reading
def match_catalog(pattern: str) -> list[str]:
    """The catalog files of ``pattern`` (a file, a glob, or a folder of .csv/.jsonl/.tfrecord files), sorted."""
    if FileSystems.exists(pattern) and not pattern.endswith("/") and not _is_dir(pattern):
        return [pattern]
    glob = pattern if any(c in pattern for c in "*?[") else os.path.join(pattern, "*")
    files = sorted(m.path for r in FileSystems.match([glob]) for m in r.metadata_list
                   if m.path.lower().endswith((".csv", ".jsonl", ".json", ".tfrecord", ".tfrecords")))
    if not files:
        raise FileNotFoundError(f"No catalog files (.csv, .jsonl, .tfrecord) match {pattern!r}.")
    return files


def _is_dir(path: str) -> bool:
    return "://" not in path and os.path.isdir(path)


class ReadCatalogFile(beam.DoFn):
    """``(file number, path)`` -> one dict per catalog row, numbered in file order.

    A row: ``file``, ``row``, ``item_id``, ``image_id``, ``metadata`` (one-line JSON text,
    keys sorted, as `atl index` stores it) and either ``image`` (a path, resolved as
    `atl_keras.catalog_index.read_index_catalog` does) or ``image_bytes`` (TFRecord shards).
    """

    def __init__(self, image_root: str | None = None) -> None:
        self.image_root = image_root

    def process(self, element: tuple[int, str]) -> Iterable[dict[str, Any]]:
        from atl_keras.catalog_index import _row

        number, path = element
        root = self.image_root or os.path.dirname(path)
        if path.lower().endswith((".tfrecord", ".tfrecords")):
            yield from self._tfrecord_rows(number, path)
            return
        with FileSystems.open(path) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            if path.lower().endswith((".jsonl", ".json")):
                records = ((n, line) for n, line in enumerate(text, 1) if line.strip())
                parsed = ((n, _json_record(line, f"{path}:{n}")) for n, line in records)
            else:
                parsed = enumerate(csv.DictReader(text), 2)
            for n, record in parsed:
                row = _row(record, root, f"{path}:{n}")
                yield {"file": number, "row": n, "image": row.image, "item_id": row.item_id,
                       "image_id": row.image_id, "metadata": _metadata_text(row.metadata)}

    def _tfrecord_rows(self, number: int, path: str) -> Iterable[dict[str, Any]]:
        import tensorflow as tf

        for n, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            example = tf.train.Example.FromString(record)
            features = {k: v.bytes_list.value[0] for k, v in example.features.feature.items()
                        if v.bytes_list.value}
            if "image" not in features or "item_id" not in features:
                raise ValueError(f"{path} record {n}: a catalog record needs 'image' (bytes) and 'item_id'.")
            image_id = features.get("image_id", f"{os.path.basename(path)}#{n}".encode()).decode("utf-8")
            metadata = {k: v.decode("utf-8", "replace") for k, v in features.items()
                        if k not in ("image", "item_id", "image_id")}
            yield {"file": number, "row": n, "image": f"{path}#{n}", "image_bytes": features["image"],
                   "item_id": features["item_id"].decode("utf-8"), "image_id": image_id,
                   "metadata": _metadata_text(metadata)}


def _json_record(line: str, where: str) -> dict[str, Any]:
    from atl_keras.catalog_index import CatalogError

    try:
        return json.loads(line)
    except ValueError as error:
        raise CatalogError(f"{where}: not a JSON object ({error}).") from None


def _metadata_text(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, ensure_ascii=False, sort_keys=True)


# ------------------------------------------------------------------------------ embedding
class EmbedRows(beam.DoFn):
    """Batches of rows -> ``(row, embedding float32 [D])``; rows without an embedding go to
    the ``skipped`` output with their reason.

    Args:
        export_dir: an exported version (``saved_models/NAME/N``, main or portable).
        batch_size: images per model call inside a bundle batch.
    """

    SKIPPED = "skipped"

    def __init__(self, export_dir: str, batch_size: int = 64) -> None:
        self.export_dir = export_dir
        self.batch_size = batch_size
        self.embedded = Metrics.counter(_NAMESPACE, "embedded")
        self.skipped = Metrics.counter(_NAMESPACE, "skipped")

    def setup(self) -> None:
        import tensorflow as tf

        try:  # the main export's ScaNN ops must be registered before loading; the portable one has none
            import scann  # noqa: F401
        except ImportError:
            pass
        manifest = _export_manifest(self.export_dir)
        from atl_keras.preprocessing import Preprocessing

        self.preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        self._module = tf.saved_model.load(self.export_dir)
        signature = self._module.signatures["embed_pixels"]
        self._embed = lambda pixels: signature(pixels=pixels)["embeddings"]

    def process(self, rows: Sequence[dict[str, Any]]) -> Iterable[Any]:
        from atl_keras.embedding import EmbeddingReport, embed_batches

        contents: list[bytes] = []
        for row in rows:
            data = row.get("image_bytes")
            if data is None:
                try:
                    with FileSystems.open(row["image"]) as f:
                        data = f.read()
                except Exception:  # each file system raises its own errors; the row is reported as missing
                    data = b""
            contents.append(data)
        report = EmbeddingReport()
        for indices, vectors in embed_batches(self._embed, contents, preprocessing=self.preprocessing,
                                              batch_size=self.batch_size, report=report):
            for i, vector in zip(indices.tolist(), vectors):
                row = {k: v for k, v in rows[i].items() if k != "image_bytes"}
                row["sha256"] = hashlib.sha256(contents[i]).hexdigest()
                yield row, vector
        self.embedded.inc(report.embedded)
        self.skipped.inc(len(report.skipped))
        reasons = {int(e["index"]): e["reason"] for e in report.examples}
        for i in report.skipped.tolist():
            reason = reasons.get(i) or ("missing or empty" if not contents[i] else "cannot be decoded")
            yield beam.pvalue.TaggedOutput(self.SKIPPED, {
                "image": rows[i]["image"], "image_id": rows[i]["image_id"], "reason": reason})


def _export_manifest(export_dir: str) -> dict[str, Any]:
    import tensorflow as tf

    from atl_keras.export import MANIFEST_NAME

    path = os.path.join(export_dir, "assets", MANIFEST_NAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"No {MANIFEST_NAME} in {export_dir}/assets: give an exported version "
                                "(saved_models/NAME/N, from `atl export` or `atl index`).")
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


def _latest_version(export: str) -> str:
    """``export`` itself if it is a version directory, else its highest numbered version."""
    import tensorflow as tf

    if tf.io.gfile.exists(os.path.join(export, "saved_model.pb")):
        return export
    versions = sorted(int(n.rstrip("/")) for n in tf.io.gfile.listdir(export) if n.rstrip("/").isdigit()) \
        if tf.io.gfile.isdir(export) else []
    if not versions:
        raise FileNotFoundError(f"No exported version at {export!r}: give saved_models/NAME or saved_models/NAME/N.")
    return os.path.join(export, str(versions[-1]))


# ------------------------------------------------------------------------------ pipeline
def embed_catalog(
    catalog: str,
    export: str,
    output: str,
    *,
    pipeline_args: Sequence[str] | None = None,
    image_root: str | None = None,
    batch_size: int = 64,
    num_shards: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Run the pipeline (see the module docstring) and write ``output``; returns its manifest.

    Args:
        catalog: a catalog file, a glob of them, or a folder (.csv / .jsonl / .tfrecord).
        export: an exported version directory, or an export base (its latest version).
        output: folder for the embedding files (must hold none unless ``force``).
        pipeline_args: Beam's flags (``--runner``, the runner's options); default DirectRunner.
        image_root: folder the catalog's image paths are relative to (default: each file's).
        batch_size: images per model call; ``num_shards``: output shards (0: the runner decides).
        force: replace the embedding files already in ``output``.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    version_dir = _latest_version(export)
    export_manifest = _export_manifest(version_dir)
    files = match_catalog(catalog)
    old = shard_paths(output) + shard_paths(output, SKIPPED_PREFIX)
    if tf.io.gfile.exists(os.path.join(output, "manifest.json")):
        old.append(os.path.join(output, "manifest.json"))
    if old and not force:
        raise FileExistsError(f"{output} already holds embedding files; give another folder or --force.")
    for path in old:
        tf.io.gfile.remove(path)
    tf.io.gfile.makedirs(output)

    options = PipelineOptions(list(pipeline_args or []))
    pipeline = beam.Pipeline(options=options)
    rows = (
        pipeline
        | "CatalogFiles" >> beam.Create(list(enumerate(files)))
        | "ReadRows" >> beam.ParDo(ReadCatalogFile(image_root))
        | "Spread" >> beam.Reshuffle()
        | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=max(batch_size, 1))
    )
    embedded, skipped = rows | "Embed" >> beam.ParDo(EmbedRows(version_dir, batch_size)).with_outputs(
        EmbedRows.SKIPPED, main="embedded")
    (
        embedded
        | "Encode" >> beam.MapTuple(encode_record)
        | "WriteEmbeddings" >> beam.io.WriteToTFRecord(
            os.path.join(output, EMBEDDINGS_PREFIX), file_name_suffix=".tfrecord", num_shards=num_shards)
    )
    (
        skipped
        | "SkippedJson" >> beam.Map(lambda s: json.dumps(s, ensure_ascii=False, sort_keys=True))
        | "WriteSkipped" >> beam.io.WriteToText(os.path.join(output, SKIPPED_PREFIX), file_name_suffix=".jsonl",
                                                num_shards=1)
    )
    result = pipeline.run()
    result.wait_until_finish()

    counts = _counts(result)
    skipped_rows = _read_skipped(output)
    reasons: dict[str, int] = {}
    for s in skipped_rows:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    counts.update(rows=counts.get("embedded", 0) + len(skipped_rows), skipped=len(skipped_rows), reasons=reasons)
    manifest = {
        "catalog": files if len(files) > 1 else files[0],
        "model": version_dir,
        "model_sha256": export_manifest["model_sha256"],
        "preprocessing": export_manifest["preprocessing"],
        "embedding_dim": int(export_manifest["embedding_dim"]),
        "runner": options.view_as(StandardOptions).runner or "DirectRunner",
        "counts": counts,
        "skipped_examples": skipped_rows[:_MAX_NAMED],
    }
    write_manifest(output, manifest)
    return read_manifest(output)


def _counts(result: Any) -> dict[str, int]:
    """The pipeline's counters (committed where the runner reports them, else attempted)."""
    from apache_beam.metrics.metric import MetricsFilter

    counts: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        counts[counter.key.metric.name] = counts.get(counter.key.metric.name, 0) + int(value or 0)
    return counts


def _read_skipped(output: str) -> list[dict[str, Any]]:
    import tensorflow as tf

    rows = []
    for path in shard_paths(output, SKIPPED_PREFIX):
        with tf.io.gfile.GFile(path, "r") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return sorted(rows, key=lambda s: s["image_id"])

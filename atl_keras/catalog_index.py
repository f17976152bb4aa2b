"""Index a product catalog for search: `index_catalog` -> a new export version of a trained model.

    result = index_catalog("runs/x/model.keras", "products.csv", "saved_models/shop",
                           portable_output_base="saved_models/shop-portable")
    result.export.path, result.counts     # {"rows": ..., "embedded": ..., "cached": ..., "skipped": ...}

    # the next day: 1% of the rows changed -> only those images are embedded again
    index_catalog(model, "products.csv", "saved_models/shop")
    # or edit the latest version: add rows, remove items (or image ids)
    index_catalog(model, None, "saved_models/shop", add="new.csv", remove=["sku-9", "sku-12"])

A catalog is a CSV or JSONL file with one row per image (``image``, ``item_id`` and any
metadata columns; ``image_id`` optional, default the image path) or a folder of images
(``item_id`` = the file's path without extension). ``image`` is relative to the catalog
file's folder unless absolute. Search results carry the row's ``item_id`` (the ``ids``
output), its ``image_id`` and its metadata columns (a JSON object), stored as assets.

- **Incremental**: embeddings are cached on disk (`EmbeddingCache`, default
  ``<output_base>/.embedding-cache``) keyed by the model's weight fingerprint + the
  preprocessing + the sha256 of the image file's bytes: unchanged images are never
  embedded twice, whatever their path or row. Every record carries its key and a checksum:
  torn, damaged or non-finite records are dropped with a warning and embedded again.
- **Streaming**: images are hashed, decoded (`atl_keras.preprocessing`, as in training)
  and embedded in batches; memory holds the embeddings ``[N, D]`` (the index) and the row
  table, never the pixels of more than a few batches.
- **Bad images**: missing or undecodable files are skipped and counted in the manifest
  (``catalog.skipped``); ``strict=True`` raises `CatalogError` naming them, before anything
  is written.
- **Atomic**: the version number is reserved first and the export publishes as
  `atl_keras.export` does (main + portable pair together).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import hashlib
import json
import os
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = ["CacheDamaged", "CatalogError", "CatalogIndexResult", "CatalogRow", "EmbeddingCache", "index_catalog",
           "index_embeddings", "read_index_catalog"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
ROWS_NAME = "catalog_rows.jsonl"
_RESERVED_COLUMNS = ("image", "item_id", "image_id")
_MAX_NAMED = 5


class CatalogError(ValueError):
    """The catalog cannot be indexed as asked (nothing was written)."""


@dataclass(slots=True)
class CatalogRow:
    """One catalog image: its file, the product it shows, its own id and metadata columns."""

    image: str
    item_id: str
    image_id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None


@dataclass
class CatalogIndexResult:
    """The export written and what happened to the rows."""

    export: Any  # atl_keras.export.ExportResult
    counts: dict[str, int]
    skipped: list[dict[str, str]]


# -------------------------------------------------------------------------------- reading
def _clean(value: Any, what: str, where: str) -> str:
    text = "" if value is None else str(value).strip()
    if not text or "\n" in text or "\r" in text:
        raise CatalogError(f"{where}: {what} {value!r} is empty or contains a newline.")
    return text


def _row(record: Any, root: str, where: str) -> CatalogRow:
    if not isinstance(record, dict):
        raise CatalogError(f"{where}: {json.dumps(record)[:40]} is not a JSON object; each line must be "
                           '{"image": ..., "item_id": ...}.')
    if None in record:  # csv.DictReader puts a row's extra fields under None
        raise CatalogError(f"{where}: {len(record) - 1 + len(record[None])} fields, more than the header's "
                           f"{len(record) - 1} columns (an unquoted comma?).")
    for column in ("image", "item_id"):
        if column not in record:
            raise CatalogError(f"{where}: no {column!r} column; a catalog needs image and item_id.")
    image = _clean(record["image"], "image", where)
    path = image if os.path.isabs(image) else os.path.join(root, image)
    image_id = record.get("image_id") or image
    metadata = {k: v for k, v in record.items() if k not in _RESERVED_COLUMNS and v not in (None, "")}
    return CatalogRow(os.path.normpath(path), _clean(record["item_id"], "item_id", where),
                      _clean(image_id, "image_id", where), metadata)


def read_index_catalog(source: str, image_root: str | None = None) -> list[CatalogRow]:
    """Rows of a CSV / JSONL catalog file or of a folder of images (see the module docstring)."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"No catalog at {source!r}: give a .csv, .jsonl or a folder of images.")
    if os.path.isdir(source):
        root = image_root or source
        rows = []
        for folder, _, files in sorted(os.walk(source)):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(folder, name)
                    relative = os.path.relpath(path, source)
                    rows.append(CatalogRow(path, os.path.splitext(relative)[0], relative))
        if not rows:
            raise CatalogError(f"No {'/'.join(IMAGE_EXTENSIONS)} images under {source!r}.")
        return rows
    root = image_root or os.path.dirname(os.path.abspath(source))
    with open(source, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CatalogError(f"{source}:{number}: not UTF-8 text ({error.reason}); save the catalog as UTF-8.") from None
    rows = []
    lines: list[int] = []
    number = 0
    try:
        if source.lower().endswith((".jsonl", ".json")):
            with open(source, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except ValueError as error:
                            raise CatalogError(f"{source}:{number}: not a JSON object ({error}).") from None
                        rows.append(_row(record, root, f"{source}:{number}"))
                        lines.append(number)
        else:
            with open(source, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                for record in reader:
                    number = reader.line_num
                    rows.append(_row(record, root, f"{source}:{number}"))
                    lines.append(number)
    except csv.Error as error:
        raise CatalogError(f"{source}:{number + 1}: {error}.") from None
    if not rows:
        raise CatalogError(f"The catalog {source!r} has no rows.")
    seen: dict[str, int] = {}
    for row, number in zip(rows, lines):
        if row.image_id in seen:
            raise CatalogError(f"{source}:{number}: image_id {row.image_id!r} already on line {seen[row.image_id]}; "
                               "image ids must be unique.")
        seen[row.image_id] = number
    return rows


def _previous_rows(output_base: str) -> tuple[list[CatalogRow], int]:
    from atl_keras.export import METADATA_NAME, existing_versions

    versions = existing_versions(output_base)
    if not versions:
        raise CatalogError(f"--add/--remove edit the latest version of {output_base}, but it has none; give --catalog.")
    assets = os.path.join(output_base, str(versions[-1]), "assets")
    path = os.path.join(assets, ROWS_NAME)
    if not os.path.exists(path):
        raise CatalogError(f"{output_base}/{versions[-1]} was not written by `atl index` (no {ROWS_NAME}); give --catalog.")
    rows = []
    with open(path, encoding="utf-8") as f, open(os.path.join(assets, METADATA_NAME), encoding="utf-8") as m:
        for line, meta in zip(f, m):
            record = json.loads(line)
            rows.append(CatalogRow(record["image"], record["item_id"], record["image_id"], json.loads(meta), record.get("sha256")))
    return rows, versions[-1]


def _as_removals(remove: str | Sequence[str] | None) -> set[str]:
    if remove is None:
        return set()
    if isinstance(remove, str):
        if os.path.isfile(remove):  # an existing path is a file of ids, one per line
            try:
                with open(remove, encoding="utf-8") as f:
                    return {line.strip() for line in f if line.strip()}
            except UnicodeDecodeError as error:
                raise CatalogError(f"--remove {remove}: not UTF-8 text ({error.reason}).") from None
        return {part.strip() for part in remove.split(",") if part.strip()}
    return {str(x) for x in remove}


# -------------------------------------------------------------------------------- hashing
def _sha256(path: str) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest() if os.path.getsize(path) > 0 else None
    except OSError:
        return None


def content_hashes(paths: Sequence[str], threads: int = 4, chunk: int = 1024) -> list[str | None]:
    """sha256 of each file's bytes (``None``: missing, empty or unreadable), in parallel.

    One task per `chunk` paths: `ThreadPoolExecutor.map` submits every item at once and
    ignores ``chunksize``, so one future per file cost ~2 KB per catalog row.
    """
    chunks = [paths[start:start + chunk] for start in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [digest for part in pool.map(lambda part: [_sha256(p) for p in part], chunks) for digest in part]


# -------------------------------------------------------------------------------- cache
RECORDS_NAME = "embeddings.rec"
_MAGIC = b"ATLE"
_LEGACY_NAMES = ("keys.txt", "vectors.f32")  # the unverified pre-0.x layout: removed on open


class CacheDamaged(RuntimeError):
    """Cached records failed verification after the cache was opened (they were dropped)."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(f"{len(keys)} embedding cache records changed or were damaged during the run.")
        self.keys = list(keys)


class EmbeddingCache:
    """Append-only on-disk embeddings ``[M, D]`` float32, keyed by an image content hash.

    One folder per model + preprocessing (``key``) holding one file, ``embeddings.rec``, of
    fixed-size records: ``b"ATLE"``, the 32-byte sha256 key, the float32 vector ``[D]`` and a
    crc32 of all of it. Appends take an exclusive lock (``fcntl``) and are fsync'd. When the
    cache is opened (or another process changed the file) every record is verified: a torn
    tail, a record whose key, vector, length or checksum is damaged, or a non-finite vector is
    dropped (the file is rewritten without it, with a `warnings.warn`), so its image is
    embedded again. `gather` checks each record's key and checksum once more before use.
    A failed append (disk full) is truncated back, leaving only whole records.
    """

    def __init__(self, root: str, key: str, dim: int) -> None:
        self.folder = os.path.join(root, key)
        self.dim = int(dim)
        self.record = np.dtype([("magic", "S4"), ("key", "V32"), ("vector", "<f4", (self.dim,)), ("crc", "<u4")])
        os.makedirs(self.folder, exist_ok=True)
        self._path = os.path.join(self.folder, RECORDS_NAME)
        self.rows: dict[str, int] = {}
        self.dropped = 0  # damaged records found (and removed) by this instance
        with self._locked():
            for name in _LEGACY_NAMES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, name))
            self._load()

    @contextlib.contextmanager
    def _locked(self):
        with open(os.path.join(self.folder, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _stat(self) -> tuple[int, int]:
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            return (0, 0)
        return (stat.st_ino, stat.st_size)

    def _encode(self, keys: Sequence[str], vectors: np.ndarray) -> bytes:
        records = np.zeros(len(keys), self.record)
        records["magic"] = _MAGIC
        records["key"] = [np.void(bytes.fromhex(k)) for k in keys]
        records["vector"] = vectors
        raw = records.view(np.uint8).reshape(len(keys), self.record.itemsize)
        records["crc"] = [zlib.crc32(row[:-4].tobytes()) for row in raw]
        return records.tobytes()

    def _valid(self, records: np.ndarray) -> np.ndarray:
        """``[n]`` bool: magic, checksum and a finite vector."""
        raw = records.view(np.uint8).reshape(len(records), self.record.itemsize)
        crc_ok = np.fromiter((zlib.crc32(row[:-4].tobytes()) for row in raw), np.uint32, len(records))
        return ((records["magic"] == _MAGIC) & (crc_ok == records["crc"])
                & np.isfinite(records["vector"]).all(axis=1))

    def _load(self) -> None:
        """Verify every record (under the lock); rewrite the file without damaged ones."""
        size = self._stat()[1]
        count, tail = divmod(size, self.record.itemsize)
        records = np.fromfile(self._path, self.record, count) if count else np.zeros(0, self.record)
        valid = self._valid(records)
        keys = [bytes(k).hex() for k in records["key"]]
        rows: dict[str, int] = {}
        keep = np.zeros(len(records), bool)
        for index in np.flatnonzero(valid):
            if keys[index] not in rows:
                rows[keys[index]] = len(rows)
                keep[index] = True
        damaged = int((~valid).sum()) + (1 if tail else 0)
        if damaged or not keep.all():
            tmp = f"{self._path}.tmp"
            with open(tmp, "wb") as f:
                f.write(records[keep].tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
            _fsync_dir(self.folder)
        if damaged:
            self.dropped += damaged
            warnings.warn(
                f"The embedding cache {self.folder} held {damaged} damaged record(s) (torn, wrong "
                "checksum or non-finite); they were dropped and their images will be embedded again.",
                stacklevel=3)
        self.rows = rows
        self._seen = self._stat()

    def _refresh(self) -> None:
        if self._stat() != self._seen:  # another process appended, compacted or damaged the file
            self._load()

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def append(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store ``vectors [n, D]`` under ``keys`` (64-hex sha256; already cached keys are skipped).

        Raises `OSError` (disk full, ...) after truncating the file back to its whole records.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._locked():
            self._refresh()
            new = {}
            for k, v in zip(keys, vectors):
                if k not in self.rows and k not in new:
                    new[k] = v
            if not new:
                return
            data = self._encode(list(new), np.stack(list(new.values())))
            start = self._stat()[1]
            try:
                with open(self._path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    os.truncate(self._path, start)
                raise
            for k in new:
                self.rows[k] = len(self.rows)
            self._seen = self._stat()

    def gather(self, keys: Sequence[str]) -> np.ndarray:
        """``[len(keys), D]`` float32 vectors of cached keys (aligned for a copy-free index
        build, see `atl_keras.index.aligned_empty`).

        Every record read is checked again (key, checksum, finite); failures are dropped from
        the cache and raised as `CacheDamaged` (embed those keys again and retry).
        """
        from atl_keras.index import aligned_empty

        out = aligned_empty((len(keys), self.dim))
        if not keys:
            return out
        with self._locked():
            self._refresh()
            missing = [k for k in keys if k not in self.rows]  # dropped by a re-verification
            if missing:
                raise CacheDamaged(missing)
            stored = np.memmap(self._path, dtype=self.record, mode="r", shape=(self._seen[1] // self.record.itemsize,))
            rows = np.fromiter((self.rows[k] for k in keys), dtype=np.int64, count=len(keys))
            bad: list[str] = []
            for start in range(0, len(rows), 65536):
                records = np.asarray(stored[rows[start:start + 65536]])
                wanted = np.frombuffer(b"".join(bytes.fromhex(k) for k in keys[start:start + 65536]), "V32")
                ok = self._valid(records) & (records["key"] == wanted)
                out[start:start + len(records)] = records["vector"]
                bad += [keys[start + i] for i in np.flatnonzero(~ok)]
            del stored
            if bad:
                for k in set(bad):
                    self.rows.pop(k, None)
                self._seen = (-1, -1)  # verify the whole file at the next use
                raise CacheDamaged(sorted(set(bad)))
        return out


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_key(model_sha256: str, preprocessing: Any) -> str:
    """The cache folder name: model weights + preprocessing (either changing re-embeds)."""
    text = json.dumps({"model": model_sha256, "preprocessing": preprocessing.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# -------------------------------------------------------------------------------- index
@contextlib.contextmanager
def edit_lock(output_base: str):
    """Hold `output_base`'s edit lock (``flock`` on the folder itself: no file is left).

    `index_catalog` runs under it from reading the latest version to publishing the next, so
    concurrent runs on one base (``--add``, ``--remove``, full re-indexes) land one after the
    other, each starting from the version the previous one published: no update is lost. A
    run that finds the lock taken warns and waits.
    """
    if os.path.exists(output_base) and not os.path.isdir(output_base):
        raise CatalogError(f"{output_base} exists and is not a directory; choose another output base.")
    os.makedirs(output_base, exist_ok=True)
    fd = os.open(output_base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(f"Another `atl index` is editing {output_base}; waiting for it to publish "
                          "(this run then starts from the version it wrote).", stacklevel=4)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _one_edit_per_base(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def serialized(model: Any, catalog: Any, output_base: str, *args: Any, **kwargs: Any) -> Any:
        with edit_lock(output_base):
            return function(model, catalog, output_base, *args, **kwargs)

    return serialized


@_one_edit_per_base
def index_catalog(
    model: Any,
    catalog: str | Sequence[CatalogRow] | None,
    output_base: str,
    *,
    portable_output_base: str | None = None,
    add: str | Sequence[CatalogRow] | None = None,
    remove: str | Sequence[str] | None = None,
    strict: bool = False,
    cache_dir: str | None = None,
    image_root: str | None = None,
    batch_size: int = 128,
    k: int = 10,
    min_recall: float = 0.95,
    index_options: Any = None,
    preprocessing: Any = None,
    version: int | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    extra_manifest: dict[str, Any] | None = None,
    match_threshold: float | None = None,
) -> CatalogIndexResult:
    """Embed a catalog with `model` and export it as the next version of `output_base`.

    Args:
        model: a Keras embedding model or the path of a saved ``.keras`` model.
        catalog: a CSV / JSONL file or a folder of images (or `CatalogRow`s); ``None`` with
            `add` / `remove` edits the rows of the latest version of `output_base`.
        portable_output_base: also write the portable variant (stock TF Serving).
        add: rows to add (a catalog file or rows); a row whose ``image_id`` exists replaces it.
        remove: item ids or image ids to drop (a file with one per line, a comma list or a sequence).
        strict: raise `CatalogError` on the first missing/undecodable image instead of skipping.
        cache_dir: embedding cache root (default ``<output_base>/.embedding-cache``).
        progress: ``progress(done, total)`` after every embedded batch (the CLI's bar).
        match_threshold: a calibrated match threshold (`atl calibrate`): in the manifest, and
            the retrieve signatures flag results scoring at least it (``match``).
        Others as in `atl_keras.export.export_model`.

    Returns:
        `CatalogIndexResult(export, counts, skipped)`; counts: ``rows``, ``indexed``,
        ``embedded`` (images run through the model), ``cached``, ``skipped_missing``,
        ``skipped_corrupt``, ``removed``, ``added``.
    """
    from atl_keras.export import ExportError, reserve_version
    from atl_keras.embedding import embed_batches, weights_fingerprint
    from atl_keras.preprocessing import Preprocessing

    model = _load_model(model)
    if batch_size < 1:
        raise CatalogError(f"batch_size must be >= 1, got {batch_size}.")

    # 1. the rows to index
    counts = {"added": 0, "removed": 0}
    if catalog is None:
        if add is None and remove is None:
            raise CatalogError("Give a catalog (CSV, JSONL or a folder of images), or --add/--remove.")
        rows, _ = _previous_rows(output_base)
    else:
        rows = list(catalog) if not isinstance(catalog, str) else read_index_catalog(catalog, image_root)
    if add is not None:
        new_rows = list(add) if not isinstance(add, str) else read_index_catalog(add, image_root)
        replaced = {r.image_id for r in new_rows}
        rows = [r for r in rows if r.image_id not in replaced] + new_rows
        counts["added"] = len(new_rows)
    removals = _as_removals(remove)
    if remove is not None and not removals:
        raise CatalogError(f"--remove {remove!r} names no ids (an empty file or list); nothing to remove.")
    if removals:
        unknown = removals - {r.item_id for r in rows} - {r.image_id for r in rows}
        if unknown:
            raise CatalogError(_unknown_removals(sorted(unknown), remove, output_base if catalog is None else catalog))
        before = len(rows)
        rows = [r for r in rows if r.item_id not in removals and r.image_id not in removals]
        counts["removed"] = before - len(rows)
    if not rows:
        raise CatalogError("No rows left to index.")

    preprocessing = preprocessing or Preprocessing.for_model(model)
    fingerprint = weights_fingerprint(model)
    dim = int(model.compute_output_shape((None, *preprocessing.image_shape))[-1])

    with reserve_version(output_base, version, force=force, portable_export_base=portable_output_base) as number:
        # 2. content hashes (reading files: missing ones found here, before any embedding)
        hashes = content_hashes([r.image for r in rows])
        skipped = [{"image": r.image, "image_id": r.image_id, "reason": "missing or empty"}
                   for r, h in zip(rows, hashes) if h is None]
        if skipped and strict:
            raise CatalogError(_bad_message(skipped, len(rows)))
        for row, digest in zip(rows, hashes):
            row.sha256 = digest
        del hashes

        # 3. embed what the cache does not hold, one file per distinct content
        cache = EmbeddingCache(cache_dir or os.path.join(output_base, ".embedding-cache"),
                               cache_key(fingerprint, preprocessing), dim)
        todo: dict[str, str] = {}
        for row in rows:
            if row.sha256 is not None and row.sha256 not in cache and row.sha256 not in todo:
                todo[row.sha256] = row.image
        todo_keys, todo_paths = list(todo), list(todo.values())
        done = [0]

        def store(indices: np.ndarray, vectors: np.ndarray) -> None:
            if not np.all(np.isfinite(vectors)):
                raise ExportError("The model produced NaN/Inf embeddings; check the model.")
            cache.append([todo_keys[i] for i in indices], vectors)
            done[0] += len(indices)
            if progress is not None:
                progress(done[0], len(todo_paths))

        def embed(paths: Sequence[str], on_batch: Callable[[np.ndarray, np.ndarray], None]) -> None:
            for indices, vectors in embed_batches(model, paths, preprocessing=preprocessing, batch_size=batch_size):
                on_batch(indices, vectors)

        if todo_paths:
            embed(todo_paths, store)
        corrupt = {key for key in todo_keys if key not in cache}
        bad = [{"image": r.image, "image_id": r.image_id, "reason": "cannot be decoded"}
               for r in rows if r.sha256 in corrupt]
        skipped += bad
        if bad and strict:
            raise CatalogError(_bad_message(bad, len(rows)))
        kept = [r for r in rows if r.sha256 is not None and r.sha256 not in corrupt]
        if not kept:
            raise CatalogError(_bad_message(skipped, len(rows)) + " No image could be indexed.")
        counts.update(
            rows=len(rows), indexed=len(kept), embedded=done[0], cached=len(kept) - sum(
                1 for _ in _first_occurrences(kept, set(todo_keys) - corrupt)),
            skipped_missing=sum(1 for s in skipped if s["reason"] == "missing or empty"),
            skipped_corrupt=len(bad),
        )
        del rows, todo, todo_keys, todo_paths, corrupt  # per-row Python objects the export does not need

        # 4. the gallery (the index's own memory) and the export
        gallery = _gather_verified(cache, kept, embed)
        cache_folder = cache.folder
        del cache  # its key -> row dict
        catalog_manifest = {
            "source": os.path.abspath(catalog) if isinstance(catalog, str) else None,
            **counts,
            "skipped_examples": skipped[:_MAX_NAMED],
            "embedding_cache": os.path.abspath(cache_folder),
        }
        export = _publish(
            model, gallery, kept, output_base, number, catalog_manifest, preprocessing=preprocessing,
            k=k, min_recall=min_recall, index_options=index_options, force=force,
            portable_export_base=portable_output_base, extra_manifest=extra_manifest,
            match_threshold=match_threshold,
        )
    return CatalogIndexResult(export, counts, skipped)


def index_embeddings(
    model: Any,
    embeddings: str,
    output_base: str,
    *,
    portable_output_base: str | None = None,
    k: int = 10,
    min_recall: float = 0.95,
    index_options: Any = None,
    version: int | None = None,
    force: bool = False,
    extra_manifest: dict[str, Any] | None = None,
) -> CatalogIndexResult:
    """Publish catalog embeddings computed elsewhere as the next version of `output_base`.

    ``embeddings`` is a folder written by `atl embed` / `atl_keras.beam.embed_catalog`
    (`atl_keras.embedding_files`). Same index, recall gate, manifest, rows assets and
    versioning as `index_catalog`; the rows keep the catalog's order.

    Raises:
        CatalogError: the embeddings were made by other weights or another preprocessing
            than `model`'s (nothing is written).
    """
    from atl_keras.embedding import weights_fingerprint
    from atl_keras.embedding_files import read_embedding_files
    from atl_keras.export import reserve_version
    from atl_keras.preprocessing import Preprocessing

    model = _load_model(model)
    rows, gallery, manifest = read_embedding_files(embeddings)
    if manifest.get("model_sha256") != weights_fingerprint(model):
        raise CatalogError(
            f"The embeddings in {embeddings} were made by another model (weights sha256 "
            f"{str(manifest.get('model_sha256'))[:12]}…, this model's {weights_fingerprint(model)[:12]}…); "
            "give the model the export was made from, or embed the catalog again.")
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    if preprocessing.image_shape != Preprocessing.for_model(model).image_shape:
        raise CatalogError(f"The embeddings were made at {preprocessing.image_shape}, the model takes "
                           f"{Preprocessing.for_model(model).image_shape}.")
    if not rows:
        raise CatalogError(f"{embeddings} holds no embedded row; nothing to index.")
    reasons = manifest.get("counts", {}).get("reasons", {})
    counts = {
        "rows": int(manifest.get("counts", {}).get("rows", len(rows))), "indexed": len(rows),
        "embedded": len(rows), "cached": 0, "added": 0, "removed": 0,
        "skipped_missing": int(reasons.get("missing or empty", 0)),
        "skipped_corrupt": sum(int(v) for r, v in reasons.items() if r != "missing or empty"),
    }
    skipped = list(manifest.get("skipped_examples", []))
    with reserve_version(output_base, version, force=force, portable_export_base=portable_output_base) as number:
        catalog_manifest = {"source": manifest.get("catalog"), **counts, "skipped_examples": skipped[:_MAX_NAMED],
                            "embeddings": embeddings if "://" in embeddings else os.path.abspath(embeddings),
                            "embedded_by": manifest.get("runner")}
        export = _publish(
            model, gallery, rows, output_base, number, catalog_manifest, preprocessing=preprocessing,
            k=k, min_recall=min_recall, index_options=index_options, force=force,
            portable_export_base=portable_output_base, extra_manifest=extra_manifest,
        )
    return CatalogIndexResult(export, counts, skipped)


def _load_model(model: Any) -> Any:
    """A Keras model, or the one saved at a ``.keras`` path."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    if not os.path.exists(model):
        raise FileNotFoundError(f"No model at {os.fspath(model)!r}; train one with `atl train`.")
    import keras

    from atl_keras.losses.registry import import_losses
    import atl_keras.model  # noqa: F401  (registers ATLModel)

    import_losses()  # registers the losses
    return keras.models.load_model(model)


def _publish(
    model: Any,
    gallery: np.ndarray,
    kept: list[CatalogRow],
    output_base: str,
    number: int,
    catalog_manifest: dict[str, Any],
    *,
    extra_manifest: dict[str, Any] | None,
    **export_options: Any,
) -> Any:
    """Export ``gallery [N, D]`` of the rows ``kept`` as the reserved version ``number``.

    Writes the rows asset and the per-row metadata; ``kept`` is emptied (the row objects go
    before the index build). ``export_options``: as `atl_keras.export.export_embeddings`.
    """
    from atl_keras.export import GalleryRows, export_embeddings

    with tempfile.TemporaryDirectory(dir=output_base, prefix=".tmp-rows-") as staging:
        rows_path = os.path.join(staging, ROWS_NAME)
        with open(rows_path, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps({"image": r.image, "item_id": r.item_id, "image_id": r.image_id,
                                    "sha256": r.sha256}, ensure_ascii=False) + "\n")
        # what the export needs of the rows; the row objects (paths, hashes) go before the index build
        item_ids = [r.item_id for r in kept]
        gallery_rows = GalleryRows([r.image_id for r in kept], [
            r.metadata if isinstance(r.metadata, str) else json.dumps(r.metadata, ensure_ascii=False, sort_keys=True)
            for r in kept])
        kept.clear()
        _trim_heap()
        return export_embeddings(
            model, gallery, item_ids, output_base, number, reserved=True,
            extra_manifest={"catalog": catalog_manifest, **(extra_manifest or {})},
            gallery_rows=gallery_rows, extra_assets={ROWS_NAME: rows_path}, **export_options,
        )


def _gather_verified(
    cache: EmbeddingCache,
    rows: Sequence[CatalogRow],
    embed: Callable[[Sequence[str], Callable[[np.ndarray, np.ndarray], None]], None],
) -> np.ndarray:
    """``[len(rows), D]`` cached vectors of `rows`; records damaged since the cache was opened
    are embedded again (with a warning) and the gather is retried once."""
    keys = [r.sha256 for r in rows]
    for attempt in range(2):
        try:
            return cache.gather(keys)
        except CacheDamaged as damage:
            if attempt:
                raise
            warnings.warn(f"{damage} Embedding those images again.", stacklevel=3)
            damaged = set(damage.keys)
            paths = {r.sha256: r.image for r in rows if r.sha256 in damaged}
            keys_todo, paths_todo = list(paths), list(paths.values())
            embed(paths_todo, lambda indices, vectors: cache.append([keys_todo[i] for i in indices], vectors))
    raise AssertionError("unreachable")


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim; elsewhere a no-op).

    Decoding, hashing and the row tables free memory into the main thread's malloc arena;
    the index build allocates its large transient from ScaNN's worker threads (other
    arenas), which cannot reuse it, so without this both count in the peak.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _first_occurrences(rows: Iterable[CatalogRow], keys: set[str]) -> Iterable[CatalogRow]:
    """Rows whose content was embedded in this run (the first row of each embedded hash)."""
    seen: set[str] = set()
    for row in rows:
        if row.sha256 in keys and row.sha256 not in seen:
            seen.add(row.sha256)
            yield row


def _unknown_removals(unknown: list[str], remove: Any, where: Any) -> str:
    named = ", ".join(repr(u) for u in unknown[:_MAX_NAMED])
    more = f" and {len(unknown) - _MAX_NAMED} more" if len(unknown) > _MAX_NAMED else ""
    source = f"the latest version of {where}" if isinstance(where, str) else "the catalog"
    hint = ""
    if isinstance(remove, str) and not os.path.isfile(remove) and (os.sep in remove or "." in remove):
        hint = f" No file {remove!r} exists (a --remove value that names a file is read as ids, one per line)."
    return (f"--remove: {len(unknown)} id(s) are neither an item id nor an image id of {source}: "
            f"{named}{more}. Nothing was published.{hint}")


def _bad_message(bad: list[dict[str, str]], total: int) -> str:
    named = ", ".join(f"{b['image']!r} ({b['reason']})" for b in bad[:_MAX_NAMED])
    more = f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
    return (f"{len(bad)} of {total} catalog images are missing or cannot be decoded: {named}{more}. "
            "Fix or remove these rows, or drop --strict to skip them (they are counted in the manifest).")

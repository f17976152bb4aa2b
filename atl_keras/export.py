"""SavedModel export: image model + tuned ScaNN gallery index + id map + manifest, one version.

`export_model` (pixels in memory) and `export_embeddings` (gallery already embedded, as
`atl_keras.catalog_index` streams it) write `<export_base>/<version>/` exactly as TF
Serving expects, so the model and its index can never drift apart. Signatures:

- `serving_default`: `images` tf.string [B] (encoded JPEG/PNG/GIF/BMP) -> `embeddings` [B, D]
- `embed_pixels`:    `pixels` float32 [B, H, W, C] in [0, 255] -> `embeddings` [B, D]
- `retrieve`:        `images` tf.string [B], `k` int32 [] -> `ids` tf.string [B, k],
                     `scores` float32 [B, k] (dot product = cosine), `indices` int32 [B, k]
                     (ScaNN, parallel batched search; the server needs ScaNN's ops:
                     `import scann` before loading)
- `retrieve_exact`:  same, pure TensorFlow brute-force top-k (the package's one exact search,
                     `atl_keras.search.exact.score_top_k`: ties by gallery position)

Both retrieve signatures run the index through the `atl_keras.search` seam
(`atl_keras.search.store.IndexModule`). With ``match_threshold=`` (a threshold calibrated by
`atl_keras.search.RetrievalIndex.calibrate`) they add ``match`` bool [B, k]
(``score >= threshold``) and the manifest records it.

Catalog exports (`gallery_rows=`) add `image_ids` tf.string [B, k] (the row's image id) and
`metadata` tf.string [B, k] (the row's metadata columns as a JSON object) to both retrieve
signatures, read from the assets `gallery_image_ids.txt` / `gallery_metadata.jsonl`.

Encoded images are decoded with `atl_keras.preprocessing` (the same function as the
training decode), configured by `preprocessing=` and recorded in the manifest.

Stock TF Serving loads every function of a SavedModel, so an export holding ScaNN's
custom ops does not load there at all. `include_scann=False` writes the portable
variant (no `retrieve`, no ScaNN ops) that stock TF Serving serves via `retrieve_exact`;
`portable_export_base=` writes both from one embedding pass and publishes them as a pair.

Durability:
- The version number is reserved before any work (an exclusive `.reserved-N` file in the
  base, and in the portable base), so concurrent exports get distinct versions, and an
  explicit `version=` already being written by another export fails at once.
- Writes go to hidden `.tmp-*` directories renamed to the version number only once
  complete, so a crash never leaves a half-written version.
- A main + portable pair is published through a journal (`.pair-N.json` in both bases,
  written once both temporaries are complete): a kill between the two renames is rolled
  forward by the next export into either base (`repair_pairs`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from atl_keras.data.source_images import SourceImages
from atl_keras.embedding import embed_images, weights_fingerprint
from atl_keras.index import ScannConfig
from atl_keras.preprocessing import Preprocessing, decode_batch
from atl_keras.search.scann import IndexOptions, RecallGateError, ScannSearcher
from atl_keras.search.store import IndexModule

MANIFEST_NAME = "manifest.json"
IDS_NAME = "gallery_ids.txt"
IMAGE_IDS_NAME = "gallery_image_ids.txt"
METADATA_NAME = "gallery_metadata.jsonl"
SIGNATURES = ("serving_default", "embed_pixels", "retrieve", "retrieve_exact")
PORTABLE_SIGNATURES = ("serving_default", "embed_pixels", "retrieve_exact")
#: Temporary export directories (`.tmp-*`, `.old-*`) left by a killed export are removed by
#: the next export into the same base once they are this old (a live export is never that slow).
STALE_TEMPORARY_SECONDS = 6 * 3600
#: A `.pair-*.json.tmp` journal is renamed within one call; one this old was left by a kill.
STALE_JOURNAL_SECONDS = 600
RESERVATION_PREFIX = ".reserved-"
JOURNAL_PREFIX = ".pair-"


class ExportError(ValueError):
    """The export was refused; nothing was written."""


@dataclass
class ExportResult:
    """Where a version was written and what its manifest says."""

    path: str
    version: int
    manifest: dict[str, Any]
    portable_path: str | None = None


@dataclass
class GalleryRows:
    """Per-row catalog data returned with search results: image ids and metadata objects.

    A metadata entry is a dict or its one-line JSON text (`atl index` passes text: ~60 B per
    row instead of a ~250 B dict held through the index build).
    """

    image_ids: list[str]
    metadata: list[dict[str, Any] | str] = field(default_factory=list)


# ------------------------------------------------------------------------------- versions
def existing_versions(export_base: str) -> list[int]:
    """Integer version directories under `export_base`, ascending."""
    if not os.path.isdir(export_base):
        return []
    return sorted(
        int(name)
        for name in os.listdir(export_base)
        if name.isdigit() and os.path.isdir(os.path.join(export_base, name))
    )


def _reservations(export_base: str) -> dict[int, str]:
    if not os.path.isdir(export_base):
        return {}
    out = {}
    for name in os.listdir(export_base):
        number = name[len(RESERVATION_PREFIX):]
        if name.startswith(RESERVATION_PREFIX) and number.isdigit():
            out[int(number)] = os.path.join(export_base, name)
    return out


def next_version(export_base: str, *more_bases: str) -> int:
    """One more than the largest existing or reserved version in the bases, or 1."""
    used = [0]
    for base in (export_base, *more_bases):
        used += existing_versions(base)
        used += [number for number, path in _reservations(base).items() if _reservation_is_live(path)]
    return max(used) + 1


def _reservation_is_live(path: str) -> bool:
    """A reservation is live unless its owner process is gone (or it is very old)."""
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
        age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # being written right now
    if age > STALE_TEMPORARY_SECONDS:
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True


def _try_reserve(export_base: str, version: int) -> str | None:
    """Create `.reserved-<version>` exclusively; None when another live export holds it."""
    path = os.path.join(export_base, f"{RESERVATION_PREFIX}{version}")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _reservation_is_live(path):
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # its export was killed
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}, f)
        return path
    return None


@contextlib.contextmanager
def reserve_version(
    export_base: str,
    version: int | None = None,
    *,
    force: bool = False,
    portable_export_base: str | None = None,
) -> Iterator[int]:
    """Reserve a version number in `export_base` (and the portable base) for one export.

    ``version=None`` takes the next number no other export has published or reserved. An
    explicit `version` that exists (without `force`) or that another live export holds
    raises `ExportError` before any work. The reservation is released on exit.
    """
    bases = [export_base] + ([portable_export_base] if portable_export_base else [])
    for base in bases:
        if os.path.exists(base) and not os.path.isdir(base):
            raise ExportError(f"{base} exists and is not a directory; choose another output base.")
        os.makedirs(base, exist_ok=True)
        repair_pairs(base)
    held: list[str] = []
    try:
        candidate = version if version is not None else next_version(*bases)
        while True:
            for base in bases:
                if os.path.exists(os.path.join(base, str(candidate))) and not (force and version is not None):
                    if version is not None:
                        raise ExportError(
                            f"{os.path.join(base, str(candidate))} already exists; choose another "
                            "version or pass force=True (--force) to replace it."
                        )
                    break
                path = _try_reserve(base, candidate)
                if path is None:
                    if version is not None:
                        raise ExportError(
                            f"Another export is writing version {candidate} of {base} right now; "
                            "wait for it or choose another version. Nothing was written."
                        )
                    break
                held.append(path)
            else:
                break
            for path in held:
                os.unlink(path)
            held = []
            candidate = max(candidate + 1, next_version(*bases))
        yield candidate
    finally:
        for path in held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


# ------------------------------------------------------------------------------- module
class RetrievalModule(IndexModule):
    """The exported object: decode -> embed -> search, over one fixed gallery.

    An `atl_keras.search.store.IndexModule` (the searcher's state, the exact rows, ids, row
    tables, match threshold) with the model in front. The gallery vectors are stored once:
    inside the ScaNN state when it keeps them (its `dataset` variable, original row order),
    else in the exact state.
    """

    def __init__(
        self,
        model: keras.Model,
        gallery_embeddings: np.ndarray,
        gallery_ids: Sequence[str],
        searcher: Any,
        preprocessing: Preprocessing,
        row_assets: dict[str, str] | None = None,
        match_threshold: float | None = None,
    ) -> None:
        super().__init__(searcher, gallery_ids, embeddings=gallery_embeddings, row_assets=row_assets,
                         match_threshold=match_threshold, name="atl_retrieval")
        self.model = model
        self.preprocessing = preprocessing
        height, width, channels = preprocessing.image_shape
        query = [tf.TensorSpec([None], tf.string, name="images"), tf.TensorSpec([], tf.int32, name="k")]

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serving_default(images):
            return {"embeddings": self._embed(self._decode(images))}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, height, width, channels], tf.float32, name="pixels")
            ]
        )
        def embed_pixels(pixels):
            return {"embeddings": self._embed(pixels)}

        @tf.function(input_signature=query)
        def retrieve(images, k):
            return self.search(self._embed(self._decode(images)), k)

        @tf.function(input_signature=query)
        def retrieve_exact(images, k):
            return self.search(self._embed(self._decode(images)), k, exact=True)

        self.serving_default = serving_default
        self.embed_pixels = embed_pixels
        self.retrieve_exact = retrieve_exact
        self.signature_names = SIGNATURES if self.has_searcher else PORTABLE_SIGNATURES
        if self.has_searcher:
            self.retrieve = retrieve

    def _decode(self, images: tf.Tensor) -> tf.Tensor:
        """Encoded images [B] -> float32 pixels [B, H, W, C] in [0, 255] (`preprocessing`)."""
        return decode_batch(images, self.preprocessing)

    def _embed(self, pixels: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.model(pixels, training=False), tf.float32)

    def signatures(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.signature_names}


# ------------------------------------------------------------------------------- checks
def _embed(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Pixels ``[N, H, W, C]`` -> ``[N, D]`` float32 (`atl_keras.embedding`)."""
    return embed_images(model, images, batch_size=batch_size, strict=True).vectors


def _model_image_shape(model: keras.Model) -> tuple | None:
    shape = getattr(model, "image_shape", None) or (model.input_shape[1:] if hasattr(model, "input_shape") else None)
    return tuple(shape) if shape else None


def _pixels_or_files(images: Any) -> Any:
    """Pixel arrays as they are (cast per batch when embedded, no float32 copy of the whole
    set); `SourceImages` stay files and are decoded batch by batch."""
    return images if isinstance(images, SourceImages) else np.asarray(images)


def _validate_gallery(
    model: keras.Model, gallery_images: np.ndarray | SourceImages, gallery_ids: Sequence[Any]
) -> tuple[int, int, int]:
    images = _pixels_or_files(gallery_images)
    if images.ndim != 4:
        raise ExportError(
            f"gallery_images must be [N, H, W, C] pixels, got shape {images.shape}."
        )
    if len(images) == 0:
        raise ExportError("The gallery is empty: give at least one gallery image.")
    if len(gallery_ids) != len(images):
        raise ExportError(
            f"{len(gallery_ids)} gallery ids for {len(images)} gallery images; "
            "give exactly one id per image."
        )
    expected = _model_image_shape(model)
    if expected and all(d is not None for d in expected) and tuple(images.shape[1:]) != expected:
        raise ExportError(
            f"Gallery images have shape {images.shape[1:]}, the model expects {expected}."
        )
    _validate_ids(gallery_ids)
    return tuple(int(x) for x in images.shape[1:])


def _validate_ids(ids: Sequence[Any], what: str = "Gallery id") -> None:
    for item in ids:
        text = str(item)
        if "\n" in text or "\r" in text or text == "":
            raise ExportError(f"{what} {item!r} is empty or contains a newline.")


def _validate_metadata(metadata: Sequence[Any], rows: int) -> None:
    """Metadata entries: none at all, or one per row, each a dict or one line of a JSON object."""
    if metadata and len(metadata) != rows:
        raise ExportError(f"{len(metadata)} metadata entries for {rows} gallery rows; give one per row.")
    for row, entry in enumerate(metadata):
        if isinstance(entry, str):
            try:
                ok = "\n" not in entry and isinstance(json.loads(entry), dict)
            except ValueError:
                ok = False
            if not ok:
                raise ExportError(f"Metadata of row {row} is not one line of a JSON object: {entry[:80]!r}.")
        elif not isinstance(entry, dict):
            raise ExportError(f"Metadata of row {row} must be a dict or its JSON text, got {type(entry).__name__}.")


def _check_options(version: int | None, k: int, min_recall: float) -> None:
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ExportError(f"version must be a positive integer, got {version!r}.")
    if k < 1:
        raise ExportError(f"k must be >= 1, got {k}.")
    if not 0.0 <= min_recall <= 1.0:
        raise ExportError(f"min_recall must be in [0, 1], got {min_recall}.")


def _resolve_preprocessing(model: keras.Model, preprocessing: Preprocessing | None, image_shape=None) -> Preprocessing:
    if preprocessing is None:
        shape = image_shape or _model_image_shape(model)
        if not shape or len(shape) != 3 or any(d is None for d in shape):
            raise ExportError("Cannot tell the model's input image size; pass preprocessing=Preprocessing(...).")
        return Preprocessing(image_size=(int(shape[0]), int(shape[1])), channels=int(shape[2]))
    expected = _model_image_shape(model)
    if expected and all(d is not None for d in expected) and tuple(preprocessing.image_shape) != tuple(expected):
        raise ExportError(
            f"preprocessing gives images of shape {preprocessing.image_shape}, the model expects {expected}."
        )
    return preprocessing


# ------------------------------------------------------------------------------- export
def export_model(
    model: keras.Model,
    gallery_images: np.ndarray | SourceImages,
    gallery_ids: Sequence[Any],
    export_base: str,
    version: int | None = None,
    *,
    query_images: np.ndarray | SourceImages | None = None,
    k: int = 10,
    min_recall: float = 0.95,
    scann_config: ScannConfig | None = None,
    index_options: IndexOptions | None = None,
    force: bool = False,
    batch_size: int = 256,
    extra_manifest: dict[str, Any] | None = None,
    seed: int = 0,
    include_scann: bool = True,
    preprocessing: Preprocessing | None = None,
    portable_export_base: str | None = None,
    match_threshold: float | None = None,
) -> ExportResult:
    """Export `model` with a tuned ScaNN index over `gallery_images [N, H, W, C]`.

    Args:
        model: a trained embedding model (`ATLModel` or any Keras model mapping pixels in
            [0, 255] to unit-norm embeddings [B, D]).
        gallery_images: catalog images; `gallery_ids` (length N) names each one.
        export_base: e.g. `saved_models/NAME`; the version lands in `export_base/<version>`.
        version: integer version; default the next free one (reserved before any work).
        query_images: held-out queries for measuring set recall@k against exact search;
            default 1000 gallery images, each excluded from its own results.
        min_recall: refuse the export (nothing written) when the index's set recall@k is
            lower. Pass 0 to accept any recall.
        scann_config: a complete index configuration (no tuning); else `index_options`
            (knobs to fix, the rest tuned to `min_recall`).
        force: replace an existing version directory.
        include_scann: False writes only the portable variant for stock TF Serving (no
            `retrieve` signature, no ScaNN ops, no recall check).
        preprocessing: how encoded images are decoded in the signatures (default: the
            model's input size, ``resize="pad"``, ``pad_value=255``, as training decodes).
        portable_export_base: also write the portable variant as the same version there;
            the two are published as a pair.
        match_threshold: a calibrated score threshold (`RetrievalIndex.calibrate`): written
            into the manifest, and the retrieve signatures add ``match`` bool [B, k]
            (``score >= match_threshold``).

    Returns:
        `ExportResult(path, version, manifest, portable_path)`.
    """
    _check_options(version, k, min_recall)
    image_shape = _validate_gallery(model, gallery_images, gallery_ids)
    preprocessing = _resolve_preprocessing(model, preprocessing, image_shape)
    with reserve_version(export_base, version, force=force, portable_export_base=portable_export_base) as number:
        gallery = _embed(model, _pixels_or_files(gallery_images), batch_size)
        queries = None
        if query_images is not None and include_scann:
            queries = _embed(model, _pixels_or_files(query_images), batch_size)
        return _export_reserved(
            model, gallery, [str(i) for i in gallery_ids], export_base, number,
            query_embeddings=queries, k=k, min_recall=min_recall, scann_config=scann_config,
            index_options=index_options, force=force, extra_manifest=extra_manifest, seed=seed,
            include_scann=include_scann, preprocessing=preprocessing,
            portable_export_base=portable_export_base, gallery_rows=None, extra_assets=None,
            match_threshold=match_threshold,
        )


def export_embeddings(
    model: keras.Model,
    gallery_embeddings: np.ndarray,
    gallery_ids: Sequence[Any],
    export_base: str,
    version: int | None = None,
    *,
    reserved: bool = False,
    query_embeddings: np.ndarray | None = None,
    k: int = 10,
    min_recall: float = 0.95,
    scann_config: ScannConfig | None = None,
    index_options: IndexOptions | None = None,
    force: bool = False,
    extra_manifest: dict[str, Any] | None = None,
    seed: int = 0,
    include_scann: bool = True,
    preprocessing: Preprocessing | None = None,
    portable_export_base: str | None = None,
    gallery_rows: GalleryRows | None = None,
    extra_assets: dict[str, str] | None = None,
    match_threshold: float | None = None,
) -> ExportResult:
    """`export_model` for a gallery already embedded: `gallery_embeddings [N, D]` float32.

    ``reserved=True`` means the caller holds `reserve_version(...)` for `version` (so it
    could reserve before embedding). `gallery_rows` adds image ids and metadata per row;
    `extra_assets` (file name -> path) are copied into each version's ``assets/``.
    """
    _check_options(version, k, min_recall)
    if reserved and version is None:
        raise ExportError("reserved=True needs the reserved version number.")
    gallery_ids = [str(i) for i in gallery_ids]
    _validate_ids(gallery_ids)
    preprocessing = _resolve_preprocessing(model, preprocessing)
    kwargs = dict(
        query_embeddings=query_embeddings, k=k, min_recall=min_recall, scann_config=scann_config,
        index_options=index_options, force=force, extra_manifest=extra_manifest, seed=seed,
        include_scann=include_scann, preprocessing=preprocessing,
        portable_export_base=portable_export_base, gallery_rows=gallery_rows,
        extra_assets=extra_assets, match_threshold=match_threshold,
    )
    gallery = np.ascontiguousarray(gallery_embeddings, dtype=np.float32)
    if reserved:
        return _export_reserved(model, gallery, gallery_ids, export_base, version, **kwargs)
    with reserve_version(export_base, version, force=force, portable_export_base=portable_export_base) as number:
        return _export_reserved(model, gallery, gallery_ids, export_base, number, **kwargs)


def _export_reserved(
    model: keras.Model,
    gallery: np.ndarray,
    gallery_ids: list[str],
    export_base: str,
    version: int,
    *,
    query_embeddings: np.ndarray | None,
    k: int,
    min_recall: float,
    scann_config: ScannConfig | None,
    index_options: IndexOptions | None,
    force: bool,
    extra_manifest: dict[str, Any] | None,
    seed: int,
    include_scann: bool,
    preprocessing: Preprocessing,
    portable_export_base: str | None,
    gallery_rows: GalleryRows | None,
    extra_assets: dict[str, str] | None,
    match_threshold: float | None = None,
) -> ExportResult:
    from atl_keras.proxies import strip_proxies

    model = strip_proxies(model)  # a proxy head is training-only: never saved into an export
    if gallery.ndim != 2 or len(gallery) == 0:
        raise ExportError(f"The gallery is empty or not [N, D] (shape {gallery.shape}).")
    if len(gallery_ids) != len(gallery):
        raise ExportError(f"{len(gallery_ids)} gallery ids for {len(gallery)} embeddings; give one id per row.")
    if not np.all(np.isfinite(gallery)):
        raise ExportError("The model produced NaN/Inf gallery embeddings; check the model.")
    if gallery_rows is not None:
        if len(gallery_rows.image_ids) != len(gallery):
            raise ExportError("gallery_rows.image_ids must have one entry per gallery row.")
        _validate_ids(gallery_rows.image_ids, "Image id")
        _validate_metadata(gallery_rows.metadata, len(gallery))

    if match_threshold is not None and not np.isfinite(match_threshold):
        raise ExportError(f"match_threshold must be a finite score, got {match_threshold!r}.")
    index_manifest: dict[str, Any] = {"index": "exact (retrieve_exact only)"}
    searcher = None
    if include_scann:
        searcher = _build_checked_index(gallery, query_embeddings, k, min_recall, scann_config, index_options, seed)
        index_manifest = searcher.config()

    import atl_keras  # the package version, imported late to avoid a cycle

    common = {
        "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "package_version": atl_keras.__version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "model_sha256": weights_fingerprint(model),
        "model_class": type(model).__name__,
        "embedding_dim": int(gallery.shape[1]),
        "image_shape": list(preprocessing.image_shape),
        "preprocessing": preprocessing.to_dict(),
        "gallery_size": int(len(gallery)),
        "score": "dot_product (cosine similarity of unit vectors; higher is closer)",
        **({"match_threshold": float(match_threshold)} if match_threshold is not None else {}),
    }
    staging = os.path.join(export_base, f".tmp-{version}-{uuid.uuid4().hex[:8]}-rows")
    temporaries: list[str] = [staging]
    try:
        row_assets = _write_row_assets(staging, gallery_rows) if gallery_rows is not None else None
        targets = [(export_base, searcher)]
        if portable_export_base:
            targets.append((portable_export_base, None))
        written = []
        for base, index in targets:
            # the searcher's state (made once, by the first module) is the index from here on
            module = RetrievalModule(model, gallery, gallery_ids, index, preprocessing, row_assets, match_threshold)
            manifest = {
                "name": os.path.basename(os.path.normpath(base)),
                **common,
                **(index_manifest if index is not None else {"index": "exact (retrieve_exact only)"}),
                "signatures": list(module.signature_names),
                **({"catalog_outputs": sorted(row_assets)} if row_assets else {}),
                **(extra_manifest or {}),
            }
            tmp_path = _write_temporary(module, manifest, gallery_ids, base, version, extra_assets)
            temporaries.append(tmp_path)
            written.append((tmp_path, os.path.join(base, str(version)), manifest))
            del module
        del searcher
        _publish_all([(tmp, final) for tmp, final, _ in written], force)
    finally:
        for path in temporaries:
            if os.path.exists(path):
                shutil.rmtree(path, ignore_errors=True)
    return ExportResult(
        path=written[0][1], version=version, manifest=written[0][2],
        portable_path=written[1][1] if len(written) > 1 else None,
    )


def _write_row_assets(staging: str, rows: GalleryRows) -> dict[str, str]:
    os.makedirs(staging, exist_ok=True)
    assets = {"image_ids": os.path.join(staging, IMAGE_IDS_NAME)}
    with open(assets["image_ids"], "w", encoding="utf-8") as f:
        f.write("\n".join(rows.image_ids) + "\n")
    assets["metadata"] = os.path.join(staging, METADATA_NAME)
    with open(assets["metadata"], "w", encoding="utf-8") as f:
        metadata = rows.metadata or [{} for _ in rows.image_ids]
        for entry in metadata:
            if isinstance(entry, str):  # checked by _validate_metadata before the index build
                f.write(entry + "\n")
            else:
                f.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
    return assets


def _build_checked_index(
    gallery: np.ndarray,
    query_embeddings: np.ndarray | None,
    k: int,
    min_recall: float,
    scann_config: ScannConfig | None,
    index_options: IndexOptions | None,
    seed: int,
) -> ScannSearcher:
    """Tune (or build) the ScaNN searcher; refused (`ExportError`) below `min_recall` set recall@k."""
    try:
        return ScannSearcher.build(gallery, k=k, min_recall=min_recall, query_embeddings=query_embeddings,
                                   scann_config=scann_config, options=index_options, seed=seed)
    except RecallGateError as error:
        raise ExportError(str(error)) from None


# ------------------------------------------------------------------------------- publish
def _write_temporary(
    module: RetrievalModule,
    manifest: dict[str, Any],
    gallery_ids: list[str],
    export_base: str,
    version: int,
    extra_assets: dict[str, str] | None = None,
) -> str:
    """Save into a hidden temporary directory of `export_base`; returns its path."""
    os.makedirs(export_base, exist_ok=True)
    remove_stale_temporaries(export_base)
    tmp_path = os.path.join(export_base, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    try:
        tf.saved_model.save(module, tmp_path, signatures=module.signatures())
        assets = os.path.join(tmp_path, "assets")
        os.makedirs(assets, exist_ok=True)
        with open(os.path.join(assets, IDS_NAME), "w", encoding="utf-8") as f:
            f.write("\n".join(gallery_ids) + "\n")
        for name, source in (extra_assets or {}).items():
            shutil.copyfile(source, os.path.join(assets, name))
        with open(os.path.join(assets, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    return tmp_path


def _journal_paths(moves: list[tuple[str, str]]) -> list[str]:
    name = f"{JOURNAL_PREFIX}{os.path.basename(moves[0][1])}-{uuid.uuid4().hex[:8]}.json"
    return [os.path.join(os.path.dirname(final), name) for _, final in moves]


def _publish_all(moves: list[tuple[str, str]], force: bool) -> None:
    """Rename every finished temporary into place, as one pair (journaled when > 1)."""
    for _, final in moves:
        if os.path.exists(final) and not force:
            raise ExportError(f"{final} appeared during the export; not overwriting it.")
    journals = _journal_paths(moves) if len(moves) > 1 else []
    for journal in journals:
        tmp = f"{journal}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"moves": [[os.path.abspath(a), os.path.abspath(b)] for a, b in moves]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, journal)
    for tmp_path, final in moves:
        _publish(tmp_path, final, force)
    for journal in journals:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)


def repair_pairs(export_base: str) -> list[str]:
    """Finish main + portable pairs whose publish a killed export left half done.

    Every journal names complete temporaries and their final paths; a temporary still
    there is renamed into place (only if that version does not exist yet), then the
    journal is removed. Returns the version paths it published.
    """
    repaired: list[str] = []
    if not os.path.isdir(export_base):
        return repaired
    for name in sorted(os.listdir(export_base)):
        if not (name.startswith(JOURNAL_PREFIX) and name.endswith(".json")):
            continue
        journal = os.path.join(export_base, name)
        try:
            with open(journal, encoding="utf-8") as f:
                moves = json.load(f)["moves"]
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError):
            os.unlink(journal)  # torn journal: written before any rename, so nothing moved
            continue
        for tmp_path, final in moves:
            if os.path.isdir(tmp_path) and not os.path.exists(final):
                with contextlib.suppress(FileNotFoundError, OSError):
                    os.rename(tmp_path, final)
                    repaired.append(final)
        for _, final in moves:  # the twin journal in the other base
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(os.path.dirname(final), name))
    return repaired


def remove_stale_temporaries(export_base: str, max_age_seconds: float = STALE_TEMPORARY_SECONDS) -> list[str]:
    """Delete `.tmp-*` / `.old-*` directories older than `max_age_seconds` in `export_base`,
    `.reserved-N` files whose export is gone and `.pair-*.json.tmp` journals older than
    `STALE_JOURNAL_SECONDS` (a kill before the journal was complete: nothing was moved).

    They are what a killed export leaves behind (never a servable version: servers only load
    numeric directories). Younger ones may belong to an export still running and are kept.
    Returns the removed names.
    """
    removed = []
    now = time.time()
    for name in sorted(os.listdir(export_base)):
        path = os.path.join(export_base, name)
        if name.startswith(RESERVATION_PREFIX) and not _reservation_is_live(path):
            with contextlib.suppress(FileNotFoundError):  # its export was killed
                os.unlink(path)
                removed.append(name)
            continue
        if name.startswith(JOURNAL_PREFIX) and name.endswith(".json.tmp"):
            try:  # written and renamed within one call: only a killed export leaves one
                if now - os.path.getmtime(path) > STALE_JOURNAL_SECONDS:
                    os.unlink(path)
                    removed.append(name)
            except FileNotFoundError:
                pass
            continue
        if not name.startswith((".tmp-", ".old-")) or not os.path.isdir(path):
            continue
        try:
            age = now - os.path.getmtime(path)
        except FileNotFoundError:  # removed by a concurrent export
            continue
        if age > max_age_seconds:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _publish(tmp_path: str, final_path: str, force: bool) -> None:
    """Rename the finished export into place (replacing an old one only when forced)."""
    if os.path.exists(final_path):
        if not force:
            raise ExportError(f"{final_path} appeared during the export; not overwriting it.")
        trash = f"{os.path.dirname(final_path)}/.old-{os.path.basename(final_path)}-{uuid.uuid4().hex[:8]}"
        os.rename(final_path, trash)
        os.rename(tmp_path, final_path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp_path, final_path)


def load_manifest(version_path: str) -> dict[str, Any]:
    """The manifest of an exported version directory."""
    path = os.path.join(version_path, "assets", MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No {MANIFEST_NAME} in {version_path}/assets; not an atl export.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_export(version_path: str):
    """Load an exported version with `tf.saved_model.load` (ScaNN ops registered)."""
    return tf.saved_model.load(version_path)

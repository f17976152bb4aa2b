"""The one way images become embeddings: a stream of images -> tf.data -> model -> ``[N, D]``.

    result = embed_images(model, ["a.jpg", "b.png", ...])       # files (local or tf.io.gfile)
    result.vectors, result.kept, result.report.summary()         # float32 [n_kept, D], bool [N]
    for indices, vectors in embed_batches(model, encoded_bytes):  # streaming: int64 [b], float32 [b, D]
        ...
    weights_fingerprint(model)                                    # one sha256 of the weights

Sources (``images``):

- image files: a sequence of paths (``str`` / ``os.PathLike``; ``gs://`` etc. wherever
  TensorFlow's file systems reach), read with ``tf.io.read_file``;
- encoded images: a sequence of ``bytes`` (or a 1-D string array);
- pixels already preprocessed: a uint8/float array ``[N, H, W, C]`` at the model's input size;
- an `atl_keras.data.sources.ImageSource` (`FileImages`, `ShardImages`: rows of files or
  TFRecord shard records, read by graph ops);
- `atl_keras.data.SourceImages` (a source with its own preprocessing, as streamed datasets
  hold their evaluation rows): decoded with that preprocessing;
- a finite ``tf.data.Dataset`` of encoded images (scalar strings), of images ``[H, W, C]``
  or of batches ``[b, H, W, C]`` / ``(images, y, ...)``.

Files and encoded images are decoded with the ONE preprocessing of
`atl_keras.preprocessing` (as in training, the export and serving) in a parallel
``tf.data`` map (``num_parallel_calls=AUTOTUNE``, deterministic order), batched and
prefetched: memory holds a few batches of pixels, never the catalog's. The model is called
directly (one traced function per model), not through ``predict``, so a model built under
any ``tf.distribute`` strategy embeds locally; ``model`` may also be any callable
``pixels float32 [b, H, W, C] -> [b, D]`` (e.g. a loaded export's ``embed_pixels``).

Bad rows (missing, empty, undecodable, or declaring more than ``max_pixels`` pixels in their
header) are skipped, counted and summarised in an `EmbeddingReport`; ``strict=True`` raises
`atl_keras.data.images.ImageDecodeError` naming them instead.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from atl_keras.data.source_images import SourceImages
from atl_keras.preprocessing import DEFAULT_MAX_PIXELS, Preprocessing, decode_bounded

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Embeddings",
    "EmbeddingReport",
    "embed_batches",
    "embed_images",
    "weights_fingerprint",
]

_MAX_NAMED = 5


# ------------------------------------------------------------------------------ fingerprint
def weights_fingerprint(model: Any) -> str:
    """sha256 over the model's weight dtypes, shapes and bytes, in order.

    Weight *names* are left out: Keras numbers auto-generated names per process
    (``dense_3``), so the same weights loaded twice must give the same fingerprint. The
    export's manifest (``model_sha256``), the embedding cache of `atl index` and the
    Beam embedding files all record this value.
    """
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())  # convert_to_numpy warns under NumPy 2 (no copy=)
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------ report
@dataclass
class EmbeddingReport:
    """What happened to the rows of one embedding pass.

    ``skipped`` holds the row indices that gave no embedding (int64, in row order);
    ``examples`` the first few as ``{"index", "source", "reason"}``.
    """

    rows: int = 0
    embedded: int = 0
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    examples: list[dict[str, Any]] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: ``"3 of 500 images skipped (2 missing or empty, 1 cannot be decoded): 'a.jpg' ..."``."""
        if not len(self.skipped):
            return f"{self.embedded} of {self.rows} images embedded, none skipped."
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items()))
        named = ", ".join(f"{e['source']!r} ({e['reason']})" for e in self.examples)
        more = f" and {len(self.skipped) - len(self.examples)} more" if len(self.skipped) > len(self.examples) else ""
        return f"{len(self.skipped)} of {self.rows} images skipped ({reasons}): {named}{more}."


@dataclass
class Embeddings:
    """``vectors`` float32 ``[n_kept, D]`` of the rows where ``kept`` (bool ``[N]``) is True."""

    vectors: np.ndarray
    kept: np.ndarray
    report: EmbeddingReport


# ------------------------------------------------------------------------------ sources
def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _source_kind(images: Any) -> str:
    """'dataset', 'pixels', 'encoded' or 'paths'."""
    if isinstance(images, tf.data.Dataset):
        return "dataset"
    if hasattr(images, "read") and hasattr(images, "describe"):
        return "source"  # an atl_keras.data.sources.ImageSource (files or shard records)
    if isinstance(images, (str, bytes, os.PathLike)):
        raise TypeError(f"images must be a sequence of images, got a single {type(images).__name__} {images!r:.80}.")
    if isinstance(images, (np.ndarray, tf.Tensor)):
        if images.dtype == tf.string if isinstance(images, tf.Tensor) else images.dtype.kind in "SO":
            return "encoded"
        if len(images.shape) < 2:
            raise ValueError(f"A pixel array must be [N, H, W, C], got shape {tuple(images.shape)}.")
        return "pixels"  # (or any batch of model inputs [N, ...] for a model that is not an image model)
    first = images[0] if len(images) else None
    if first is None:
        return "paths"
    if isinstance(first, (bytes, bytearray)):
        return "encoded"
    if _is_path(first):
        return "paths"
    raise TypeError(
        f"images must be file paths, encoded image bytes, a [N, H, W, C] array or a tf.data.Dataset; "
        f"got a sequence of {type(first).__name__}."
    )


def _decoder(preprocessing: Preprocessing, max_pixels: int | None, read: Callable | None) -> Callable:
    def load(item: tf.Tensor, index: tf.Tensor):
        contents = read(item) if read is not None else item
        return tf.cast(decode_bounded(contents, preprocessing, max_pixels), tf.float32), index

    return load


def _check_pixels_shape(shape: Sequence[Any], preprocessing: Preprocessing | None) -> None:
    if preprocessing is not None and len(shape) >= 3 and tuple(int(d) for d in shape[-3:]) != preprocessing.image_shape:
        raise ValueError(
            f"Pixel arrays must already be preprocessed to the model input {preprocessing.image_shape}, "
            f"got images of shape {tuple(shape[-3:])}; pass the encoded images or files instead."
        )


def _pixel_batches(images: Any, preprocessing: Preprocessing | None, batch_size: int) -> Iterator[tuple[Any, np.ndarray]]:
    """Slices of an in-memory pixel array (no copy of the whole array)."""
    _check_pixels_shape(images.shape, preprocessing)
    for start in range(0, int(images.shape[0]), batch_size):
        chunk = images[start:start + batch_size]
        yield tf.cast(chunk, tf.float32), np.arange(start, start + int(chunk.shape[0]), dtype=np.int64)


def _dataset_batches(
    dataset: tf.data.Dataset, preprocessing: Preprocessing | None, batch_size: int, max_pixels: int | None
) -> tuple[tf.data.Dataset, bool]:
    """(batches of ``(pixels, index)``, whether rows can be dropped as bad)."""
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError("Cannot embed an infinite dataset (e.g. pk_dataset); pass a finite one.")
    spec = dataset.element_spec
    if isinstance(spec, (tuple, list)):
        dataset, spec = dataset.map(lambda *element: element[0]), spec[0]
    if isinstance(spec, dict):
        raise ValueError(f"Cannot embed a dataset of dicts (keys {sorted(spec)}); map it to images first.")
    if spec.dtype == tf.string:
        if preprocessing is None:
            raise ValueError("Pass preprocessing= to decode images: the model's input size is not known.")
        if spec.shape.rank == 1:
            dataset = dataset.unbatch()
        indexed = dataset.enumerate().map(lambda i, x: (x, i))
        return _decoded(indexed, preprocessing, batch_size, max_pixels, read=None), True
    if spec.shape.rank is None or spec.shape.rank < 1:
        raise ValueError(f"Cannot embed a dataset of {spec}; give encoded images, images [H, W, C] or batches.")
    if spec.shape.rank == 4 or preprocessing is None:  # batches (of images, or of a non-image model's inputs)
        dataset = dataset.unbatch()
    _check_pixels_shape(dataset.element_spec.shape, preprocessing)
    pixels = dataset.map(lambda x: tf.cast(x, tf.float32)).enumerate().map(lambda i, x: (x, i))
    return pixels.batch(batch_size).prefetch(2), False


def _decoded(
    indexed: tf.data.Dataset, preprocessing: Preprocessing, batch_size: int, max_pixels: int | None,
    read: Callable | None,
) -> tf.data.Dataset:
    """``(item, index)`` -> batches of ``(pixels float32 [b, H, W, C], index [b])``; failures dropped."""
    return (
        indexed.map(_decoder(preprocessing, max_pixels, read), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors(log_warning=False)
        .batch(batch_size)
        .prefetch(2)
    )


# ------------------------------------------------------------------------------ model
_forward_functions: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


def _forward(model: Any) -> Callable[[tf.Tensor], tf.Tensor]:
    """One traced ``pixels -> float32 embeddings`` function per model (no retracing per call)."""
    try:
        cached = _forward_functions.get(model)
    except TypeError:  # not weak-referenceable: a plain callable
        cached = None
    if cached is not None:
        return cached
    import keras

    if isinstance(model, keras.Model):
        model_ref = weakref.ref(model)  # the cache must not keep the model alive
        forward = tf.function(lambda x: tf.cast(model_ref()(x, training=False), tf.float32), reduce_retracing=True)
        _forward_functions[model] = forward
        return forward
    if not callable(model):
        raise TypeError(f"model must be a Keras model or a callable pixels -> embeddings, got {type(model).__name__}.")
    return lambda x: tf.cast(model(x), tf.float32)


def _preprocessing_of(model: Any, preprocessing: Preprocessing | None, decodes: bool) -> Preprocessing | None:
    """The given preprocessing, else the model's; None (pixels only) when the model has no fixed input."""
    if preprocessing is not None:
        return preprocessing
    try:
        return Preprocessing.for_model(model)
    except (AttributeError, TypeError, ValueError):
        if decodes:
            raise ValueError("Pass preprocessing= to decode images: the model's input size is not known.") from None
        return None


# ------------------------------------------------------------------------------ embedding
def embed_batches(
    model: Any,
    images: Any,
    *,
    preprocessing: Preprocessing | None = None,
    batch_size: int = 128,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    report: EmbeddingReport | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(indices int64 [b], vectors float32 [b, D])`` batches of ``images``' embeddings.

    ``indices`` are the rows of ``images`` (increasing; bad rows are missing). When the
    generator is exhausted, ``report`` (if given) holds the counts and the skipped rows.
    Memory: a few batches of pixels (``prefetch``), independent of the number of rows.

    Args:
        model: a Keras model, or a callable ``float32 [b, H, W, C] -> [b, D]``.
        images: see the module docstring.
        preprocessing: decode/resize rules (default `Preprocessing.for_model(model)`).
        batch_size: images per model call.
        max_pixels: skip images whose header declares more pixels (None: no bound).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    forward = _forward(model)
    if isinstance(images, SourceImages):  # evaluation rows kept as files: their own decode rules
        images, preprocessing = images.source, images.preprocessing
    if not isinstance(images, (tf.data.Dataset, np.ndarray, tf.Tensor, str, bytes)) and not hasattr(images, "__len__"):
        images = list(images)  # an iterator of paths / bytes: the row list is the index we keep
    kind = _source_kind(images)
    preprocessing = _preprocessing_of(model, preprocessing, decodes=kind in ("paths", "encoded", "source"))
    report = report if report is not None else EmbeddingReport()
    if kind == "pixels":
        batches: Any = _pixel_batches(images, preprocessing, batch_size)
        rows: int | None = int(images.shape[0])
    elif kind == "dataset":
        batches, _ = _dataset_batches(images, preprocessing, batch_size, max_pixels)
        rows = None
    elif kind == "source":
        rows = len(images)
        indexed = tf.data.Dataset.range(rows).map(lambda row: (row, row))
        batches = _decoded(indexed, preprocessing, batch_size, max_pixels, read=images.read)
    else:
        items = [os.fspath(p) for p in images] if kind == "paths" else images
        rows = len(items)
        indexed = tf.data.Dataset.from_tensor_slices(
            (tf.constant(items, tf.string) if rows else tf.zeros([0], tf.string), tf.range(rows, dtype=tf.int64)))
        batches = _decoded(indexed, preprocessing, batch_size, max_pixels,
                           read=tf.io.read_file if kind == "paths" else None)
    seen = 0
    gaps: list[np.ndarray] = []
    for pixels, indices in batches:
        indices = np.asarray(indices, np.int64)
        if not len(indices):
            continue
        if indices[-1] - seen + 1 != len(indices):  # rows seen..indices[-1] minus the ones that came out
            gaps.append(np.setdiff1d(np.arange(seen, indices[-1] + 1, dtype=np.int64), indices))
        seen = int(indices[-1]) + 1
        report.embedded += len(indices)
        yield indices, np.asarray(forward(pixels), np.float32)
    total = rows if rows is not None else seen
    if total > seen:
        gaps.append(np.arange(seen, total, dtype=np.int64))
    report.rows = total
    report.skipped = np.concatenate(gaps) if gaps else np.zeros(0, np.int64)
    _explain(report, images if kind in ("paths", "encoded", "source") else None, kind, max_pixels)


def _explain(report: EmbeddingReport, items: Any, kind: str, max_pixels: int | None) -> None:
    """Fill ``reasons`` / ``examples`` of the skipped rows (reads only their first bytes)."""
    from atl_keras.serving.image_header import image_dimensions

    report.reasons, report.examples = {}, []
    for index in report.skipped:
        source = "<row %d>" % index
        reason = "cannot be decoded"
        if items is not None:
            item = items[int(index)] if kind != "source" else None
            head = b""
            if kind == "source":
                source = items.describe(int(index))
                try:
                    head = bytes(items.read(tf.constant(int(index), tf.int64)).numpy())[: 1 << 16]
                except (tf.errors.OpError, ValueError):
                    head = b""
            elif kind == "paths":
                source = os.fspath(item)
                try:
                    with tf.io.gfile.GFile(source, "rb") as f:
                        head = f.read(1 << 16)
                except (tf.errors.OpError, OSError):
                    head = b""
            else:
                head = bytes(item.numpy() if hasattr(item, "numpy") else item)[: 1 << 16]
            size = image_dimensions(head) if head else None
            if not head:
                reason = "missing or empty"
            elif max_pixels and size is not None and size[0] * size[1] > max_pixels:
                reason = "too many pixels"
        report.reasons[reason] = report.reasons.get(reason, 0) + 1
        if len(report.examples) < _MAX_NAMED:
            report.examples.append({"index": int(index), "source": source, "reason": reason})


def embed_images(
    model: Any,
    images: Any,
    *,
    preprocessing: Preprocessing | None = None,
    batch_size: int = 128,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    strict: bool = False,
) -> Embeddings:
    """All embeddings of ``images`` in memory: `Embeddings(vectors [n_kept, D], kept [N], report)`.

    Streams like `embed_batches`; only the output ``[N, D]`` grows with the rows.

    Raises:
        ImageDecodeError: ``strict`` and some rows could not be embedded (all are named).
    """
    report = EmbeddingReport()
    chunks = [vectors for _, vectors in embed_batches(
        model, images, preprocessing=preprocessing, batch_size=batch_size, max_pixels=max_pixels, report=report)]
    if strict and len(report.skipped):
        from atl_keras.data.images import ImageDecodeError

        raise ImageDecodeError(report.summary() + " Fix or remove these rows, or pass strict=False to skip them.",
                               [e["source"] for e in report.examples], report.skipped.tolist())
    kept = np.ones(report.rows, bool)
    kept[report.skipped] = False
    if chunks:
        vectors = np.concatenate(chunks, axis=0)
    else:
        dim = getattr(model, "embedding_dim", None) or 0
        vectors = np.zeros((0, int(dim)), np.float32)
    return Embeddings(vectors, kept, report)

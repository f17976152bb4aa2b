"""The searchable gallery as SavedModel state: what an export version and `RetrievalIndex.save` hold.

`IndexModule` keeps a searcher's state (``searcher_state``: the ScaNN index), the exact
search's rows (``exact_state``: shared with the ScaNN state when it keeps the float rows),
the gallery ids, per-row assets (image ids, metadata) and an optional match threshold. The
export's `RetrievalModule` is an `IndexModule` with a model in front, so a saved index and
an export version have the same variables and assets, and `RetrievalIndex.load` reads both.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from atl_keras.search.exact import ExactState, loaded_exact_rows

__all__ = ["IndexModule", "line_table", "load_index", "loaded_rows", "save_index"]


def line_table(asset: tf.saved_model.Asset) -> tf.lookup.StaticHashTable:
    """Line number (int64) -> line text of an asset file."""
    initializer = tf.lookup.TextFileInitializer(
        asset, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE
    )
    return tf.lookup.StaticHashTable(initializer, default_value="")


class IndexModule(tf.Module):
    """A gallery index as a ``tf.Module``: search it in graph mode with `search`.

    Args:
        searcher: a `Searcher` (its state is saved) or None (exact search only).
        embeddings: the gallery rows ``[N, D]`` (default ``searcher.embeddings``).
        gallery_ids: ``N`` item ids (the ``ids`` output).
        row_assets: output name -> a text file with one line per row (``image_ids``, ``metadata``).
        match_threshold: results scoring at least this are flagged in a ``match`` output.
    """

    def __init__(
        self,
        searcher: Any,
        gallery_ids: Sequence[str],
        *,
        embeddings: np.ndarray | None = None,
        row_assets: dict[str, str] | None = None,
        match_threshold: float | None = None,
        name: str = "atl_index",
    ) -> None:
        super().__init__(name=name)
        embeddings = searcher.embeddings if embeddings is None else embeddings
        self.embedding_dim = int(embeddings.shape[1])
        self._searcher = searcher if searcher is not None and searcher.kind != "exact" else None
        rows_from = None
        if self._searcher is not None:
            self.searcher_state = self._searcher.to_state()
            holds_rows = getattr(self._searcher, "holds_rows", None)
            rows_from = self.searcher_state if holds_rows is not None and holds_rows(self.searcher_state) else None
        self.exact_state = ExactState(embeddings, rows_from)
        self.gallery_ids = tf.Variable(tf.constant(list(gallery_ids), dtype=tf.string), trainable=False,
                                       name="gallery_ids")
        self.row_tables = {
            output: line_table(tf.saved_model.Asset(path)) for output, path in (row_assets or {}).items()
        }
        self.has_threshold = match_threshold is not None
        if match_threshold is not None:
            self.match_threshold = tf.Variable(float(match_threshold), dtype=tf.float32, trainable=False,
                                               name="match_threshold")

    @property
    def has_searcher(self) -> bool:
        return self._searcher is not None

    def search(self, embeddings: tf.Tensor, k: tf.Tensor, exact: bool = False) -> dict[str, tf.Tensor]:
        """Graph search: ``embeddings [B, D]``, ``k`` -> ``ids``, ``scores``, ``indices`` ``[B, k]``
        (+ the row outputs, + ``match`` bool ``[B, k]`` with a threshold)."""
        if exact or self._searcher is None:
            indices, scores = self.exact_state.top_k(embeddings, k)
        else:
            indices, scores = self._searcher.state_top_k(self.searcher_state, embeddings, k)
        indices = tf.cast(indices, tf.int32)
        safe = tf.maximum(indices, 0)  # ScaNN pads with -1 when it finds fewer than k
        scores = tf.cast(scores, tf.float32)
        out = {
            "ids": tf.where(indices >= 0, tf.gather(self.gallery_ids, safe), ""),
            "scores": scores,
            "indices": indices,
        }
        for output, table in self.row_tables.items():
            out[output] = table.lookup(tf.cast(indices, tf.int64))
        if self.has_threshold:
            out["match"] = tf.logical_and(indices >= 0, scores >= self.match_threshold)
        return out

    def lookup_signatures(self) -> dict[str, Any]:
        """``lookup`` (``embeddings [B, D]``, ``k``) and, with a searcher, ``lookup_exact``."""
        spec = [tf.TensorSpec([None, self.embedding_dim], tf.float32, name="embeddings"),
                tf.TensorSpec([], tf.int32, name="k")]

        @tf.function(input_signature=spec)
        def lookup(embeddings, k):
            return self.search(embeddings, k)

        @tf.function(input_signature=spec)
        def lookup_exact(embeddings, k):
            return self.search(embeddings, k, exact=True)

        self.lookup, self.lookup_exact = lookup, lookup_exact
        return {"lookup": lookup, **({"lookup_exact": lookup_exact} if self._searcher is not None else {})}


def loaded_rows(loaded: Any) -> np.ndarray:
    """The gallery rows ``[N, D]`` of an `IndexModule` (or export) restored by ``tf.saved_model.load``."""
    if hasattr(loaded, "exact_state"):
        return loaded_exact_rows(loaded.exact_state)
    if hasattr(loaded, "gallery_embeddings"):  # exports written before the search seam
        return np.asarray(loaded.gallery_embeddings.numpy(), np.float32)
    return np.asarray(loaded.scann_state.dataset.numpy(), np.float32)


def save_index(
    path: str,
    searcher: Any,
    embeddings: np.ndarray,
    ids: Sequence[str],
    image_ids: Sequence[str],
    metadata: Sequence[dict[str, Any]],
    manifest: dict[str, Any],
    match_threshold: float | None = None,
) -> str:
    """Write an index directory at `path` (SavedModel with ``lookup`` signatures + assets, as an
    export version), atomically: built in a hidden temporary beside it, then renamed into place."""
    import shutil
    import uuid

    from atl_keras.export import IDS_NAME, MANIFEST_NAME, GalleryRows, _publish, _write_row_assets

    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = os.path.join(parent, f".tmp-{name}-{tag}-rows")
    tmp = os.path.join(parent, f".tmp-{name}-{tag}")
    try:
        row_assets = _write_row_assets(staging, GalleryRows(list(image_ids), list(metadata)))
        module = IndexModule(searcher, ids, embeddings=embeddings, row_assets=row_assets,
                             match_threshold=match_threshold)
        signatures = module.lookup_signatures()
        tf.saved_model.save(module, tmp, signatures=signatures)
        with open(os.path.join(tmp, "assets", IDS_NAME), "w", encoding="utf-8") as f:
            f.write("\n".join(ids) + "\n")
        with open(os.path.join(tmp, "assets", MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump({**manifest, "signatures": list(signatures)}, f, indent=2, sort_keys=True)
        _publish(tmp, path, force=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_lines(path: str) -> list[str] | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def load_index(path: str) -> tuple[Any, dict[str, Any], dict[str, Any], Any]:
    """Read an index directory or an export version: ``(loaded SavedModel, manifest, rows, searcher)``,
    rows = ``{"ids", "image_ids" (or None), "metadata" (or None)}``."""
    from atl_keras.export import IDS_NAME, IMAGE_IDS_NAME, METADATA_NAME, load_manifest
    from atl_keras.search.base import searcher_class

    manifest = load_manifest(path)
    kind = "scann" if manifest.get("index") == "scann" else "exact"
    if kind == "scann":
        import atl_keras.index  # noqa: F401  (registers ScaNN's ops before the load)
    loaded = tf.saved_model.load(path)
    embeddings = loaded_rows(loaded)
    assets = os.path.join(path, "assets")
    ids = _read_lines(os.path.join(assets, IDS_NAME))
    if ids is None or len(ids) != len(embeddings):
        raise ValueError(f"{path}: assets/{IDS_NAME} does not hold one id per gallery row; the index is damaged.")
    image_ids = _read_lines(os.path.join(assets, IMAGE_IDS_NAME))
    metadata_lines = _read_lines(os.path.join(assets, METADATA_NAME))
    metadata = None if metadata_lines is None else [json.loads(line or "{}") for line in metadata_lines]
    state = getattr(loaded, "searcher_state", None) or getattr(loaded, "scann_state", None)
    searcher = searcher_class(kind).from_state(state, embeddings, manifest)
    return loaded, manifest, {"ids": ids, "image_ids": image_ids, "metadata": metadata}, searcher

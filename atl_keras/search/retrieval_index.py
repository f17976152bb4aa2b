"""`RetrievalIndex`: product search from Python (index, lookup, calibrate, match, save/load).

    index = RetrievalIndex(model)                         # or RetrievalIndex.from_embeddings(emb, ids)
    index.add(["shoe-1a.jpg", "shoe-1b.jpg"], ids=["shoe-1", "shoe-1"])    # paths, bytes or pixels
    ids, scores = index.lookup(query_images, k=5)         # [Q, k] each; embeddings work too
    curve = index.calibrate(labelled_queries, expected_ids, target_precision=0.95)
    index.match(new_queries)                              # ["shoe-1", None, ...]
    index.save("saved_models/shop-index"); RetrievalIndex.load("saved_models/shop-index")

Rows are gallery images: each has an item id (several images may show one item), an image
id (default: the image's path when added from files, else ``"<id>#<n>"``) and a metadata
dict. Scores are dot products of unit embeddings (cosine; higher is closer).

The search runs through `atl_keras.search`'s `Searcher` seam: ``searcher="auto"`` is exact
below `atl_keras.index.BRUTE_FORCE_BELOW` rows and the tuned, recall-gated ScaNN index
above (when ScaNN is installed); ``"exact"`` / ``"scann"`` force one. The index is built on
the first lookup after a change (`add` / `remove`), so adding in many batches costs one build.

`save` writes the on-disk index an export version holds (a SavedModel of
`atl_keras.search.store.IndexModule` + ``assets/``: ids, image ids, metadata, manifest with
the match threshold), atomically; `load` reads such a directory or an export version
(``saved_models/NAME/N``, whose ``embed_pixels`` signature then embeds image queries).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from atl_keras.search.base import searcher_class
from atl_keras.search.calibration import Calibration, calibrate_threshold

__all__ = ["RetrievalIndex"]

INDEX_FORMAT = "atl-retrieval-index"


def _scann_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("scann") is not None


class RetrievalIndex:
    """An in-memory gallery index over a model's embeddings.

    Args:
        model: the embedding model for image inputs (a Keras model, or a callable
            ``pixels float32 [b, H, W, C] -> [b, D]`` with ``preprocessing=``); None for an
            index of embeddings only.
        searcher: ``"auto"``, ``"exact"`` or ``"scann"`` (see the module docstring).
        searcher_options: passed to the searcher's ``build`` (ScaNN: ``k``, ``min_recall``, ...).
        preprocessing: how files / encoded images are decoded (default: the model's input).
        batch_size: images per model call when embedding.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        searcher: str = "auto",
        searcher_options: dict[str, Any] | None = None,
        preprocessing: Any = None,
        batch_size: int = 128,
    ) -> None:
        if searcher != "auto":
            searcher_class(searcher)  # unknown kinds fail here, not at the first lookup
        self.model = model
        self.searcher_kind = searcher
        self.searcher_options = dict(searcher_options or {})
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self._embeddings = np.zeros((0, 0), np.float32)
        self.ids: list[str] = []
        self.image_ids: list[str] = []
        self.metadata: list[dict[str, Any]] = []
        self.threshold: float | None = None
        self.calibration: dict[str, Any] | None = None
        self._searcher: Any = None
        self._loaded: Any = None  # a loaded SavedModel whose functions this index still uses

    # ------------------------------------------------------------------ building
    @classmethod
    def from_embeddings(
        cls,
        embeddings: Any,
        ids: Sequence[Any],
        metadata: Sequence[dict[str, Any]] | None = None,
        *,
        image_ids: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> "RetrievalIndex":
        """An index of ``embeddings [N, D]`` named by ``ids`` (N item ids)."""
        index = cls(**kwargs)
        index.add_embeddings(embeddings, ids, metadata, image_ids=image_ids)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def embeddings(self) -> np.ndarray:
        """The gallery rows ``[N, D]``."""
        return self._embeddings

    def add(
        self,
        images: Any,
        ids: Sequence[Any],
        metadata: Sequence[dict[str, Any]] | None = None,
        *,
        image_ids: Sequence[str] | None = None,
    ) -> "RetrievalIndex":
        """Embed ``images`` with the model (streamed in batches, the model's preprocessing) and
        add them. ``images``: file paths, encoded bytes or pixels ``[N, H, W, C]``; an image that
        cannot be read or decoded raises (nothing is added)."""
        if image_ids is None and len(images) and isinstance(images[0], (str, os.PathLike)):
            image_ids = [os.fspath(path) for path in images]
        vectors = self._embed(images)
        return self.add_embeddings(vectors, ids, metadata, image_ids=image_ids)

    def add_embeddings(
        self,
        embeddings: Any,
        ids: Sequence[Any],
        metadata: Sequence[dict[str, Any]] | None = None,
        *,
        image_ids: Sequence[str] | None = None,
    ) -> "RetrievalIndex":
        """Add rows ``embeddings [n, D]`` with their item ids (and image ids, metadata)."""
        vectors = np.asarray(embeddings, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] == 0:
            raise ValueError(f"embeddings must be [n, D] with D >= 1, got shape {vectors.shape}.")
        if len(self.ids) and vectors.shape[1] != self._embeddings.shape[1]:
            raise ValueError(f"embeddings have dim {vectors.shape[1]}, the index holds dim "
                             f"{self._embeddings.shape[1]}; embed with the same model.")
        if not np.all(np.isfinite(vectors)):
            raise ValueError("embeddings contain NaN or Inf; check the model.")
        ids = [str(i) for i in ids]
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} embeddings; give one id per row.")
        metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in ids]
        if len(metadata) != len(ids):
            raise ValueError(f"{len(metadata)} metadata entries for {len(ids)} rows; give one per row.")
        if image_ids is None:
            counts: dict[str, int] = {}
            for item in self.ids:
                counts[item] = counts.get(item, 0) + 1
            image_ids = []
            for item in ids:
                counts[item] = counts.get(item, 0) + 1
                image_ids.append(f"{item}#{counts[item]}")
        image_ids = [str(i) for i in image_ids]
        if len(image_ids) != len(ids):
            raise ValueError(f"{len(image_ids)} image ids for {len(ids)} rows; give one per row.")
        for text in ids + image_ids:
            if not text or "\n" in text or "\r" in text:
                raise ValueError(f"Id {text!r} is empty or contains a newline.")
        taken = set(self.image_ids)
        for image_id in image_ids:
            if image_id in taken:
                raise ValueError(f"image id {image_id!r} is already in the index; image ids must be unique "
                                 "(remove it first to replace it).")
            taken.add(image_id)
        self._embeddings = vectors.copy() if not len(self.ids) else np.concatenate([self._embeddings, vectors])
        self.ids += ids
        self.image_ids += image_ids
        self.metadata += metadata
        self._invalidate()
        return self

    def remove(self, ids: Sequence[str] | str) -> int:
        """Drop the rows whose item id or image id is in ``ids``; returns how many were dropped."""
        drop = {ids} if isinstance(ids, str) else {str(i) for i in ids}
        keep = [row for row, (item, image) in enumerate(zip(self.ids, self.image_ids))
                if item not in drop and image not in drop]
        removed = len(self.ids) - len(keep)
        if removed:
            self._embeddings = self._embeddings[keep]
            self.ids = [self.ids[r] for r in keep]
            self.image_ids = [self.image_ids[r] for r in keep]
            self.metadata = [self.metadata[r] for r in keep]
            self._invalidate()
        return removed

    def _invalidate(self) -> None:
        release = getattr(self._searcher, "release", None)
        if release is not None:
            release()
        self._searcher = None

    def _kind(self) -> str:
        if self.searcher_kind != "auto":
            return self.searcher_kind
        from atl_keras.index import BRUTE_FORCE_BELOW  # noqa: PLC0415 - needs ScaNN: checked first

        return "scann" if _scann_available() and len(self) >= BRUTE_FORCE_BELOW else "exact"

    @property
    def searcher(self) -> Any:
        """The `Searcher` over the current rows (built on first use after a change)."""
        if not len(self):
            raise ValueError("The index is empty: add images or embeddings first.")
        if self._searcher is None:
            kind = self._kind()
            options = self.searcher_options if kind != "exact" else {}
            self._searcher = searcher_class(kind).build(self._embeddings, **options)
        return self._searcher

    # ------------------------------------------------------------------ queries
    def _embed(self, images: Any) -> np.ndarray:
        if self.model is None:
            raise ValueError("This index has no model: pass embeddings, or build it as RetrievalIndex(model).")
        from atl_keras.embedding import embed_images

        return embed_images(self.model, images, preprocessing=self.preprocessing, batch_size=self.batch_size,
                            strict=True).vectors

    def embed_queries(self, queries: Any) -> np.ndarray:
        """``queries`` as embeddings ``[Q, D]``: a float ``[Q, D]`` array is taken as embeddings,
        anything else (paths, encoded bytes, pixels ``[Q, H, W, C]``) is embedded by the model."""
        if isinstance(queries, np.ndarray) and queries.ndim == 2 and queries.dtype.kind == "f":
            vectors = queries.astype(np.float32, copy=False)
        elif hasattr(queries, "shape") and len(getattr(queries, "shape")) == 2 and not isinstance(queries, list):
            vectors = np.asarray(queries, np.float32)
        else:
            vectors = self._embed(queries)
        if len(self) and vectors.shape[1] != self._embeddings.shape[1]:
            raise ValueError(f"Queries have dim {vectors.shape[1]}, the index holds dim {self._embeddings.shape[1]}.")
        return vectors

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [Q, k] int64, scores [Q, k] float32)``: gallery row numbers (-1: none), best first."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if k > len(self):
            raise ValueError(f"k={k} is larger than the {len(self)} rows of the index; use k <= {len(self)}.")
        vectors = self.embed_queries(queries)
        return self.searcher.top_k(vectors, int(k))

    def lookup(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best gallery items per query: ``(ids [Q, k] str (object), scores [Q, k] float32)``.

        ``queries``: embeddings ``[Q, D]`` or images (paths, encoded bytes, pixels)."""
        rows, scores = self.search(queries, k)
        return self._ids_of(rows), scores

    def _ids_of(self, rows: np.ndarray, column: str = "ids") -> np.ndarray:
        table = np.array(getattr(self, column) + [None], dtype=object)  # row -1 -> None
        return table[np.where(rows >= 0, rows, len(table) - 1)]

    def image_ids_of(self, rows: np.ndarray) -> np.ndarray:
        """The image ids ``[Q, k]`` of gallery rows (as `search` returns them)."""
        return self._ids_of(np.asarray(rows), "image_ids")

    def grid(
        self,
        path: str | os.PathLike | None,
        queries: Any,
        k: int = 5,
        *,
        expected_ids: Sequence[Any] | None = None,
        image_root: str | os.PathLike | None = None,
    ) -> Any:
        """`atl_keras.search.pictures.neighbour_grid` of the ``k`` results of query images (paths,
        bytes or pixels): result tiles are the rows' image ids / paths (under `image_root`);
        with ``expected_ids`` the correct results are framed green, the others red."""
        from atl_keras.search.pictures import neighbour_grid

        rows, scores = self.search(queries, k)
        ids = self._ids_of(rows)
        correct = None
        if expected_ids is not None:
            correct = ids == np.array([None if e is None else str(e) for e in expected_ids], dtype=object)[:, None]
        return neighbour_grid(path, list(queries), self.image_ids_of(rows).tolist(), ids.tolist(), scores,
                              correct=correct, image_root=image_root)

    # ------------------------------------------------------------------ matching
    def calibrate(
        self,
        queries: Any,
        expected_ids: Sequence[Any],
        target_precision: float = 0.95,
        confidence: float | None = 0.95,
    ) -> Calibration:
        """Pick the match threshold on labelled queries (``expected_ids``: the right item id per
        query, None = not in the gallery) and keep it (`match`, `save`, the export manifest).

        Returns the `Calibration` (precision / recall curve and the threshold; ``threshold``
        is None, and the index keeps its previous one, when no threshold reaches the target).
        """
        ids, scores = self.lookup(queries, 1)
        expected = [None if e is None else str(e) for e in expected_ids]
        result = calibrate_threshold(ids[:, 0].tolist(), scores[:, 0], expected, target_precision, confidence)
        if result.threshold is not None:
            self.threshold = result.threshold
            self.calibration = result.to_dict(curve=False)
        return result

    def match(self, queries: Any, threshold: float | None = None) -> list[str | None]:
        """The matched item id per query (its best result scores >= the threshold), else None."""
        threshold = self.threshold if threshold is None else threshold
        if threshold is None:
            raise ValueError("No match threshold: run calibrate(queries, expected_ids) first or pass threshold=.")
        ids, scores = self.lookup(queries, 1)
        return [item if score >= threshold else None for item, score in zip(ids[:, 0], scores[:, 0])]

    def duplicate_groups(self, threshold: float | None = None, k: int = 10) -> list[list[int]]:
        """Rows that are near-duplicates of each other: connected groups (>= 2 rows) of rows whose
        scores are >= the threshold among each row's ``k`` nearest; row numbers, ascending."""
        threshold = self.threshold if threshold is None else threshold
        if threshold is None:
            raise ValueError("No match threshold: run calibrate(...) first or pass threshold=.")
        k = min(k + 1, len(self))
        rows, scores = self.searcher.top_k(self._embeddings, k)
        parent = list(range(len(self)))

        def root(row: int) -> int:
            while parent[row] != row:
                parent[row] = parent[parent[row]]
                row = parent[row]
            return row

        for row, (neighbours, values) in enumerate(zip(rows, scores)):
            for other, score in zip(neighbours, values):
                if other >= 0 and other != row and score >= threshold:
                    parent[root(int(other))] = root(row)
        groups: dict[int, list[int]] = {}
        for row in range(len(self)):
            groups.setdefault(root(row), []).append(row)
        return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])

    # ------------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike) -> str:
        """Write the index to ``path`` atomically (a temporary directory renamed into place; an
        existing index there is replaced). Returns the path."""
        from atl_keras.search.store import save_index

        searcher = self.searcher
        manifest = {
            "format": INDEX_FORMAT,
            "embedding_dim": int(self._embeddings.shape[1]),
            "gallery_size": len(self),
            "score": "dot_product (cosine similarity of unit vectors; higher is closer)",
            **searcher.config(),
            **({"match_threshold": self.threshold} if self.threshold is not None else {}),
            **({"calibration": self.calibration} if self.calibration is not None else {}),
        }
        return save_index(os.fspath(path), searcher, self._embeddings, self.ids, self.image_ids, self.metadata,
                          manifest, self.threshold)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None, **kwargs: Any) -> "RetrievalIndex":
        """An index saved by `save`, or an export version (``saved_models/NAME/N``): image queries
        are then embedded by the export's own ``embed_pixels`` unless ``model`` is given."""
        from atl_keras.search.store import load_index

        loaded, manifest, rows, searcher = load_index(os.fspath(path))
        preprocessing = kwargs.pop("preprocessing", None)
        if model is None and "embed_pixels" in getattr(loaded, "signatures", {}):
            from atl_keras.preprocessing import Preprocessing

            embed_pixels = loaded.signatures["embed_pixels"]
            model = lambda pixels: embed_pixels(pixels=pixels)["embeddings"]  # noqa: E731
            preprocessing = preprocessing or Preprocessing.from_dict(manifest["preprocessing"])
        index = cls(model, searcher=searcher.kind, preprocessing=preprocessing, **kwargs)
        index.add_embeddings(searcher.embeddings, rows["ids"], rows["metadata"], image_ids=rows["image_ids"])
        index._searcher, index._loaded = searcher, loaded
        index.threshold = manifest.get("match_threshold")
        index.calibration = manifest.get("calibration")
        return index

    def __repr__(self) -> str:
        dim = self._embeddings.shape[1] if len(self) else None
        return (f"RetrievalIndex({len(self)} rows, dim={dim}, searcher={self.searcher_kind!r}, "
                f"threshold={self.threshold})")


"""`Catalog`: the one in-memory representation every dataset reader returns.

A catalog is N image rows of M items. Each item has one free-text description (the weak
label of the adaptive triplet loss); each row has an image (in memory or a file), a domain
(``"catalog"`` shots vs ``"street"`` photos, ...) and a split.

    catalog = read_catalog("shop.csv")                 # or make_synthetic_shop(), read_deepfashion_inshop()
    train = catalog.split("train")
    query, gallery = catalog.query_gallery()           # street -> catalog on test items
    images, kept = train.load_images(64)               # uint8 [n_kept, 64, 64, 3]

Labels index ``item_ids`` and keep their meaning in every subset (a query row and a gallery
row of the same item carry the same label, and a per-item text-embedding table stays
aligned); `Catalog.compact` renumbers to the items present when you want ``0..m-1``.

CSV / JSONL catalogs (`read_catalog`), one row per image:

    image,item_id,description,domain,split
    imgs/a1.jpg,sku-1,"Red striped t-shirt, short sleeves",catalog,
    imgs/a2.jpg,sku-1,,street,

``image`` is relative to ``image_root`` (default: the catalog file's folder) unless absolute;
``domain`` defaults to ``"catalog"``; a missing or empty ``split`` column means splits are
assigned by item with `assign_splits`. The description may be repeated on every row of an
item or given once; if rows of one item disagree, the first non-empty text wins and ONE
warning lists the conflicts (``on_conflict="error"`` raises instead).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from atl_keras.data.images import decode_images

__all__ = [
    "Catalog",
    "SPLIT_GROUPS",
    "assign_splits",
    "check_disjoint_splits",
    "read_catalog",
]

# Splits whose items must be disjoint from each other's: an item may sit in several splits
# of one group (query + gallery of the test items) but never in two groups.
SPLIT_GROUPS: dict[str, str] = {
    "train": "train",
    "val": "val",
    "validation": "val",
    "test": "test",
    "query": "test",
    "gallery": "test",
}

_REQUIRED_COLUMNS = ("image", "item_id", "description")
_MAX_LISTED = 5


def _as_str_array(values: Iterable[Any], n: int, name: str) -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if array.shape != (n,):
        raise ValueError(f"{name} must have one entry per row, shape [{n}], got shape {array.shape}.")
    return array.astype(str)


@dataclass
class Catalog:
    """N image rows of M items (see the module docstring).

    Attributes:
        item_ids: ``[M]`` unique item ids (str).
        descriptions: ``[M]`` one description per item; ``None`` or ``""`` = missing.
        labels: int64 ``[N]``, row -> index into ``item_ids``.
        domains: str ``[N]``, e.g. ``"catalog"`` / ``"street"``.
        splits: str ``[N]``, e.g. ``"train"`` / ``"val"`` / ``"test"`` / ``"query"`` / ``"gallery"``.
        images: uint8 ``[N, H, W, C]`` when held in memory, else None.
        image_paths: ``[N]`` image files when not in memory, else None.
        image_records: the rows' records in TFRecord shards (`atl_keras.data.sources.ShardImages`,
            from `atl_keras.data.shards.read_shards`), else None.
        item_attributes: optional ``[M]`` dicts of structured item metadata (category, colour,
            ... for the synthetic shop; the extra JSON fields for DeepFashion).
        image_ids: optional ``[N]`` image ids: a catalog file's ``image_id`` column, else the
            ``image`` value as written in the file (the ids `atl index` gives the same rows).
    """

    item_ids: list[str]
    descriptions: list[str | None]
    labels: np.ndarray
    domains: np.ndarray
    splits: np.ndarray
    images: np.ndarray | None = None
    image_paths: list[str] | None = None
    item_attributes: list[dict[str, Any]] | None = None
    image_records: Any = None  # ShardImages (atl_keras.data.sources), kept untyped: no TF import here
    image_ids: list[str] | None = None

    def __post_init__(self) -> None:
        self.item_ids = [str(i) for i in self.item_ids]
        self.descriptions = [None if d is None else str(d) for d in self.descriptions]
        m = len(self.item_ids)
        if len(set(self.item_ids)) != m:
            seen: set[str] = set()
            dupes = [i for i in self.item_ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
            raise ValueError(f"item_ids must be unique; duplicated: {dupes[:_MAX_LISTED]}.")
        if len(self.descriptions) != m:
            raise ValueError(f"descriptions must have one entry per item ({m}), got {len(self.descriptions)}.")
        if self.item_attributes is not None and len(self.item_attributes) != m:
            raise ValueError(
                f"item_attributes must have one entry per item ({m}), got {len(self.item_attributes)}."
            )
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D array [N], got shape {labels.shape}.")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integer item indices, got dtype {labels.dtype}.")
        self.labels = labels.astype(np.int64)
        n = len(self.labels)
        if n and (self.labels.min() < 0 or self.labels.max() >= m):
            raise ValueError(
                f"labels must index item_ids (0..{m - 1}), got values in {self.labels.min()}..{self.labels.max()}."
            )
        if self.image_ids is not None:
            self.image_ids = [str(i) for i in self.image_ids]
            if len(self.image_ids) != n:
                raise ValueError(f"image_ids must have one id per row ({n}), got {len(self.image_ids)}.")
        self.domains = _as_str_array(self.domains, n, "domains")
        self.splits = _as_str_array(self.splits, n, "splits")
        if self.images is None and self.image_paths is None and self.image_records is None:
            raise ValueError("A Catalog needs images (uint8 [N, H, W, C]), image_paths ([N] files) or "
                             "image_records (shard records).")
        if self.image_records is not None and len(self.image_records) != n:
            raise ValueError(f"image_records must have one record per row ({n}), got {len(self.image_records)}.")
        if self.images is not None:
            self.images = np.asarray(self.images)
            if self.images.ndim != 4 or len(self.images) != n:
                raise ValueError(f"images must be [N={n}, H, W, C], got shape {self.images.shape}.")
        if self.image_paths is not None:
            self.image_paths = [os.fspath(p) for p in self.image_paths]
            if len(self.image_paths) != n:
                raise ValueError(f"image_paths must have one path per row ({n}), got {len(self.image_paths)}.")

    # ----------------------------------------------------------------------------- views
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_items(self) -> int:
        """M, the size of the item table (including items with no row in this subset)."""
        return len(self.item_ids)

    @property
    def row_item_ids(self) -> list[str]:
        """``[N]`` item id of each row."""
        return [self.item_ids[i] for i in self.labels]

    @property
    def row_descriptions(self) -> list[str | None]:
        """``[N]`` description of each row's item."""
        return [self.descriptions[i] for i in self.labels]

    def present_items(self) -> np.ndarray:
        """int64 ``[m]`` sorted indices of the items that have at least one row."""
        return np.unique(self.labels)

    def subset(self, mask: np.ndarray | Sequence[int] | Sequence[bool]) -> "Catalog":
        """Rows selected by a bool mask ``[N]`` or an index array; the item table is unchanged."""
        selector = np.asarray(mask)
        if selector.dtype == bool:
            if selector.shape != (len(self),):
                raise ValueError(f"A bool mask must have shape [{len(self)}], got {selector.shape}.")
            rows = np.flatnonzero(selector)
        elif selector.size == 0 or np.issubdtype(selector.dtype, np.integer):
            rows = selector.astype(np.int64).reshape(-1)
            if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
                raise IndexError(f"Row indices must be in [0, {len(self)}), got {rows.min()}..{rows.max()}.")
        else:
            raise TypeError(f"mask must be a bool mask or integer row indices, got dtype {selector.dtype}.")
        return dataclasses.replace(
            self,
            labels=self.labels[rows],
            domains=self.domains[rows],
            splits=self.splits[rows],
            images=None if self.images is None else self.images[rows],
            image_paths=None if self.image_paths is None else [self.image_paths[i] for i in rows],
            image_records=None if self.image_records is None else self.image_records.subset(rows),
            image_ids=None if self.image_ids is None else [self.image_ids[i] for i in rows],
        )

    def split(self, name: str | Sequence[str]) -> "Catalog":
        """Rows whose split is ``name`` (or any of several names)."""
        names = [name] if isinstance(name, str) else list(name)
        mask = np.isin(self.splits, names)
        if not mask.any():
            raise ValueError(
                f"No rows in split {name!r}; this catalog has splits {sorted(set(self.splits.tolist()))}."
            )
        return self.subset(mask)

    def query_gallery(
        self,
        query_domain: str = "street",
        gallery_domain: str = "catalog",
        split: str | Sequence[str] | None = "test",
    ) -> tuple["Catalog", "Catalog"]:
        """Cross-domain retrieval sets: ``(query, gallery)`` rows of the evaluation items.

        ``query`` = rows of ``split`` in ``query_domain``; ``gallery`` = rows of ``split`` in
        ``gallery_domain``. ``split`` may be a name, several names, or None (all rows), e.g.
        DeepFashion In-shop: ``query_gallery("query", "gallery", split=None)``.
        Labels keep indexing ``item_ids``, so query and gallery labels are comparable.
        """
        if split is None:
            in_split = np.ones(len(self), dtype=bool)
        else:
            in_split = np.isin(self.splits, [split] if isinstance(split, str) else list(split))
        query_mask = in_split & (self.domains == query_domain)
        gallery_mask = in_split & (self.domains == gallery_domain)
        if not query_mask.any() or not gallery_mask.any():
            combos = sorted(set(zip(self.splits.tolist(), self.domains.tolist())))
            raise ValueError(
                f"query_gallery(query_domain={query_domain!r}, gallery_domain={gallery_domain!r}, "
                f"split={split!r}) found {int(query_mask.sum())} query and {int(gallery_mask.sum())} "
                f"gallery rows. This catalog has (split, domain) pairs {combos[:12]}; pass matching names."
            )
        return self.subset(query_mask), self.subset(gallery_mask)

    def compact(self) -> "Catalog":
        """Keep only the items with rows and renumber labels to ``0..m-1`` (first-seen item order kept)."""
        present = self.present_items()
        remap = np.full(self.num_items, -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        return dataclasses.replace(
            self,
            item_ids=[self.item_ids[i] for i in present],
            descriptions=[self.descriptions[i] for i in present],
            item_attributes=None if self.item_attributes is None else [self.item_attributes[i] for i in present],
            labels=remap[self.labels],
        )

    # ---------------------------------------------------------------------------- images
    def load_images(
        self,
        image_size: int | Sequence[int],
        strict: bool = False,
        channels: int = 3,
        resize: str = "pad",
        pad_value: int = 255,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of every row: ``(uint8 [n_kept, H, W, C], kept_mask bool [N])``.

        In-memory images of another size are resized with `atl_keras.preprocessing` (pad
        or stretch as ``resize`` says, all kept): the same pixels as the files would give
        through the training decode. Files are decoded with the `atl_keras.data.images`
        pipeline: bad files are skipped with one warning (or raise `ImageDecodeError` when
        ``strict``). Use ``self.subset(kept_mask)`` for matching rows, or `with_images` for both at once.
        """
        if self.images is not None:
            images = self.images
            size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
            if images.shape[-1] != channels:
                raise ValueError(
                    f"In-memory images have {images.shape[-1]} channels, asked for {channels}."
                )
            if tuple(images.shape[1:3]) != tuple(size):
                images = _resize_in_memory(images, size, channels, resize, pad_value)
            return images, np.ones(len(self), dtype=bool)
        if self.image_paths is not None:
            return decode_images(
                self.image_paths, image_size, channels=channels, strict=strict, resize=resize, pad_value=pad_value
            )
        from atl_keras.data.streaming import decode_source

        return decode_source(self.image_records, image_size, channels=channels, strict=strict, resize=resize,
                             pad_value=pad_value)

    def image_source(self) -> Any:
        """The rows' encoded images as an `atl_keras.data.sources.ImageSource` (files or shard
        records: an index of a few dozen bytes per row, nothing decoded)."""
        if self.image_records is not None:
            return self.image_records
        if self.image_paths is None:
            raise ValueError("This catalog holds its images in memory; it has no files or shard records to stream.")
        from atl_keras.data.sources import FileImages

        return FileImages(self.image_paths)

    def with_images(self, image_size: int | Sequence[int], strict: bool = False, **kwargs: Any) -> "Catalog":
        """This catalog with decoded images in memory, bad rows dropped (see `load_images`)."""
        images, kept = self.load_images(image_size, strict=strict, **kwargs)
        return dataclasses.replace(self.subset(kept), images=images)

    def summary(self) -> dict[str, Any]:
        """Counts of rows per (split, domain) and items per split, for logs and reports."""
        rows: dict[str, int] = {}
        for s, d in zip(self.splits.tolist(), self.domains.tolist()):
            rows[f"{s}/{d}"] = rows.get(f"{s}/{d}", 0) + 1
        items = {s: int(len(np.unique(self.labels[self.splits == s]))) for s in sorted(set(self.splits.tolist()))}
        return {"rows": len(self), "items": int(len(self.present_items())), "rows_per_split_domain": rows,
                "items_per_split": items}


# --------------------------------------------------------------------------------- splits
def _hash_key(seed: int, item: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{item}".encode(), digest_size=8).digest()


def assign_splits(
    item_ids: Iterable[str],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    names: Sequence[str] = ("train", "val", "test"),
) -> dict[str, str]:
    """Assign every distinct item to one split, so the splits have DISJOINT items.

    Items are ordered by a seeded hash of their id and cut at the rounded cumulative
    fractions, so the counts match ``fractions`` as closely as integers allow, the result
    does not depend on the order of ``item_ids`` and (mostly) survives adding items.

    Args:
        item_ids: item ids (repeats are fine, e.g. one per row).
        fractions: one non-negative fraction per name, summing to 1.
        seed: int; the same seed gives the same assignment.
        names: split names.
    Returns:
        ``{item_id: split_name}`` for every distinct item.
    """
    fractions = [float(f) for f in fractions]
    names = list(names)
    if len(fractions) != len(names):
        raise ValueError(f"Need one fraction per split name {names}, got fractions {fractions}.")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions} (sum {sum(fractions):.6g}).")
    items = sorted({str(i) for i in item_ids}, key=lambda i: (_hash_key(seed, i), i))
    bounds = np.rint(np.cumsum(fractions) * len(items)).astype(int)
    bounds[-1] = len(items)
    out: dict[str, str] = {}
    start = 0
    for name, stop in zip(names, bounds):
        for item in items[start:stop]:
            out[item] = name
        start = max(start, stop)
    return out


def check_disjoint_splits(
    item_of_row: Sequence[str], splits: Sequence[str], where: Sequence[str] | None = None
) -> None:
    """Raise ValueError if an item appears in two split groups (train / val / test+query+gallery).

    ``where``: optional ``[N]`` message prefixes locating each row (e.g. ``"file:line: "``).
    """
    group_of_item: dict[str, tuple[str, str]] = {}
    for row, (item, split) in enumerate(zip(item_of_row, splits)):
        group = SPLIT_GROUPS.get(split, split)
        if item in group_of_item and group_of_item[item][0] != group:
            prefix = where[row] if where is not None else ""
            raise ValueError(
                f"{prefix}item {item!r} is in split {group_of_item[item][1]!r} and in split {split!r}; "
                "train, val and test (query/gallery) must have disjoint items. Fix the split column "
                "or drop it to let assign_splits() choose."
            )
        group_of_item.setdefault(item, (group, split))


# ------------------------------------------------------------------------------ CSV/JSONL
def _read_rows(path: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row dict)`` of a CSV (header row) or JSONL file."""
    lower = path.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}:{line_no}: not valid JSON ({err.msg}); JSONL needs one object per line."
                    ) from err
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}.")
                rows.append((line_no, row))
        return rows
    if lower.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if lower.endswith(".tsv") else ",")
            if reader.fieldnames is None:
                raise ValueError(f"{path}: empty file; expected a header row with {', '.join(_REQUIRED_COLUMNS)}.")
            missing = [c for c in _REQUIRED_COLUMNS if c not in reader.fieldnames]
            if missing:
                raise ValueError(
                    f"{path}:1: header is missing column(s) {missing}; found {reader.fieldnames}. "
                    f"Required: {list(_REQUIRED_COLUMNS)}; optional: domain, split."
                )
            for row in reader:
                line_no = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    raise ValueError(
                        f"{path}:{line_no}: bad row, its number of fields differs from the header's "
                        f"{len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); quote fields that "
                        "contain commas."
                    )
                rows.append((line_no, row))
        return rows
    raise ValueError(f"{path}: unknown catalog format; use a .csv/.tsv (header row) or .jsonl file.")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value).strip()
    return str(value).strip()


def read_catalog(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    on_conflict: str = "warn",
    check_files: bool = False,
) -> Catalog:
    """Read a CSV (header row) or JSONL catalog, one row per image.

    Columns/keys: ``image`` (path), ``item_id``, ``description`` (may be empty), optional
    ``domain`` (default ``"catalog"``) and ``split`` (default: assigned per item with
    `assign_splits(items, split_fractions, seed)`). Items are numbered in order of first
    appearance. See the module docstring for the description-conflict rule.

    Args:
        path: ``.csv``, ``.tsv`` or ``.jsonl`` / ``.ndjson`` file.
        image_root: folder that relative image paths start from (default: the file's folder).
        split_fractions, seed: used only when the file has no split values.
        on_conflict: ``"warn"`` (first non-empty description wins, one warning) or ``"error"``.
        check_files: raise `FileNotFoundError` listing missing image files now (otherwise
            they are reported when images are loaded).
    Raises:
        FileNotFoundError: the catalog file (or, with ``check_files``, an image) is missing.
        ValueError: missing column/key, bad row, partial split column, an item in two splits
            groups, conflicting descriptions with ``on_conflict="error"`` - each naming the
            file and line.
    """
    path = os.fspath(path)
    if on_conflict not in ("warn", "error"):
        raise ValueError(f"on_conflict must be 'warn' or 'error', got {on_conflict!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Catalog file {path!r} does not exist.")
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows; expected one row per image with {', '.join(_REQUIRED_COLUMNS)}.")

    item_index: dict[str, int] = {}
    item_ids: list[str] = []
    descriptions: list[str | None] = []
    description_line: list[int] = []
    conflicts: list[str] = []
    labels, domains, splits, image_paths, image_ids, lines = [], [], [], [], [], []
    for line_no, row in rows:
        for key in ("image", "item_id"):
            if key not in row:
                raise ValueError(f"{path}:{line_no}: missing key {key!r}; found keys {sorted(row)}.")
            if not _text(row[key]):
                raise ValueError(f"{path}:{line_no}: empty {key!r}; every row needs an image path and an item_id.")
        if "description" not in row:
            raise ValueError(
                f"{path}:{line_no}: missing key 'description' (use \"\" or null when the item has none); "
                f"found keys {sorted(row)}."
            )
        item = _text(row["item_id"])
        text = _text(row["description"])
        if item not in item_index:
            item_index[item] = len(item_ids)
            item_ids.append(item)
            descriptions.append(text or None)
            description_line.append(line_no)
        else:
            idx = item_index[item]
            known = descriptions[idx]
            if text and known is None:
                descriptions[idx] = text
                description_line[idx] = line_no
            elif text and known is not None and text != known:
                message = (
                    f"{path}:{line_no}: item {item!r} has description {text!r}, but line "
                    f"{description_line[idx]} gave {known!r}"
                )
                if on_conflict == "error":
                    raise ValueError(message + ". Make the descriptions of one item identical (or leave all "
                                     "but one empty), or pass on_conflict='warn' to keep the first.")
                conflicts.append(message)
        image = _text(row["image"])
        image_paths.append(image if os.path.isabs(image) else os.path.join(root, image))
        image_ids.append(_text(row.get("image_id")) or image)  # as atl_keras.catalog_index names rows
        labels.append(item_index[item])
        domains.append(_text(row.get("domain")) or "catalog")
        splits.append(_text(row.get("split")))
        lines.append(line_no)
    if conflicts:
        listed = "; ".join(conflicts[:_MAX_LISTED])
        more = f" (and {len(conflicts) - _MAX_LISTED} more)" if len(conflicts) > _MAX_LISTED else ""
        warnings.warn(
            f"{len(conflicts)} conflicting descriptions in {path}; the first non-empty description of each "
            f"item was kept: {listed}{more}. Pass on_conflict='error' to make this an error.",
            stacklevel=2,
        )

    given = [bool(s) for s in splits]
    if any(given) and not all(given):
        line_no = lines[given.index(False)]
        raise ValueError(
            f"{path}:{line_no}: empty split, but other rows have one; give a split on every row or on none "
            "(then splits are assigned per item)."
        )
    if all(given):
        check_disjoint_splits([item_ids[i] for i in labels], splits, where=[f"{path}:{n}: " for n in lines])
    else:
        assignment = assign_splits(item_ids, split_fractions, seed=seed)
        splits = [assignment[item_ids[i]] for i in labels]

    if check_files:
        missing = [p for p in image_paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image files listed in {path} do not exist (image_root={root!r}): "
                f"{missing[:_MAX_LISTED]}. Fix the paths or pass image_root."
            )
    return Catalog(
        item_ids=item_ids,
        descriptions=descriptions,
        labels=np.asarray(labels, np.int64),
        domains=np.asarray(domains, dtype=str),
        splits=np.asarray(splits, dtype=str),
        images=None,
        image_paths=image_paths,
        image_ids=image_ids,
    )


def _resize_in_memory(
    images: np.ndarray, size: tuple[int, int], channels: int, resize: str, pad_value: int, chunk: int = 1024
) -> np.ndarray:
    """uint8 ``[N, h, w, C]`` -> uint8 ``[N, H, W, C]`` through `atl_keras.preprocessing.resize_image`."""
    import tensorflow as tf  # local: only needed for the rare resize of in-memory images

    from atl_keras.preprocessing import Preprocessing, resize_image

    prep = Preprocessing(size, channels=channels, resize=resize, pad_value=pad_value)
    resize_one = tf.function(
        lambda batch: tf.map_fn(lambda image: resize_image(image, prep), batch,
                                fn_output_signature=tf.TensorSpec(prep.image_shape, tf.uint8)),
        reduce_retracing=True,
    )
    out = np.empty((len(images), *prep.image_shape), np.uint8)
    for start in range(0, len(images), chunk):  # bounded memory: one chunk of float pixels at a time
        out[start:start + chunk] = resize_one(tf.constant(np.asarray(images[start:start + chunk], np.uint8))).numpy()
    return out

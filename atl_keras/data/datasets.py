"""Dataset specs -> training rows + evaluation protocols, for every reader.

    data = load_retrieval_data("synthetic-shop")          # or "fashion-mnist",
    data.train_images, data.train_labels, data.descriptions   # "catalog:shop.csv",
    data.test.query_images, data.test.gallery_images          # "deepfashion-inshop:/data/inshop",
                                                              # "shards:/data/shop-shards"

Training rows of file-backed datasets (``catalog:``, ``deepfashion-inshop:``, ``shards:``) are
*streamed* by default (``stream=True``): `RetrievalData.train_source` indexes their files or
shard records and ``train_images`` is None; `atl_keras.data.streaming.pk_stream_dataset` reads
and decodes them per step. Their validation and test images are `SourceImages` (files decoded
batch by batch when embedded; rows that do not decode are dropped with one warning), so no
path holds the catalog's pixels. ``stream=False`` decodes everything into memory as before.

Protocols (`EvalSet.protocol`):
- `street->catalog` (synthetic shop, catalogs with street and catalog rows): query = street
  photos of the evaluation items, gallery = catalog shots of the same items. Items never
  seen in training (train / val / test are disjoint by item).
- `query->gallery` (DeepFashion In-shop's official split).
- `leave-one-out` (Fashion-MNIST, single-domain catalogs): every image queries the rest.
  On Fashion-MNIST the "items" are the 10 classes; `fashion_mnist_unseen_classes` holds
  classes out of training (unseen-class protocol).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from atl_keras.data.catalog import Catalog, assign_splits, read_catalog
from atl_keras.data.deepfashion import read_deepfashion_inshop
from atl_keras.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from atl_keras.data.source_images import SourceImages, readable_rows
from atl_keras.data.sources import ImageSource
from atl_keras.data.synthetic_shop import make_synthetic_shop
from atl_keras.preprocessing import Preprocessing

DATASET_SPECS = (
    "fashion-mnist",
    "synthetic-shop",
    "deepfashion-inshop:ROOT",
    "catalog:PATH",
    "shards:DIR",
)
#: Datasets whose training rows are files (or shard records) and stream by default.
STREAMED_DATASETS = ("catalog", "deepfashion-inshop", "shards")


@dataclass
class EvalSet:
    """Retrieval evaluation rows: a query set and a gallery (None = leave-one-out).

    Images are uint8 ``[N, H, W, C]`` arrays, or `SourceImages` (files decoded when embedded)
    for streamed datasets."""

    query_images: np.ndarray | SourceImages
    query_labels: np.ndarray
    gallery_images: np.ndarray | SourceImages | None
    gallery_labels: np.ndarray | None
    protocol: str
    gallery_ids: list[str] = field(default_factory=list)

    @property
    def index_images(self) -> np.ndarray | SourceImages:
        """The images an exported index holds: the gallery, or the queries for leave-one-out."""
        return self.query_images if self.gallery_images is None else self.gallery_images

    @property
    def index_labels(self) -> np.ndarray:
        """Labels of `index_images`."""
        return self.query_labels if self.gallery_labels is None else self.gallery_labels

    def __post_init__(self) -> None:
        if len(self.query_images) == 0:
            raise ValueError(f"The {self.protocol} evaluation set has no query images.")


@dataclass
class RetrievalData:
    """What training and evaluation need, independent of the reader.

    `train_images` uint8 [N, H, W, C], `train_labels` int64 [N] indexing `descriptions`
    (one text per item/label, None when missing). Streamed data has ``train_images`` None
    and `train_source` (the N training rows' files or shard records) decoded with
    `preprocessing`.
    """

    name: str
    train_images: np.ndarray | None
    train_labels: np.ndarray
    descriptions: list[str | None]
    validation: EvalSet | None  # None: too few items to carve one (a warning says so)
    test: EvalSet
    item_ids: list[str] = field(default_factory=list)
    item_attributes: list[dict[str, Any]] | None = None  # [M] per item (synthetic shop, catalogs)
    train_source: ImageSource | None = None
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        if self.train_images is None and (self.train_source is None or self.preprocessing is None):
            raise ValueError("RetrievalData needs train_images, or a train_source with its preprocessing.")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.train_images is None:
            return tuple(self.preprocessing.image_shape)  # type: ignore[union-attr]
        return tuple(int(x) for x in self.train_images.shape[1:])


def _row_ids(rows: Catalog) -> list[str]:
    """One id per image row: the catalog's image ids (a catalog file's ``image_id`` column or
    image path, as `atl index` names the same rows), else `<item id>#<n>` (n counts the
    item's images from 1) for data without files (the synthetic shop, Fashion-MNIST)."""
    if rows.image_ids is not None:
        return list(rows.image_ids)
    counts: dict[str, int] = {}
    ids = []
    for item in rows.row_item_ids:
        counts[item] = counts.get(item, 0) + 1
        ids.append(f"{item}#{counts[item]}")
    return ids


def _eval_set(
    catalog: Catalog, split: str | Sequence[str] | None,
    images_of: Callable[[Catalog], tuple[Catalog, Any]] | None = None,
) -> EvalSet:
    """Cross-domain sets when the split has two domains, else leave-one-out. ``images_of(rows)
    -> (kept rows, images)``: how each set gets its images (default: the rows' in-memory
    images); each set is handled on its own, so no second copy is made."""
    images_of = images_of or (lambda rows: (rows, rows.images))
    rows = catalog if split is None else catalog.split(split)
    domains = set(rows.domains.tolist())
    for query_domain, gallery_domain in (("street", "catalog"), ("query", "gallery")):
        if {query_domain, gallery_domain} <= domains:
            query, gallery = rows.query_gallery(query_domain, gallery_domain, split=None)
            (query, query_images), (gallery, gallery_images) = images_of(query), images_of(gallery)
            return EvalSet(
                query_images, query.labels, gallery_images, gallery.labels,
                f"{query_domain}->{gallery_domain}", _row_ids(gallery),
            )
    rows, images = images_of(rows)
    return EvalSet(images, rows.labels, None, None, "leave-one-out", _row_ids(rows))


def _streamed(preprocessing: Preprocessing, strict: bool) -> Callable[[Catalog], tuple[Catalog, SourceImages]]:
    """``images_of`` for streamed datasets: evaluation rows stay files (`SourceImages`), rows
    that do not decode are dropped after one streamed pass (one warning naming them, or
    `ImageDecodeError` when ``strict``), so every kept row embeds and matches its label."""

    def images_of(rows: Catalog) -> tuple[Catalog, SourceImages]:
        from atl_keras.data.images import _report
        from atl_keras.data.streaming import _Described

        source = rows.image_source()
        good = readable_rows(source, preprocessing)
        _report(_Described(source), ~good, strict)
        if not good.all():
            rows, source = rows.subset(good), source.subset(np.flatnonzero(good))
        return rows, SourceImages(source, preprocessing)

    return images_of


#: Share of the training items carved out for validation when a catalog has no "val" split,
#: and the fewest training items for which that carve holds at least one item.
VALIDATION_FRACTION = 0.1
MIN_ITEMS_FOR_VALIDATION = 5


def _with_validation_split(catalog: Catalog, fraction: float, seed: int) -> Catalog:
    """Carve validation items out of the training items when the catalog has none."""
    if "val" in set(catalog.splits.tolist()):
        return catalog
    train_items = sorted({catalog.item_ids[i] for i in catalog.split("train").labels})
    val_share = assign_splits(train_items, fractions=(1 - fraction, fraction), seed=seed,
                              names=("train", "val"))
    splits = catalog.splits.copy()
    for row, (label, split) in enumerate(zip(catalog.labels, catalog.splits)):
        if split == "train" and val_share[catalog.item_ids[label]] == "val":
            splits[row] = "val"
    catalog.splits = splits
    return catalog


def _from_catalog(
    name: str,
    catalog: Catalog,
    test_split: str | None,
    seed: int,
    stream_size: int | None = None,
    strict: bool = False,
) -> RetrievalData:
    """Train rows + evaluation sets of a catalog. ``stream_size``: every row stays a file
    (streamed at that square size): training rows as ``train_source``, evaluation rows as
    `SourceImages` decoded batch by batch when they are embedded."""
    catalog = _with_validation_split(catalog, VALIDATION_FRACTION, seed)
    train = catalog.split("train")
    train_source = preprocessing = images_of = None
    if stream_size is not None:
        train_source = train.image_source()
        preprocessing = Preprocessing((stream_size, stream_size))
        images_of = _streamed(preprocessing, strict)
    validation = None
    if "val" in set(catalog.splits.tolist()):
        validation = _eval_set(catalog, "val", images_of)
    else:
        items = len(np.unique(train.labels))
        warnings.warn(
            f"{name}: {items} training items are too few to carve a validation split "
            f"({VALIDATION_FRACTION:.0%} of them rounds to 0 items; it needs at least "
            f"{MIN_ITEMS_FOR_VALIDATION}); training without validation metrics.",
            stacklevel=3,
        )
    return RetrievalData(
        name=name,
        train_images=train.images if train_source is None else None,
        train_labels=train.labels,
        descriptions=list(catalog.descriptions),
        validation=validation,
        test=_eval_set(catalog, test_split, images_of),
        item_ids=list(catalog.item_ids),
        item_attributes=None if catalog.item_attributes is None else [dict(a) for a in catalog.item_attributes],
        train_source=train_source,
        preprocessing=preprocessing,
    )


def _check_streamed_rows(data: RetrievalData) -> None:
    """strict: decode every streamed training row once; raise naming the bad ones."""
    from atl_keras.data.images import ImageDecodeError

    source = data.train_source
    good = readable_rows(source, data.preprocessing)  # type: ignore[arg-type]
    bad = np.flatnonzero(~good)
    if bad.size:
        named = ", ".join(repr(source.describe(int(r))) for r in bad[:5])  # type: ignore[union-attr]
        raise ImageDecodeError(
            f"{bad.size} of {len(good)} training images are missing, empty, undecodable or over the pixel "
            f"budget: {named}{' and more' if bad.size > 5 else ''}. Fix or remove these rows, or drop "
            "strict to skip them.",
            [source.describe(int(r)) for r in bad], bad.tolist())  # type: ignore[union-attr]


def _fashion_mnist(
    data_dir: str | None, validation_size: int, seed: int, unseen_classes: Sequence[str]
) -> RetrievalData:
    train = load_fashion_mnist("train", data_dir=data_dir)
    test = load_fashion_mnist("test", data_dir=data_dir)
    unknown = [c for c in unseen_classes if c not in CLASS_NAMES]
    if unknown:
        raise ValueError(f"Unknown Fashion-MNIST classes {unknown}; choose from {list(CLASS_NAMES)}.")
    unseen = np.isin(np.arange(len(CLASS_NAMES)), [CLASS_NAMES.index(c) for c in unseen_classes])
    seen_rows = np.flatnonzero(~unseen[train.labels])
    if validation_size >= len(seen_rows):
        raise ValueError(f"validation_size={validation_size} leaves no training data.")
    order = np.random.default_rng(seed).permutation(seen_rows)
    val_rows, train_rows = np.sort(order[:validation_size]), np.sort(order[validation_size:])
    test_rows = np.flatnonzero(unseen[test.labels]) if unseen.any() else np.arange(len(test.labels))
    ids = [f"{CLASS_NAMES[int(label)]}/test-{i:05d}" for i, label in enumerate(test.labels)]
    return RetrievalData(
        name="fashion-mnist",
        train_images=train.images[train_rows],
        train_labels=train.labels[train_rows],
        descriptions=list(train.descriptions),
        validation=EvalSet(
            train.images[val_rows], train.labels[val_rows], None, None, "leave-one-out",
            [f"{CLASS_NAMES[int(train.labels[i])]}/train-{i:05d}" for i in val_rows],
        ),
        test=EvalSet(
            test.images[test_rows], test.labels[test_rows], None, None, "leave-one-out",
            [ids[i] for i in test_rows],
        ),
        item_ids=list(CLASS_NAMES),
    )


def load_retrieval_data(
    spec: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    validation_size: int = 2000,
    synthetic_items: int = 300,
    unseen_classes: Sequence[str] = (),
    strict: bool = False,
    seed: int = 0,
    synthetic_variants: float = 0.0,
    synthetic_street_views: int = 3,
    stream: bool = True,
) -> RetrievalData:
    """Load the dataset named by `spec` (see `DATASET_SPECS`) as train / val / test sets.

    Args:
        spec: `fashion-mnist`, `synthetic-shop`, `deepfashion-inshop:ROOT`, `catalog:PATH`
            (CSV or JSONL with image, item_id, description[, domain, split]) or `shards:DIR`
            (TFRecord shards written by `atl_keras.data.write_shards`).
        data_dir: Fashion-MNIST IDX directory (default: the Debian package's).
        image_size: square size for decoded files (default 64; synthetic shop 32).
        validation_size: Fashion-MNIST validation images held out of training.
        synthetic_items: number of items (listings) of the synthetic shop.
        synthetic_variants: share of the shop's designs listed several times under
            different item ids (the weak-label testbed; `make_synthetic_shop`).
        synthetic_street_views: street photos per item (the test queries).
        unseen_classes: Fashion-MNIST / synthetic-shop classes (categories) kept out of
            training and used as the test set.
        strict: stop at the first corrupt or missing image instead of skipping it
            (streamed training rows are then all decoded once up front to check them).
        stream: keep the training rows of `STREAMED_DATASETS` as files / shard records
            (`RetrievalData.train_source`) instead of decoding them into memory.
    """
    name, _, argument = spec.partition(":")
    if name == "fashion-mnist":
        return _fashion_mnist(data_dir, validation_size, seed, unseen_classes)
    if name == "synthetic-shop":
        catalog = make_synthetic_shop(
            num_items=synthetic_items,
            image_size=32 if image_size is None else image_size,
            seed=seed,
            unseen_categories=tuple(unseen_classes),
            variant_fraction=synthetic_variants,
            street_per_item=synthetic_street_views,
        )
        return _from_catalog("synthetic-shop", catalog, "test", seed)
    size = 64 if image_size is None else image_size
    if name in STREAMED_DATASETS:
        if name == "deepfashion-inshop":
            if not argument:
                raise ValueError("Give the dataset root: deepfashion-inshop:/path/to/In-shop.")
            catalog, test_split, label = read_deepfashion_inshop(argument), ["query", "gallery"], name
        elif name == "shards":
            if not argument:
                raise ValueError("Give the shard folder: shards:/path/to/shards (written by `atl shards`).")
            from atl_keras.data.shards import read_shards

            catalog, test_split, label = read_shards(argument), "test", f"shards:{argument}"
        else:
            if not argument:
                raise ValueError("Give the catalog file: catalog:/path/to/catalog.csv (or .jsonl).")
            catalog, test_split, label = read_catalog(argument), "test", f"catalog:{argument}"
        if not stream:
            return _from_catalog(label, catalog.with_images(size, strict=strict), test_split, seed)
        data = _from_catalog(label, catalog, test_split, seed, stream_size=size, strict=strict)
        if strict:
            _check_streamed_rows(data)
        return data
    raise ValueError(f"Unknown dataset {spec!r}; available: {', '.join(DATASET_SPECS)}.")

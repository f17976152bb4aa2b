"""DeepFashion In-shop Clothes Retrieval, read from its official layout (nothing is downloaded).

    catalog = read_deepfashion_inshop("/data/In-shop")
    train = catalog.split("train")                       # 3997 items, 25882 images
    query, gallery = inshop_query_gallery(catalog)       # 3985 test items: 14218 query, 12612 gallery

Expected layout (as distributed; ``img/`` may also sit under ``Img/``)::

    root/
      Eval/list_eval_partition.txt      line 1: row count; line 2: "image_name item_id evaluation_status";
                                        then "img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train"
      Anno/list_description_inshop.json [{"item": "id_00000002", "color": "...", "description": ["...", ...]}, ...]
      img/WOMEN/... img/MEN/...         the images, at the paths the partition file lists

Official protocol: split ``"train"`` / ``"query"`` / ``"gallery"``; query and gallery share the
test items (disjoint from train). Rows get domain ``"query"`` / ``"gallery"`` for the test
rows (``"shop"`` for train), so ``catalog.query_gallery("query", "gallery", split=None)`` is the
official evaluation. An item's description is its ``description`` list joined with spaces
(optionally prefixed by its ``color``); items with no entry in the JSON get ``None``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np

from atl_keras.data.catalog import Catalog, check_disjoint_splits

__all__ = [
    "DESCRIPTION_FILE",
    "PARTITION_FILE",
    "inshop_query_gallery",
    "read_deepfashion_inshop",
]

PARTITION_FILE = os.path.join("Eval", "list_eval_partition.txt")
DESCRIPTION_FILE = os.path.join("Anno", "list_description_inshop.json")
_HEADER = ["image_name", "item_id", "evaluation_status"]
_STATUSES = ("train", "query", "gallery")
_LAYOUT = (
    "Expected the official In-shop layout: <root>/Eval/list_eval_partition.txt, "
    "<root>/Anno/list_description_inshop.json and the images under <root>/img/ "
    "(or <root>/Img/img/)."
)


def _join_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(t for t in (_join_text(v) for v in value) if t)
    return " ".join(str(value).split())


def _read_partition(path: str) -> list[tuple[str, str, str]]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a row-count line and a header line, got {len(lines)} lines. {_LAYOUT}")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise ValueError(f"{path}:1: expected the number of rows, got {lines[0].strip()!r}.") from None
    if lines[1].split() != _HEADER:
        raise ValueError(f"{path}:2: expected the header {' '.join(_HEADER)!r}, got {lines[1].strip()!r}.")
    rows = []
    for line_no, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"{path}:{line_no}: expected 'image_name item_id evaluation_status', got {line.strip()!r}.")
        if fields[2] not in _STATUSES:
            raise ValueError(f"{path}:{line_no}: evaluation_status must be one of {_STATUSES}, got {fields[2]!r}.")
        rows.append((fields[0], fields[1], fields[2]))
    if declared != len(rows):
        raise ValueError(
            f"{path}: line 1 declares {declared} rows but the file has {len(rows)}; the file is truncated or edited."
        )
    return rows


def _read_descriptions(path: str, include_color: bool) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}). {_LAYOUT}") from err
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of objects with 'item' and 'description', got {type(entries).__name__}.")
    texts: dict[str, str] = {}
    extras: dict[str, dict[str, Any]] = {}
    conflicts: list[str] = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or "item" not in entry:
            raise ValueError(f"{path}: entry {position} has no 'item' key: {str(entry)[:120]!r}.")
        item = str(entry["item"])
        text = _join_text(entry.get("description"))
        color = _join_text(entry.get("color"))
        if include_color and color:
            text = f"{color}. {text}" if text else color
        if item in texts:
            if text and text != texts[item]:
                conflicts.append(item)
            continue
        texts[item] = text
        extras[item] = {k: v for k, v in entry.items() if k not in ("item", "description")}
    if conflicts:
        warnings.warn(
            f"{path}: {len(conflicts)} items have several different entries (first kept): {conflicts[:5]}.",
            stacklevel=3,
        )
    return texts, extras


def _image_root(root: str, first_image: str) -> str:
    """``root`` or ``root/Img``: whichever holds the listed image paths."""
    for base in (root, os.path.join(root, "Img")):
        if os.path.exists(os.path.join(base, first_image)) or os.path.isdir(os.path.join(base, first_image.split("/")[0])):
            return base
    return root


def read_deepfashion_inshop(
    root: str | os.PathLike,
    include_color: bool = False,
    check_images: bool = True,
) -> Catalog:
    """Read DeepFashion In-shop from ``root`` (see the module docstring for the layout).

    Args:
        root: dataset folder holding ``Eval/``, ``Anno/`` and ``img/``.
        include_color: prefix each description with the item's ``color`` field.
        check_images: raise `FileNotFoundError` when the image folder is missing altogether
            (individual missing or corrupt files are reported when images are loaded).
    Returns:
        `Catalog` with ``image_paths`` (absolute), splits ``train``/``query``/``gallery``,
        domains ``shop``/``query``/``gallery``, items in order of first appearance, and
        ``item_attributes`` holding the JSON's other fields (e.g. ``color``).
    Raises:
        FileNotFoundError: a required file (or the image folder) is missing; names it and the layout.
        ValueError: malformed partition or description file (names file and line), or an item
            in both train and query/gallery.
    """
    root = os.path.abspath(os.fspath(root))
    partition_path = os.path.join(root, PARTITION_FILE)
    description_path = os.path.join(root, DESCRIPTION_FILE)
    missing = [p for p in (partition_path, description_path) if not os.path.isfile(p)]
    if not os.path.isdir(root) or missing:
        what = f"folder {root!r} does not exist" if not os.path.isdir(root) else f"missing {missing}"
        raise FileNotFoundError(f"DeepFashion In-shop: {what}. {_LAYOUT}")
    rows = _read_partition(partition_path)
    if not rows:
        raise ValueError(f"{partition_path}: no image rows.")
    texts, extras = _read_descriptions(description_path, include_color)
    image_root = _image_root(root, rows[0][0])
    if check_images and not os.path.isdir(os.path.join(image_root, rows[0][0].split("/")[0])):
        raise FileNotFoundError(
            f"DeepFashion In-shop: image folder {os.path.join(root, rows[0][0].split('/')[0])!r} not found "
            f"(first listed image: {rows[0][0]!r}). {_LAYOUT}"
        )
    check_disjoint_splits([r[1] for r in rows], [r[2] for r in rows], where=[f"{partition_path}: " for _ in rows])

    item_index: dict[str, int] = {}
    for _, item, _ in rows:
        item_index.setdefault(item, len(item_index))
    item_ids = list(item_index)
    return Catalog(
        item_ids=item_ids,
        descriptions=[texts.get(item) or None for item in item_ids],
        labels=np.array([item_index[item] for _, item, _ in rows], np.int64),
        domains=np.array(["shop" if status == "train" else status for _, _, status in rows]),
        splits=np.array([status for _, _, status in rows]),
        images=None,
        image_paths=[os.path.join(image_root, name) for name, _, _ in rows],
        item_attributes=[extras.get(item, {}) for item in item_ids],
    )


def inshop_query_gallery(catalog: Catalog) -> tuple[Catalog, Catalog]:
    """The official In-shop evaluation: ``(query rows, gallery rows)`` of the test items."""
    return catalog.query_gallery(query_domain="query", gallery_domain="gallery", split=("query", "gallery"))

"""Fashion-MNIST from local IDX files, with one catalog-style description per class.

    data = load_fashion_mnist("train")          # images uint8 [60000, 28, 28, 1], labels int64 [60000]
    texts = data.item_descriptions(data.labels[:4])

Files are looked up (nothing is downloaded) in, in this order:
  1. ``data_dir`` when given (and then only there);
  2. the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
     or wherever ``dpkg -L dataset-fashion-mnist`` says its files are);
  3. the Keras cache ``~/.keras/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "CLASS_DESCRIPTIONS",
    "CLASS_NAMES",
    "FashionMNIST",
    "find_fashion_mnist_dir",
    "load_fashion_mnist",
    "read_idx",
]

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Catalog-style product copy. Related garments share wording on purpose (upper-body tops:
# T-shirt / Shirt / Pullover / Coat; footwear: Sandal / Sneaker / Ankle boot), so a text
# encoder puts them close together and the adaptive margin separates them only gently.
CLASS_DESCRIPTIONS: tuple[str, ...] = (
    "Short-sleeved cotton crew-neck T-shirt, a casual everyday top with a relaxed fit.",
    "Full-length straight-leg trousers with a mid-rise waist and belt loops, tailored pants "
    "for work or weekend.",
    "Long-sleeved knitted pullover sweater with a crew neck and ribbed cuffs, a warm "
    "everyday top.",
    "Knee-length sleeveless dress with a fitted waist and flowing skirt, a one-piece outfit "
    "for summer or evening.",
    "Long-sleeved buttoned winter coat with a collar and front pockets, warm outerwear worn "
    "over a top.",
    "Open-toe summer sandal with adjustable straps and a flat sole, light casual footwear.",
    "Long-sleeved cotton button-down shirt with a pointed collar, a smart casual everyday top.",
    "Low-top lace-up canvas sneaker with a rubber sole, comfortable casual footwear for "
    "everyday wear.",
    "Leather shoulder bag with a zip top and adjustable strap, a roomy everyday handbag.",
    "Lace-up leather ankle boot with a low heel and rubber sole, sturdy casual footwear that "
    "covers the ankle.",
)

SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_SIZES = {"train": 60000, "test": 10000}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class FashionMNIST:
    """One split: ``images`` uint8 ``[N, 28, 28, 1]``, ``labels`` int64 ``[N]`` in 0..9."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    descriptions: list[str]  # one per class, indexed by label

    def item_descriptions(self, labels: Sequence[int] | np.ndarray) -> list[str]:
        """Description text of each label in ``labels`` (``[n]`` -> ``n`` strings)."""
        labels = np.asarray(labels).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.descriptions)):
            raise ValueError(
                f"labels must be in 0..{len(self.descriptions) - 1}, got values in "
                f"{labels.min()}..{labels.max()}."
            )
        return [self.descriptions[int(label)] for label in labels]

    def __len__(self) -> int:
        return len(self.labels)


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    IDX: 2 zero bytes, a type byte (0x08 = uint8, ...), a byte with the number of
    dimensions, one big-endian uint32 per dimension, then the row-major data.

    Raises:
        ValueError: bad magic number, unexpected number of dimensions, or a data size that
            does not match the header (truncated / corrupt file).
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; EOFError = truncated gz
        raise ValueError(
            f"Cannot read IDX file {path!r}: {err}. The file is corrupt or truncated; reinstall it "
            f"(apt-get install --reinstall {DEBIAN_PACKAGE}) or pass another data_dir."
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path!r} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; expected "
            "00 00 <type> <ndim>, e.g. 00000803 for images, 00000801 for labels)."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path!r} has {ndim} dimensions in its IDX header, expected {expected_ndim}.")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path!r} is truncated inside its IDX header.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected_bytes:
        raise ValueError(
            f"{path!r}: IDX header says shape {shape} ({expected_bytes} data bytes) but the file has "
            f"{len(raw) - header_size}. The file is corrupt or truncated."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _find_file(directory: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _has_split(directory: str, split: str) -> bool:
    return all(_find_file(directory, stem) is not None for stem in SPLIT_FILES[split])


def _dpkg_dirs() -> list[str]:
    """Directories holding the IDX files of the Debian package, as ``dpkg -L`` lists them."""
    if shutil.which("dpkg") is None:
        return []
    try:
        listing = subprocess.run(
            ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    dirs = [os.path.dirname(line.strip()) for line in listing.splitlines() if "idx" in line]
    return list(dict.fromkeys(dirs))


def _keras_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".keras", "datasets", "fashion-mnist")


def find_fashion_mnist_dir(split: str = "train", data_dir: str | os.PathLike | None = None) -> str:
    """Directory holding the IDX files of ``split`` (see the module docstring for the order)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}.")
    expected = ", ".join(f"{stem}.gz" for stem in SPLIT_FILES[split])
    if data_dir is not None:
        directory = os.path.expanduser(os.fspath(data_dir))
        if _has_split(directory, split):
            return directory
        raise FileNotFoundError(
            f"Fashion-MNIST {split!r} files ({expected}) not found in data_dir={directory!r}. "
            f"Point data_dir at the folder holding them, or install them with "
            f"`apt-get install {DEBIAN_PACKAGE}` and leave data_dir=None."
        )
    candidates = [DEBIAN_DIR]
    if not os.path.isdir(DEBIAN_DIR):
        candidates += _dpkg_dirs()
    candidates.append(_keras_cache_dir())
    for directory in candidates:
        if _has_split(directory, split):
            return directory
    raise FileNotFoundError(
        f"Fashion-MNIST {split!r} files ({expected}) were not found in {', '.join(candidates)}. "
        f"Install them with `apt-get install {DEBIAN_PACKAGE}` (files land in {DEBIAN_DIR}) or "
        "pass data_dir='/folder/with/the/idx/files'. Nothing is downloaded at run time."
    )


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> FashionMNIST:
    """Load a Fashion-MNIST split from local IDX files.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000).
        data_dir: folder with the (gzipped) IDX files; ``None`` searches the Debian package
            and the Keras cache.
    Returns:
        `FashionMNIST` with ``images`` uint8 ``[N, 28, 28, 1]`` and ``labels`` int64 ``[N]``.
    Raises:
        FileNotFoundError: files not found (the message says how to get them).
        ValueError: corrupt files, or image and label counts that disagree.
    """
    directory = find_fashion_mnist_dir(split, data_dir)
    images_stem, labels_stem = SPLIT_FILES[split]
    images_path = _find_file(directory, images_stem)
    labels_path = _find_file(directory, labels_stem)
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(
            f"Fashion-MNIST IDX files must hold uint8 data, got {images.dtype} images and "
            f"{labels.dtype} labels in {directory!r}."
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path!r} has {len(images)} images but {labels_path!r} has {len(labels)} labels."
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{labels_path!r} has label {labels.max()}; Fashion-MNIST labels are 0..9.")
    return FashionMNIST(
        images=images[..., None],
        labels=labels.astype(np.int64),
        class_names=list(CLASS_NAMES),
        descriptions=list(CLASS_DESCRIPTIONS),
    )

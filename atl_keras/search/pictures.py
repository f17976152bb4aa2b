"""Pictures of search results: a neighbour grid and the calibration's precision/recall plot.

    neighbour_grid("grid.png", query_images, result_image_ids, ids, scores,
                   correct=ids == expected[:, None], image_root="catalog/")
    plot_precision_recall("pr.png", index.calibrate(queries, expected_ids))

Result images are given as what the index knows about each row: its image id or path
(resolved as a file, else under ``image_root``: ``<root>/<image id>``, then with an image
extension added), encoded bytes, or pixels ``[H, W, C]``. A result whose image cannot be
found is drawn as a grey tile saying so, never silently blank.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

__all__ = ["neighbour_grid", "plot_precision_recall", "resolve_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
CORRECT_COLOUR, WRONG_COLOUR = "#1a9641", "#d7191c"


def _decode(data: bytes) -> np.ndarray:
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    return image


def resolve_image(image: Any, image_root: str | os.PathLike | None = None) -> np.ndarray | None:
    """Pixels ``uint8 [H, W, 3]`` of a path / image id under `image_root` / bytes / array, or None."""
    if image is None:
        return None
    if isinstance(image, np.ndarray) and image.ndim == 3:
        pixels = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
        return np.clip(pixels, 0, 255).astype(np.uint8)
    if isinstance(image, (bytes, bytearray)):
        return _decode(bytes(image))
    name = os.fspath(image)
    candidates = [name]
    if image_root is not None:
        root = os.fspath(image_root)
        candidates += [os.path.join(root, name)] + [os.path.join(root, name + ext) for ext in IMAGE_EXTENSIONS]
    for path in candidates:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return _decode(f.read())
    return None


def neighbour_grid(
    path: str | os.PathLike | None,
    queries: Sequence[Any],
    results: Sequence[Sequence[Any]],
    ids: Sequence[Sequence[str]],
    scores: Any,
    *,
    correct: Any = None,
    image_root: str | os.PathLike | None = None,
    query_titles: Sequence[str] | None = None,
) -> Any:
    """One row per query: the query image, then its results with id and score.

    Args:
        path: where to write the PNG (None: only return the figure).
        queries: ``Q`` query images (paths, bytes or pixels ``[H, W, C]``).
        results: ``[Q][k]`` result images: the index's image ids or paths (resolved under
            `image_root`), bytes or pixels.
        ids: ``[Q][k]`` item ids written above each result; scores ``[Q, k]``.
        correct: optional ``[Q, k]`` bool: correct results get a green frame, wrong ones red.
        query_titles: text above each query (default ``"query"``).

    Returns:
        The matplotlib figure (closed after saving when `path` is given).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(results) != len(queries) or len(ids) != len(queries):
        raise ValueError(f"{len(queries)} queries, {len(results)} result rows and {len(ids)} id rows: "
                         "give one row of results per query.")
    scores = np.asarray(scores, dtype=np.float64)
    k = max((len(row) for row in results), default=0)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.7 * (k + 1), 1.95 * len(queries)), squeeze=False)
    for row, query in enumerate(queries):
        query_pixels = resolve_image(query, image_root)
        axes[row, 0].imshow(query_pixels if query_pixels is not None else np.full((8, 8, 3), 200, np.uint8))
        axes[row, 0].set_title(query_titles[row] if query_titles else "query", fontsize=8, fontweight="bold")
        for col in range(k):
            ax = axes[row, col + 1]
            if col >= len(results[row]) or ids[row][col] in (None, ""):
                ax.axis("off")
                continue
            pixels = resolve_image(results[row][col], image_root)
            if pixels is None:
                ax.imshow(np.full((8, 8, 3), 200, np.uint8))
                ax.text(3.5, 3.5, f"image not found:\n{results[row][col]}", ha="center", va="center",
                        fontsize=6, wrap=True)
            else:
                ax.imshow(pixels)
            ax.set_title(f"{ids[row][col]}\n{scores[row, col]:.3f}", fontsize=7)
            if correct is not None:
                colour = CORRECT_COLOUR if bool(np.asarray(correct)[row, col]) else WRONG_COLOUR
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(4)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def plot_precision_recall(path: str | os.PathLike | None, calibration: Any) -> Any:
    """Precision (and its lower bound) and recall against the match threshold, the chosen one marked.

    ``calibration``: a `atl_keras.search.calibration.Calibration`. Returns the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(calibration.thresholds, calibration.curve_precision, label="precision", color="#2c7bb6")
    if calibration.confidence is not None:
        ax.plot(calibration.thresholds, calibration.precision_lower, "--", color="#2c7bb6", linewidth=0.8,
                label=f"precision, {calibration.confidence:.0%} lower bound")
    ax.plot(calibration.thresholds, calibration.curve_recall, label="recall", color="#fdae61")
    ax.axhline(calibration.target_precision, color="grey", linewidth=0.6)
    if calibration.threshold is not None:
        ax.axvline(calibration.threshold, color="black", linewidth=0.8)
        ax.set_title(f"threshold {calibration.threshold:.4f}: precision {calibration.precision:.3f}, "
                     f"recall {calibration.recall:.3f} ({calibration.num_queries} queries)", fontsize=9)
    else:
        ax.set_title(f"no threshold reaches precision {calibration.target_precision}", fontsize=9)
    ax.set_xlabel("match threshold (best score)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig

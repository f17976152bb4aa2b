"""ScaNN gallery index: configuration from the gallery size, build, recall check.

Embeddings are unit vectors, so the index scores by dot product (cosine similarity;
squared L2 = 2 - 2 * score gives the same ranking).

    config = scann_config_for(len(gallery))
    searcher = build_scann_searcher(gallery, config)          # TF ops searcher
    ids, scores = searcher.search_batched(queries, final_num_neighbors=10)
    recall = scann_recall(searcher, queries, gallery, k=10)   # against exact search
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

# ScaNN's TF ops must be registered before a SavedModel that uses them is loaded.
from atl_keras._optional import require

require("scann", "scann", "atl_keras.index (the ScaNN gallery index)")  # registers the Scann>* ops
from scann.scann_ops.py import scann_ops

from atl_keras.search import exact_search

#: Below this gallery size a tree + hashing index buys nothing: score every item.
BRUTE_FORCE_BELOW = 2000


@dataclass(frozen=True)
class ScannConfig:
    """How the gallery is partitioned, scored and re-ranked.

    `num_leaves == 0` means no partitioning tree and exact float scoring of every item
    (small galleries).
    """

    num_leaves: int = 0
    num_leaves_to_search: int = 0
    training_sample_size: int = 0
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder_k: int = 0
    default_k: int = 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def brute_force(self) -> bool:
        return self.num_leaves == 0


def scann_config_for(gallery_size: int, k: int = 10) -> ScannConfig:
    """The default index for a gallery of `gallery_size` items.

    Tree with about sqrt(N) leaves, searching ~15% of them (at least 16), asymmetric
    hashing with 2 dims per block and anisotropic threshold 0.2, then exact
    re-ranking of the best max(100, 10 k) candidates. Below `BRUTE_FORCE_BELOW` items it
    scores everything exactly.
    """
    if gallery_size < 1:
        raise ValueError(f"The gallery is empty (gallery_size={gallery_size}).")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if gallery_size < BRUTE_FORCE_BELOW:
        return ScannConfig(default_k=min(k, gallery_size))
    num_leaves = int(round(math.sqrt(gallery_size)))
    return ScannConfig(
        num_leaves=num_leaves,
        num_leaves_to_search=min(num_leaves, max(16, int(math.ceil(0.15 * num_leaves)))),
        training_sample_size=min(gallery_size, 100_000),
        reorder_k=min(gallery_size, max(100, 10 * k)),
        default_k=k,
    )


def build_scann_searcher(
    gallery: np.ndarray, config: ScannConfig | None = None
) -> scann_ops.ScannSearcher:
    """A ScaNN TF-ops searcher over `gallery [N, D]` (float32, dot-product scores)."""
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if gallery.ndim != 2 or gallery.shape[0] == 0:
        raise ValueError(f"gallery must be a non-empty [N, D] array, got shape {gallery.shape}.")
    if not np.all(np.isfinite(gallery)):
        raise ValueError("gallery embeddings contain NaN or Inf; re-embed the gallery.")
    config = config or scann_config_for(len(gallery))
    builder = scann_ops.builder(gallery, config.default_k, "dot_product")
    if config.brute_force:
        builder = builder.score_brute_force()
    else:
        builder = builder.tree(
            num_leaves=config.num_leaves,
            num_leaves_to_search=config.num_leaves_to_search,
            training_sample_size=config.training_sample_size,
        ).score_ah(
            config.dimensions_per_block,
            anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
        )
        if config.reorder_k > 0:
            builder = builder.reorder(config.reorder_k)
    return builder.build()


def scann_recall(
    searcher: scann_ops.ScannSearcher,
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int = 10,
    epsilon: float = 1e-3,
) -> float:
    """Recall@k of the searcher against exact dot-product search, ties counted.

    As ann-benchmarks defines it: a returned item counts as a true neighbour when its
    exact score is within `epsilon` of the exact k-th best score, so items tied (to
    `epsilon`) with the k-th neighbour are interchangeable. Trained embeddings put many
    gallery items of one class within 1e-4 of each other; counting only the exact
    index set would call a perfectly good index bad. `epsilon=0` gives the strict
    index-set recall (up to exact ties).

    Args:
        queries: `[Q, D]`; gallery: `[N, D]` float32 unit vectors.

    Returns:
        Mean over queries of (true neighbours among the k returned) / k.
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    k = min(k, len(gallery))
    exact_indices, _ = exact_search(queries, gallery, k, distance="dot")
    approx_indices, _ = searcher.search_batched(queries, final_num_neighbors=k)
    approx_indices = np.asarray(approx_indices)
    kth_best = np.einsum("qd,qd->q", queries, gallery[exact_indices[:, -1]])
    hits = 0
    for query, row, threshold in zip(queries, approx_indices, kth_best - epsilon):
        row = row[row >= 0]  # ScaNN pads with -1 when it finds fewer than k
        scores = gallery[row] @ query
        hits += min(k, int(np.sum(scores >= threshold)))
    return hits / float(k * len(queries))

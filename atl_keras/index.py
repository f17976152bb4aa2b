"""ScaNN gallery index: build, an honest recall measurement, and tuning to a recall target.

Embeddings are unit vectors, so the index scores by dot product (cosine similarity;
squared L2 = 2 - 2 * score gives the same ranking).

    tuned = tune_index(gallery, k=10, min_recall=0.95)        # fastest config meeting 0.95
    tuned.searcher.search_batched_parallel(queries, final_num_neighbors=10,
                                           leaves_to_search=tuned.config.num_leaves_to_search)
    tuned.report["set_recall"], tuned.report["tie_aware_recall"]

Recall is measured as **plain set recall@k** against exact search (|ANN top-k ∩ exact
top-k| / k) on held-out queries: gallery items sampled as queries with themselves excluded
from both result lists (or real held-out query embeddings). Trained embeddings are tight:
thousands of items can sit within 1e-3 of a query's k-th score, so the tie-aware recall of
ann-benchmarks (`scann_recall`) reads ~1.0 for almost any index; it is reported beside the
set recall, never gated on.

Tuning (`tune_index`): spherical k-means trees are built for exact float scoring inside the searched leaves
(``scoring="exact"``; ~sqrt(N) leaves, and 2x / 4x that from 20k items on; ~sqrt(N) leaves
also with int8 centre scores) and for
asymmetric hashing with exact re-ranking (``scoring="ah"``, ~sqrt(N) leaves); leaves
searched and the re-rank size are search-time parameters of ScaNN, so the sweep over them
costs searches, not builds. The fastest configuration
(batched search of the held-out queries on all cores) that meets the target wins. A tree
winner is then tried with *adaptive* leaf search (ScaNN's additive query spilling: every
leaf whose centre scores within a threshold of the best centre's, up to twice the fixed
count): the threshold is bisected to the lowest that meets the target on the same tree, and
it is kept when it scores fewer gallery items per query than the fixed count (fmnist 69k:
~1,010-1,060 items instead of ~1,160 on a 263-leaf tree).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

# ScaNN's TF ops must be registered before a SavedModel that uses them is loaded.
from atl_keras._optional import require

require("scann", "scann", "atl_keras.index (the ScaNN gallery index)")  # registers the Scann>* ops
from google.protobuf import text_format
from scann.proto import scann_pb2
from scann.scann_ops.py import scann_ops

from atl_keras.search.exact import ExactSearcher, exact_search

#: Below this gallery size a tree + hashing index buys nothing: score every item.
BRUTE_FORCE_BELOW = 2000
SCORINGS = ("exact", "ah")
#: Galleries at least this large also try trees with 2x and 4x sqrt(N) leaves.
MORE_LEAVES_ABOVE = 20_000
#: Rows the AH codebooks (16 centres per 2-dim block) are trained on: plenty for 16 centres,
#: and a 100k sample (ScaNN's default) made the AH build's transient ~3 KB per gallery item.
AH_TRAINING_SAMPLE = 25_000
#: Held-out queries sampled from the gallery for the gate and the tuning.
DEFAULT_QUERIES = 1000
#: Adaptive leaf search may search up to this many times the fixed leaf count that met the target.
SPILL_CAP_FACTOR = 2
#: Bisection steps over log(threshold) in [1e-5 |q|, 2 |q|]: the threshold found is within ~5%
#: of the lowest that meets the target.
SPILL_BISECTION_STEPS = 8


@dataclass(frozen=True)
class ScannConfig:
    """How the gallery is partitioned, scored and re-ranked.

    `num_leaves == 0` means no partitioning tree and exact float scoring of every item
    (small galleries). ``scoring="exact"`` scores the items of the searched leaves with
    exact dot products (no re-ranking needed); ``"ah"`` scores them with asymmetric
    hashing and re-ranks the best ``reorder_k`` exactly. ``spherical=True`` trains the tree
    with spherical k-means (unit-norm centres: the right partition for dot-product search
    of unit vectors; `tune_index` uses it). ``quantize_centroids=True`` picks the leaves to
    search with int8 centre scores (cheaper tree step; the leaves' items are still scored as
    ``scoring`` says). ``spill_threshold > 0`` makes the leaf search adaptive: a query searches
    every leaf whose centre's dot-product score is within `spill_threshold` of its best centre's,
    at most `num_leaves_to_search` leaves (ScaNN's additive query spilling); ``0`` searches
    exactly `num_leaves_to_search` leaves.
    """

    num_leaves: int = 0
    num_leaves_to_search: int = 0
    training_sample_size: int = 0
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder_k: int = 0
    default_k: int = 10
    scoring: str = "ah"
    spherical: bool = False
    quantize_centroids: bool = False
    spill_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.num_leaves == 0 and self.scoring == "ah":
            # Brute force scores every item exactly: the manifest must not say "ah" for it.
            object.__setattr__(self, "scoring", "exact")
        if not self.spill_threshold >= 0.0:  # also refuses NaN
            raise ValueError(f"spill_threshold must be >= 0, got {self.spill_threshold}.")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}.")
        if self.num_leaves < 0 or self.num_leaves_to_search < 0 or self.reorder_k < 0:
            raise ValueError("num_leaves, num_leaves_to_search and reorder_k must be >= 0.")
        if self.num_leaves and not 1 <= self.num_leaves_to_search <= self.num_leaves:
            raise ValueError(
                f"num_leaves_to_search must be in [1, num_leaves={self.num_leaves}], "
                f"got {self.num_leaves_to_search}."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ScannConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def brute_force(self) -> bool:
        return self.num_leaves == 0

    @property
    def search_kwargs(self) -> dict[str, int]:
        """Search-time overrides passed to every search (``-1`` = the searcher's default)."""
        if self.brute_force:
            return {"leaves_to_search": -1, "pre_reorder_num_neighbors": -1}
        reorder = self.reorder_k if self.scoring == "ah" and self.reorder_k > 0 else -1
        # -1: the searcher's own query spilling (adaptive, capped at num_leaves_to_search)
        leaves = -1 if self.spill_threshold > 0 else self.num_leaves_to_search
        return {"leaves_to_search": leaves, "pre_reorder_num_neighbors": reorder}


def default_num_leaves(gallery_size: int) -> int:
    """About sqrt(N) leaves (ScaNN's rule of thumb)."""
    return max(2, int(round(math.sqrt(gallery_size))))


def scann_config_for(gallery_size: int, k: int = 10) -> ScannConfig:
    """An untuned starting index for a gallery of `gallery_size` items.

    Tree with about sqrt(N) leaves, searching ~15% of them (at least 16), asymmetric
    hashing with 2 dims per block and anisotropic threshold 0.2, then exact re-ranking
    of the best max(100, 10 k) candidates. Below `BRUTE_FORCE_BELOW` items it scores
    everything exactly. `tune_index` replaces the search-time knobs with measured ones.
    """
    if gallery_size < 1:
        raise ValueError(f"The gallery is empty (gallery_size={gallery_size}).")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if gallery_size < BRUTE_FORCE_BELOW:
        return ScannConfig(default_k=min(k, gallery_size))
    num_leaves = default_num_leaves(gallery_size)
    return ScannConfig(
        num_leaves=num_leaves,
        num_leaves_to_search=min(num_leaves, max(16, int(math.ceil(0.15 * num_leaves)))),
        training_sample_size=min(gallery_size, 100_000),
        reorder_k=min(gallery_size, max(100, 10 * k)),
        default_k=k,
    )


#: TensorFlow wraps host memory without a copy only when it starts on this boundary.
TF_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a `TF_ALIGNMENT`-byte boundary.

    Galleries built in one (`EmbeddingCache.gather` does) are handed to ScaNN's build op
    without the per-build copies of a numpy -> tensor conversion (see `build_scann_searcher`).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + TF_ALIGNMENT, np.uint8)
    offset = (-buffer.ctypes.data) % TF_ALIGNMENT
    return buffer[offset:offset + nbytes].view(dtype).reshape(shape)


def _check_gallery(gallery: np.ndarray) -> np.ndarray:
    """`gallery` as finite float32 [N, D], C-contiguous, writeable, `TF_ALIGNMENT`-aligned (copied if not)."""
    gallery = np.asarray(gallery)
    if gallery.ndim != 2 or gallery.shape[0] == 0:
        raise ValueError(f"gallery must be a non-empty [N, D] array, got shape {gallery.shape}.")
    usable = gallery.dtype == np.float32 and gallery.flags.c_contiguous and gallery.flags.writeable  # DLPack: no read-only
    if not (usable and gallery.ctypes.data % TF_ALIGNMENT == 0):
        aligned = aligned_empty(gallery.shape)
        aligned[...] = gallery
        gallery = aligned
    if not np.all(np.isfinite(gallery)):
        raise ValueError("gallery embeddings contain NaN or Inf; re-embed the gallery.")
    return gallery


def _zero_copy_tensor(array: np.ndarray) -> Any:
    """A tf.Tensor over the memory of an aligned C-contiguous `array` (DLPack: no copy).

    Passing the numpy array to ScaNN's build op instead converts it, which costs two
    transient copies of the gallery per build (100k x 128: build peak +198 MB -> +101 MB).
    """
    import tensorflow as tf

    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def build_scann_searcher(
    gallery: np.ndarray, config: ScannConfig | None = None
) -> scann_ops.ScannSearcher:
    """A ScaNN TF-ops searcher over `gallery [N, D]` (float32, dot-product scores).

    Search it with ``**config.search_kwargs`` to get the configured leaves / re-rank size.
    """
    gallery = _check_gallery(gallery)
    config = config or scann_config_for(len(gallery))
    builder = scann_ops.builder(_zero_copy_tensor(gallery), config.default_k, "dot_product")
    if config.brute_force:
        return builder.score_brute_force().build()
    builder = builder.tree(
        num_leaves=config.num_leaves,
        num_leaves_to_search=config.num_leaves_to_search,
        training_sample_size=config.training_sample_size or min(len(gallery), 100_000),
        spherical=config.spherical,
        quantize_centroids=config.quantize_centroids,
    )
    if config.scoring == "exact":
        builder = builder.score_brute_force()
    else:
        builder = builder.score_ah(
            config.dimensions_per_block,
            anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
            training_sample_size=min(len(gallery), AH_TRAINING_SAMPLE),
        )
        if config.reorder_k > 0:
            builder = builder.reorder(config.reorder_k)
    # The builder writes a fixed leaf count; the proto also carries an adaptive one.
    proto = text_format.Parse(builder.create_config(), scann_pb2.ScannConfig())
    _set_query_spilling(proto, config.spill_threshold, config.num_leaves_to_search)
    return scann_ops.create_searcher(builder.db, text_format.MessageToString(proto))


def _set_query_spilling(proto: Any, threshold: float, max_leaves: int) -> None:
    """Set a ScaNN config proto's query spilling: additive `threshold` (> 0) or a fixed count,
    at most `max_leaves` leaves either way."""
    spilling = proto.partitioning.query_spilling
    if threshold > 0:
        spilling.spilling_type = spilling.ADDITIVE
        spilling.spilling_threshold = threshold
    else:
        spilling.spilling_type = spilling.FIXED_NUMBER_OF_CENTERS
        spilling.ClearField("spilling_threshold")
    spilling.max_spill_centers = max_leaves


def searcher_from_tensors(tensors: Sequence[Any], config: ScannConfig) -> scann_ops.ScannSearcher:
    """A searcher over an already built index (`scann_ops.scann_to_tensors` output) with the
    leaf search of `config` (fixed or adaptive): same tree and leaves, no training (69k x 64:
    0.06 s; 200k x 128: 0.3 s). Each call holds its own copy of the index; free it with
    `release_searcher`."""
    import tensorflow as tf

    config_bytes, partitioner, tokens, codebook, hashed, int8, multipliers, norms, dataset = tensors
    proto = scann_pb2.ScannConfig.FromString(config_bytes.numpy()[0])
    _set_query_spilling(proto, config.spill_threshold, config.num_leaves_to_search)
    handle = scann_ops.tensors_to_scann(
        dataset, tf.constant([proto.SerializeToString()]), partitioner, tokens, codebook,
        hashed, int8, multipliers, norms, shared_name=f"atl-scann-{uuid.uuid4()}",
    )
    return scann_ops.ScannSearcher(handle)


def release_searcher(searcher: Any) -> None:
    """Free a TF-ops ScaNN searcher now (its resource holds a copy of the gallery).

    `scann_ops` searchers live in TensorFlow's resource manager under a unique shared
    name: dropping the Python object does not free them (each build during tuning
    leaked ~N * D * 4 bytes). Searchers without a handle are left to the garbage collector.
    """
    import tensorflow as tf

    handle = getattr(searcher, "searcher_handle", None)
    if handle is not None:
        tf.raw_ops.DestroyResourceOp(resource=handle, ignore_lookup_error=True)
        searcher.searcher_handle = None


def searcher_to_state(searcher: Any) -> Any:
    """The searcher's index as a `scann_ops.ScannState` module (the SavedModel's variables), and
    the searcher released: its tensors are read out first and the searcher is freed before the
    variables are made, so at most two copies of the index exist at once, not three
    (``searcher.serialize_to_module()`` keeps the searcher alive throughout; 100k x 128: -50 MB peak).
    """
    tensors = scann_ops.scann_to_tensors(searcher.searcher_handle)
    release_searcher(searcher)
    return scann_ops.ScannState(tensors)


# ---------------------------------------------------------------------------------- recall
@dataclass
class HeldOutQueries:
    """Query embeddings ``[Q, D]`` and, per query, the gallery row to exclude (-1: none)."""

    embeddings: np.ndarray
    exclude: np.ndarray
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "count": int(len(self.embeddings))}


def held_out_queries(
    gallery: np.ndarray,
    queries: np.ndarray | None = None,
    count: int = DEFAULT_QUERIES,
    seed: int = 0,
) -> HeldOutQueries:
    """Real held-out `queries` if given, else `count` gallery items that exclude themselves."""
    if queries is not None:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return HeldOutQueries(queries, np.full(len(queries), -1, np.int64), "held-out query images")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(gallery), size=min(count, len(gallery)), replace=False))
    return HeldOutQueries(
        np.ascontiguousarray(gallery[rows]), rows.astype(np.int64),
        "gallery items sampled as queries, themselves excluded",
    )


def exact_neighbors(gallery: np.ndarray, queries: HeldOutQueries, k: int, chunk_size: int = 32) -> np.ndarray:
    """Exact top-k gallery rows ``[Q, k]`` of the held-out queries (dot product).

    The package's one exact search (`atl_keras.search.ExactSearcher`, as the export's
    ``retrieve_exact``): best score first, equal scores by increasing row; each query's
    ``exclude`` row is never returned. `chunk_size` queries at a time: extra memory is a
    ``[chunk_size, N]`` float32 block (128 B per gallery item at the default) beside the
    searcher's copy of the gallery.
    """
    n = len(gallery)
    limit = n - 1 if np.any(queries.exclude >= 0) else n
    if not 1 <= k <= limit:
        raise ValueError(f"k must be in [1, {limit}] for a gallery of {n} items, got {k}.")
    searcher = ExactSearcher(gallery, distance="dot")
    indices, _ = searcher.search(queries.embeddings, k, chunk_size=chunk_size, exclude=queries.exclude)
    return indices


def drop_excluded(indices: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """``[Q, k + 1]`` ANN results -> ``[Q, k]`` without each query's own row (-1 padded)."""
    indices = np.asarray(indices)
    out = np.full((len(indices), k), -1, np.int64)
    for row, (found, own) in enumerate(zip(indices, exclude)):
        kept = found[(found != own) & (found >= 0)][:k]
        out[row, : len(kept)] = kept
    return out


def set_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx_i ∩ exact_i| / k (``-1`` entries never count)."""
    approx, exact = np.asarray(approx), np.asarray(exact)
    k = exact.shape[1]
    hits = sum(len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / float(k * len(exact))


def tie_aware_recall(
    approx: np.ndarray, exact: np.ndarray, queries: np.ndarray, gallery: np.ndarray, epsilon: float = 1e-3
) -> float:
    """ann-benchmarks recall: a result counts when its score is within `epsilon` of the exact k-th."""
    k = exact.shape[1]
    kth = np.einsum("qd,qd->q", queries, gallery[exact[:, -1]]) - epsilon
    hits = 0
    for query, row, threshold in zip(queries, np.asarray(approx), kth):
        row = row[row >= 0]
        hits += min(k, int(np.sum(gallery[row] @ query >= threshold)))
    return hits / float(k * len(queries))


def search_held_out(
    searcher: Any, queries: HeldOutQueries, k: int, parallel: bool = True, **search_kwargs: int
) -> np.ndarray:
    """ANN top-k ``[Q, k]`` of the held-out queries, each query's own row removed."""
    excluding = bool(np.any(queries.exclude >= 0))
    search = searcher.search_batched_parallel if parallel else searcher.search_batched
    indices, _ = search(queries.embeddings, final_num_neighbors=k + excluding, **search_kwargs)
    indices = np.asarray(indices)
    return drop_excluded(indices, queries.exclude, k) if excluding else indices.astype(np.int64)


def recall_report(
    searcher: Any,
    gallery: np.ndarray,
    queries: HeldOutQueries,
    k: int,
    exact: np.ndarray | None = None,
    **search_kwargs: int,
) -> dict[str, float]:
    """``{"set_recall", "tie_aware_recall"}`` of `searcher` at `k` on the held-out queries."""
    exact = exact_neighbors(gallery, queries, k) if exact is None else exact
    approx = search_held_out(searcher, queries, k, **search_kwargs)
    return {
        "set_recall": set_recall(approx, exact),
        "tie_aware_recall": tie_aware_recall(approx, exact, queries.embeddings, gallery),
    }


def scann_recall(
    searcher: scann_ops.ScannSearcher,
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int = 10,
    epsilon: float = 1e-3,
) -> float:
    """Tie-aware recall@k of the searcher against exact search (ann-benchmarks' definition).

    A returned item counts when its exact score is within `epsilon` of the exact k-th
    best score. On tight trained embeddings this reads ~1.0 for almost any index: gate on
    `set_recall` (see `recall_report`); this is reported beside it. `epsilon=0` gives the
    strict index-set recall up to exact ties.

    Args:
        queries: `[Q, D]`; gallery: `[N, D]` float32 unit vectors.
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    k = min(k, len(gallery))
    exact_indices, _ = exact_search(queries, gallery, k, distance="dot")
    approx_indices, _ = searcher.search_batched(queries, final_num_neighbors=k)
    return tie_aware_recall(np.asarray(approx_indices), exact_indices, queries, gallery, epsilon)


# ---------------------------------------------------------------------------------- tuning
@dataclass
class TunedIndex:
    """A built searcher, the configuration to search it with, and how it was chosen."""

    searcher: Any
    config: ScannConfig
    report: dict[str, Any] = field(default_factory=dict)


def _time_batched(
    searcher: Any, queries: np.ndarray, k: int, repeats: int, min_seconds: float = 0.25, **kwargs: int
) -> float:
    """Queries per second of a parallel batched search: the best of at least `repeats` calls
    and of at least `min_seconds` of calls (a 1000-query call takes ~8 ms at 69k items, so one
    burst of another process on the shared cores would otherwise pick the wrong candidate)."""
    best, spent, calls = math.inf, 0.0, 0
    while calls < repeats or spent < min_seconds:
        start = time.perf_counter()
        searcher.search_batched_parallel(queries, final_num_neighbors=k, **kwargs)
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return len(queries) / max(best, 1e-9)


def _leaf_ladder(num_leaves: int) -> list[int]:
    """Leaves-to-search candidates, ~1.25x apart, from 1 to all leaves."""
    ladder, value = [], 1.0
    while value < num_leaves:
        ladder.append(int(round(value)))
        value = max(value * 1.25, value + 1)
    ladder.append(num_leaves)
    return sorted(set(ladder))


#: A leaves ladder stops once `PLATEAU_STEPS` more leaves-to-search steps gained less than
#: `PLATEAU_GAIN` set recall (AH scoring is then limited by its re-rank size, not by the leaves:
#: fmnist 69k flattened at 0.40-0.93 from ~8 of 263 leaves on, and searched all 263).
PLATEAU_STEPS = 3
PLATEAU_GAIN = 0.002


def _plateaued(recalls: list[float]) -> bool:
    return len(recalls) > PLATEAU_STEPS and max(recalls[-PLATEAU_STEPS:]) < recalls[-PLATEAU_STEPS - 1] + PLATEAU_GAIN


def _measure(
    searcher: Any, gallery: np.ndarray, queries: HeldOutQueries, k: int, exact: np.ndarray,
    config: ScannConfig, min_recall: float, timing_repeats: int, build: int,
) -> dict[str, Any]:
    """One tuning candidate: its set / tie-aware recall and, if it meets `min_recall`, its QPS."""
    recall = recall_report(searcher, gallery, queries, k, exact, **config.search_kwargs)
    meets = recall["set_recall"] >= min_recall
    qps = _time_batched(searcher, queries.embeddings, k, timing_repeats, **config.search_kwargs) if meets else 0.0
    return _candidate(config, recall, meets, qps, build)


def _candidate(config: ScannConfig, recall: dict[str, float], meets: bool, qps: float, build: int) -> dict[str, Any]:
    return {
        "scoring": config.scoring, "num_leaves": config.num_leaves,
        "leaves_to_search": config.num_leaves_to_search, "spill_threshold": config.spill_threshold,
        "quantize_centroids": config.quantize_centroids, "reorder_k": config.reorder_k,
        **recall, "meets": meets, "qps_batched": qps, "build": build,
    }


def _adaptive_leaves(
    searcher: Any, gallery: np.ndarray, queries: HeldOutQueries, k: int, exact: np.ndarray,
    config: ScannConfig, min_recall: float, timing_repeats: int, build: int, candidates: list[dict[str, Any]],
) -> tuple[Any, ScannConfig, dict[str, Any] | None]:
    """`searcher`'s tree with adaptive leaf search, if that scores fewer items per query than
    `config`'s fixed leaf count (which meets `min_recall`): ``(searcher, config, adaptive
    candidate or None)``; every configuration measured is appended to `candidates`.

    The additive threshold is bisected (in log space) to the lowest that meets the target with
    at most `SPILL_CAP_FACTOR` x the fixed count. Both searches are then timed alternately, twice
    each (reported), and the one scoring fewer items per query is returned (`_items_scored`; by
    the timing if the tree cannot be read). Same tree throughout: searchers are made from the
    built index's tensors (no training), one alive at a time (`searcher` is released).
    """
    tensors = list(scann_ops.scann_to_tensors(searcher.searcher_handle))
    # Its float rows are the gallery's, in order: read them from the gallery without a copy
    # (100k x 128: 51 MB less while the searchers below are made).
    if tuple(tensors[-1].shape) == gallery.shape:
        tensors[-1] = _zero_copy_tensor(gallery)
    release_searcher(searcher)
    cap = min(config.num_leaves, SPILL_CAP_FACTOR * config.num_leaves_to_search)
    scale = float(np.max(np.linalg.norm(queries.embeddings, axis=1)))

    def measure(threshold: float) -> tuple[ScannConfig, dict[str, Any]]:
        adaptive = dataclasses.replace(config, num_leaves_to_search=cap, spill_threshold=threshold)
        recall = _with_searcher(tensors, adaptive, lambda trial: recall_report(
            trial, gallery, queries, k, exact, **adaptive.search_kwargs))
        candidates.append(_candidate(adaptive, recall, recall["set_recall"] >= min_recall, 0.0, build))
        return adaptive, candidates[-1]

    # Every centre scores within 2|q| of the best, so `high` searches `cap` leaves for every query:
    # it meets the target whenever the fixed count does (a superset of leaves, scored the same way).
    low, high = 1e-5 * scale, 2.0 * scale
    best, best_candidate = measure(high)
    if not best_candidate["meets"]:  # possible with AH scoring only (its re-rank sees other candidates)
        return searcher_from_tensors(tensors, config), config, None
    lowest, lowest_candidate = measure(low)
    if lowest_candidate["meets"]:
        best, best_candidate = lowest, lowest_candidate
    else:
        for _ in range(SPILL_BISECTION_STEPS):
            middle = math.sqrt(low * high)
            adaptive, candidate = measure(middle)
            if candidate["meets"]:
                high, best, best_candidate = middle, adaptive, candidate
            else:
                low = middle
    qps = {best: 0.0, config: 0.0}
    for _ in range(2):  # alternate: a burst of load on the shared cores spoils one round, not both
        for option in qps:
            qps[option] = max(qps[option], _with_searcher(tensors, option, lambda trial: _time_batched(
                trial, queries.embeddings, k, timing_repeats, **option.search_kwargs)))
    best_candidate.update(qps_batched=qps[best], fixed_qps_batched=qps[config],
                          fixed_leaves_to_search=config.num_leaves_to_search)
    # On one tree the search cost is the items scored; counted, not timed, it is free of the
    # shared machine's noise (timing the ~10% difference picked the wrong one in 2 of 3 tuner runs).
    work = _items_scored(tensors, queries.embeddings, (best, config))
    if work is not None:
        best_candidate.update(items_scored=work[0], fixed_items_scored=work[1])
        faster = work[0] < work[1]
    else:  # an index whose tree this version cannot read: fall back on the timing
        faster = qps[best] > qps[config]
    chosen = best if faster else config
    return searcher_from_tensors(tensors, chosen), chosen, best_candidate if chosen is best else None


def _tree_leaves(tensors: Sequence[Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(centres [L, D], leaf sizes [L])`` of a one-level ScaNN k-means tree, or None if the
    serialized partitioner is not one (its layout is ScaNN's: SerializedPartitioner.kmeans.kmeans_tree)."""
    from google.protobuf.internal.decoder import _DecodeVarint
    from scann.trees.kmeans_tree import kmeans_tree_pb2

    def field(buffer: bytes, number: int) -> bytes | None:  # the first length-delimited field `number`
        position = 0
        while position < len(buffer):
            key, position = _DecodeVarint(buffer, position)
            wire = key & 7
            if wire == 0:
                _, position = _DecodeVarint(buffer, position)
            elif wire == 2:
                size, position = _DecodeVarint(buffer, position)
                if key >> 3 == number:
                    return buffer[position:position + size]
                position += size
            elif wire in (1, 5):
                position += 8 if wire == 1 else 4
            else:
                return None
        return None

    try:
        kmeans = field(tensors[1].numpy()[0], 2)
        tree_bytes = field(kmeans, 1) if kmeans is not None else None
        if tree_bytes is None:
            return None
        root = kmeans_tree_pb2.SerializedKMeansTree.FromString(tree_bytes).root
        if any(child.children for child in root.children):
            return None
        centres = np.array([list(c.float_dimension) or list(c.dimension) for c in root.centers], np.float32)
        leaves = np.array([child.leaf_id for child in root.children])
        sizes = np.bincount(tensors[2].numpy(), minlength=len(centres))[leaves]
    except Exception:  # noqa: BLE001 - any other layout: the caller times instead
        return None
    return (centres, sizes) if centres.ndim == 2 and len(centres) == len(sizes) else None


def _items_scored(tensors: Sequence[Any], queries: np.ndarray, configs: Sequence[ScannConfig]) -> list[float] | None:
    """Mean gallery items each query scores under each config's leaf search (the leaves whose
    centres score best; adaptive: those within `spill_threshold` of the best, at most
    `num_leaves_to_search`), or None if the tree cannot be read."""
    tree = _tree_leaves(tensors)
    if tree is None:
        return None
    centres, sizes = tree
    scores = queries @ centres.T  # [Q, L]
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked_scores = np.take_along_axis(scores, order, axis=1)
    ranked_sizes = sizes[order]
    out = []
    for config in configs:
        searched = np.zeros_like(ranked_scores, dtype=bool)
        searched[:, : config.num_leaves_to_search] = True
        if config.spill_threshold > 0:
            searched &= ranked_scores >= ranked_scores[:, :1] - config.spill_threshold
        out.append(float(np.mean(np.sum(ranked_sizes * searched, axis=1))))
    return out


def _with_searcher(tensors: Sequence[Any], config: ScannConfig, use: Any) -> Any:
    """`use(searcher)` on a searcher made from `tensors` with `config`'s leaf search, then freed."""
    searcher = searcher_from_tensors(tensors, config)
    try:
        return use(searcher)
    finally:
        release_searcher(searcher)


def tune_index(
    gallery: np.ndarray,
    k: int = 10,
    min_recall: float = 0.95,
    queries: HeldOutQueries | None = None,
    *,
    num_leaves: int | None = None,
    leaves_to_search: int | None = None,
    reorder: int | None = None,
    quantize: bool | None = None,
    adaptive_leaves: bool = True,
    timing_repeats: int = 5,
    seed: int = 0,
) -> TunedIndex:
    """The fastest index over `gallery [N, D]` whose set recall@k meets `min_recall`.

    Every knob the caller fixes (`num_leaves`, `leaves_to_search`, `reorder`, `quantize`:
    True = AH scoring, False = exact scoring in the leaves) is taken as given; the others
    are searched on the held-out `queries` (default: 1000 gallery items, themselves
    excluded). When no candidate meets the target, the one with the highest recall is
    returned (the caller's gate refuses it). ``report`` lists every candidate measured
    (recall, QPS, which ``build`` it was measured on) and the chosen one; galleries below
    `BRUTE_FORCE_BELOW` are scored exactly (recall 1).

    Memory: one searcher is alive at a time. When the winner's tree is not the last one
    built, it is built again and measured again (ScaNN's k-means is not seeded, so the new
    tree differs slightly; if it misses the target it searches more leaves): the reported
    recall is always that of the returned searcher.

    Unless `leaves_to_search` is fixed or ``adaptive_leaves=False``, the winning tree is then
    tried with adaptive leaf search (`ScannConfig.spill_threshold`, see `_adaptive_leaves`) and
    keeps it if it scores fewer items per query.
    """
    gallery = _check_gallery(gallery)
    n = len(gallery)
    k = min(k, n - 1) if n > 1 else 1
    queries = queries or held_out_queries(gallery, seed=seed)
    exact = exact_neighbors(gallery, queries, k)
    start = time.perf_counter()
    brute = num_leaves == 0 or (num_leaves is None and n < BRUTE_FORCE_BELOW)
    if brute:
        config = ScannConfig(default_k=k)
        searcher = build_scann_searcher(gallery, config)
        recall = recall_report(searcher, gallery, queries, k, exact)
        report = {"candidates": [], "chosen": {"scoring": "brute_force", **recall}}
        return TunedIndex(searcher, config, {**report, "seconds": time.perf_counter() - start})

    base_leaves = min(num_leaves or default_num_leaves(n), n)
    # Finer trees score fewer items per query at the same recall; worth a build on large galleries.
    leaf_counts = [base_leaves] if num_leaves or n < MORE_LEAVES_ABOVE else [
        c for c in (base_leaves, 2 * base_leaves, 4 * base_leaves) if c * 25 <= n
    ]
    sample = min(n, 100_000)
    scorings = ["exact", "ah"] if quantize is None else (["ah"] if quantize else ["exact"])
    # AH first: its training is the largest transient.
    plans = [(base_leaves, "ah", False)] if "ah" in scorings else []
    plans += [(count, "exact", False) for count in leaf_counts if "exact" in scorings]
    # int8 centre scores make the tree step cheaper but pick leaves less precisely (fmnist 69k on
    # 2026-12-01: 5/263 leaves for the target vs 4 with float centres, and not faster): one more
    # candidate for one more build
    plans += [(base_leaves, "exact", True)] if "exact" in scorings else []
    candidates: list[dict[str, Any]] = []
    best: tuple | None = None  # ((meets, qps or recall), config, candidate, ladder)
    searcher = None
    for build, (leaves, scoring, quantize_centroids) in enumerate(plans):
        # One searcher alive at a time (it holds ~2 copies of the gallery); the winner is
        # rebuilt at the end if its tree is gone.
        if searcher is not None:
            release_searcher(searcher)
        ladder = [min(leaves_to_search, leaves)] if leaves_to_search else _leaf_ladder(leaves)
        if scoring == "exact":
            reorders = [0]
        elif reorder is not None:
            reorders = [reorder]
        else:
            reorders = sorted({min(n, r) for r in (max(2 * k, 20), 5 * k, 10 * k, 25 * k)})
        base = ScannConfig(
            num_leaves=leaves,
            num_leaves_to_search=ladder[0],
            training_sample_size=sample,
            reorder_k=max(reorders),
            default_k=k,
            scoring=scoring,
            spherical=True,  # unit vectors, dot product: spherical k-means leaves (fewer searched per recall)
            quantize_centroids=quantize_centroids,
        )
        searcher = build_scann_searcher(gallery, base)
        for reorder_k in reorders:
            recalls: list[float] = []
            for count in ladder:  # recall grows with leaves searched: stop at the first that meets
                config = dataclasses.replace(base, num_leaves_to_search=count, reorder_k=reorder_k)
                candidate = _measure(searcher, gallery, queries, k, exact, config, min_recall, timing_repeats, build)
                candidates.append(candidate)
                key = (1.0, candidate["qps_batched"]) if candidate["meets"] else (0.0, candidate["set_recall"])
                if best is None or key > best[0]:
                    best = (key, config, candidate, ladder)
                recalls.append(candidate["set_recall"])
                if candidate["meets"] or _plateaued(recalls):
                    break
    assert best is not None and searcher is not None
    _, config, chosen, ladder = best
    if chosen["build"] != len(plans) - 1:
        # The winner's tree was released: build it again and measure it again (ScaNN's k-means
        # is not seeded, so the new tree differs a little): the gate sees the index it ships.
        release_searcher(searcher)
        searcher = build_scann_searcher(gallery, config)
        met = chosen["meets"]
        for count in [c for c in ladder if c >= config.num_leaves_to_search]:
            config = dataclasses.replace(config, num_leaves_to_search=count)
            chosen = _measure(searcher, gallery, queries, k, exact, config, min_recall, timing_repeats, len(plans))
            candidates.append(chosen)
            if chosen["meets"] or not met:  # search one more leaf only if the first tree met the target
                break
    if adaptive_leaves and leaves_to_search is None and not config.brute_force and chosen["meets"]:
        searcher, config, adaptive = _adaptive_leaves(
            searcher, gallery, queries, k, exact, config, min_recall, timing_repeats, chosen["build"], candidates)
        chosen = adaptive or chosen
    report = {
        "target_set_recall": min_recall,
        "k": k,
        "queries": queries.to_dict(),
        "candidates": candidates,
        "chosen": chosen,
        "seconds": time.perf_counter() - start,
    }
    if config.scoring == "exact":
        config = dataclasses.replace(config, reorder_k=0)
    return TunedIndex(searcher, config, report)


def fixed_index(
    gallery: np.ndarray, config: ScannConfig, k: int, queries: HeldOutQueries | None = None, seed: int = 0
) -> TunedIndex:
    """Build exactly `config` (no tuning) and measure its recall like `tune_index`."""
    gallery = _check_gallery(gallery)
    k = min(k, len(gallery) - 1) if len(gallery) > 1 else 1
    queries = queries or held_out_queries(gallery, seed=seed)
    searcher = build_scann_searcher(gallery, config)
    recall = recall_report(searcher, gallery, queries, k, **config.search_kwargs)
    return TunedIndex(searcher, config, {"k": k, "queries": queries.to_dict(), "candidates": [],
                                         "chosen": {"scoring": config.scoring, **recall}})

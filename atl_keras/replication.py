"""Replicate the paper's claim: ATL vs the fixed-margin triplet loss, same budget, several seeds.

    from atl_keras.replication import ReplicationConfig, run_replication, write_report
    result = run_replication(ReplicationConfig(schedule="quick", seeds=(0,)))
    paths = write_report(result, "results")      # replication.md + PNG plots

Every method trains the SAME backbone with the SAME P x K sampler, schedule and budget
(`atl_keras.train.run_training`); only the loss (and its mining / text encoder) changes.

Methods (`MAIN_METHODS`): ``triplet_batch_hard`` and ``triplet_semi_hard`` (fixed margin),
``atl_use`` (adaptive margin from the built-in Universal Sentence Encoder, batch-hard mining
under each negative's own margin). Ablations (`ablation_methods`) vary ATL's margin range,
its semantic threshold, the text encoder (``hashing``) and run a CONTROL whose descriptions
are shuffled across items (`ShuffledTextEncoder`): if ATL's gain comes from the text, the
control must lose it.

Protocols (`PROTOCOLS`), each giving one or more evaluation settings:

- ``shop``: synthetic shop, street photo -> catalog shots of items never seen in training
  (evaluation ``shop``).
- ``fmnist``: Fashion-MNIST trained on 6 classes, tested on the 4 held out
  (`FMNIST_UNSEEN`). The held-out test images are split into a query half and a gallery half
  (stratified, fixed seed, no image in both); evaluations ``fmnist_clean`` (clean queries)
  and ``fmnist_street`` (street-style queries from `street_style`; the gallery stays clean).

The library never prints: pass `progress` to `run_replication` to hear about each run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "EVALUATIONS",
    "FMNIST_UNSEEN",
    "MAIN_METHODS",
    "METRICS",
    "Method",
    "PROTOCOLS",
    "Protocol",
    "ReplicationConfig",
    "ReplicationResult",
    "RunRecord",
    "SCHEDULES",
    "Schedule",
    "ShuffledTextEncoder",
    "ablation_methods",
    "save_lookup_encoder",
    "aggregate",
    "chance_recall",
    "compare",
    "derangement",
    "paired_t_p_value",
    "load_result",
    "plot_recall_curves",
    "plot_retrieval_grid",
    "query_gallery_split",
    "render_report",
    "run_one",
    "run_replication",
    "street_style",
    "student_t_two_sided_p",
    "write_report",
]

#: Metrics in the report tables, in this order.
METRICS = ("recall_at_1", "recall_at_10", "recall_at_20", "map_at_r")
METRIC_TITLES = {"recall_at_1": "R@1", "recall_at_10": "R@10", "recall_at_20": "R@20", "map_at_r": "MAP@R"}
#: Fashion-MNIST classes held out of training (the last four class indices: 6-9).
FMNIST_UNSEEN = ("Shirt", "Sneaker", "Bag", "Ankle boot")
#: Seed of the Fashion-MNIST query/gallery split and of the street-style transform
#: (fixed across training seeds, so every seed is scored on the same queries).
EVAL_SEED = 2024
#: Top-k shown per query in the retrieval grids.
GRID_TOP = 5


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One training recipe: the loss and what feeds it; everything else is shared.

    `text_encoder=None` means "the replication's main encoder" (``use-m3``; ``hashing`` in
    quick mode). `threshold_quantile` sets ATL's ``semantic_threshold`` to that quantile of
    the pairwise description distances of the training catalog (so it masks that share of
    the closest pairs), resolved per run. `margin_from_text_mean` gives a fixed-margin
    triplet loss the mean of the margins ATL (with `min_margin`/`max_margin` and the main
    encoder) assigns to the training catalog's item pairs, resolved per run.
    """

    name: str
    title: str
    loss: str
    mining: str = "batch_hard"
    text_encoder: str | None = None
    min_margin: float = 0.05
    max_margin: float = 0.4
    margin: float = 0.2
    threshold_quantile: float | None = None
    shuffle_descriptions: bool = False
    margin_from_text_mean: bool = False  # fixed margin = ATL's mean margin over training item pairs
    ablation: str = ""  # which ablation group this belongs to ("" = main comparison)

    @property
    def is_atl(self) -> bool:
        return self.loss == "atl"


TRIPLET_BATCH_HARD = Method("triplet_batch_hard", "Triplet (m=0.2), batch-hard", "triplet", "batch_hard")
TRIPLET_SEMI_HARD = Method("triplet_semi_hard", "Triplet (m=0.2), semi-hard", "triplet", "semi_hard")
ATL_USE = Method("atl_use", "ATL (USE, m in [0.05, 0.4]), batch-hard", "atl", "batch_hard")
MAIN_METHODS: tuple[Method, ...] = (TRIPLET_BATCH_HARD, TRIPLET_SEMI_HARD, ATL_USE)
BASELINES = ("triplet_batch_hard", "triplet_semi_hard")


def ablation_methods() -> tuple[Method, ...]:
    """ATL variants; each differs from `ATL_USE` in one thing (the default range is `ATL_USE`)."""
    return (
        dataclasses.replace(ATL_USE, name="atl_margin_0.1_0.3", title="ATL, m in [0.1, 0.3]",
                            min_margin=0.1, max_margin=0.3, ablation="margin range"),
        dataclasses.replace(ATL_USE, name="atl_margin_0.0_0.8", title="ATL, m in [0.0, 0.8]",
                            min_margin=0.0, max_margin=0.8, ablation="margin range"),
        dataclasses.replace(ATL_USE, name="atl_tau_q01", title="ATL, tau = 1% quantile",
                            threshold_quantile=0.01, ablation="semantic threshold"),
        dataclasses.replace(ATL_USE, name="atl_tau_q05", title="ATL, tau = 5% quantile",
                            threshold_quantile=0.05, ablation="semantic threshold"),
        dataclasses.replace(ATL_USE, name="atl_hashing", title="ATL, hashing text encoder",
                            text_encoder="hashing", ablation="text encoder"),
        dataclasses.replace(ATL_USE, name="atl_shuffled", title="CONTROL: ATL, shuffled descriptions",
                            shuffle_descriptions=True, ablation="control"),
        dataclasses.replace(TRIPLET_BATCH_HARD, name="triplet_mean_margin",
                            title="CONTROL: Triplet, batch-hard, m = ATL's mean margin",
                            margin_from_text_mean=True, ablation="control"),
    )


# --------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Protocol:
    """A dataset + train settings and the evaluations scored on the trained model."""

    name: str
    title: str
    dataset: str
    evaluations: tuple[str, ...]
    unseen_classes: tuple[str, ...] = ()


PROTOCOLS: dict[str, Protocol] = {
    "shop": Protocol("shop", "Synthetic shop, cross-domain (street -> catalog, unseen items)",
                     "synthetic-shop", ("shop",)),
    "fmnist": Protocol("fmnist", "Fashion-MNIST, 4 unseen classes", "fashion-mnist",
                       ("fmnist_clean", "fmnist_street"), FMNIST_UNSEEN),
}
#: Evaluation setting -> title.
EVALUATIONS = {
    "shop": "Synthetic shop: street query -> catalog gallery (unseen items)",
    "fmnist_clean": "Fashion-MNIST unseen classes: clean query -> clean gallery",
    "fmnist_street": "Fashion-MNIST unseen classes: street-style query -> clean gallery",
}


@dataclass(frozen=True)
class Schedule:
    """Budget shared by every method of a protocol."""

    epochs: int
    steps_per_epoch: int
    synthetic_items: int = 300
    shop_image_size: int = 32
    shop_pk: tuple[int, int] = (16, 4)
    fmnist_pk: tuple[int, int] = (6, 8)
    validation_size: int = 2000
    eval_limit: int | None = None  # Fashion-MNIST: at most this many query and gallery images
    learning_rate: float = 1e-3
    embedding_dim: int = 64


SCHEDULES: dict[str, Schedule] = {
    # CI-sized: a tiny shop, one short epoch; seconds per run.
    "quick": Schedule(epochs=1, steps_per_epoch=4, synthetic_items=80, shop_image_size=16,
                      shop_pk=(8, 2), fmnist_pk=(4, 4), validation_size=100, eval_limit=200),
    # What the full `--ablations` replication uses (fits 2 h on 2 cores; see docs/replication.md).
    "full": Schedule(epochs=3, steps_per_epoch=150),
    # About a third of the full budget (the medium run reported in results/ until a full run replaces it).
    "medium": Schedule(epochs=2, steps_per_epoch=80),
}


@dataclass
class ReplicationConfig:
    """What to run. `seeds` are training seeds (the synthetic shop is also drawn from it)."""

    protocols: tuple[str, ...] = ("shop", "fmnist")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    schedule: str | Schedule = "full"
    ablations: bool = False
    ablation_protocols: tuple[str, ...] = ("shop",)
    text_encoder: str = "use-m3"
    work_dir: str = "runs/replication"
    text_cache_dir: str = "saved_models/text_encoders/cache"
    grid_queries: int = 4
    max_k: int = 20
    reuse: bool = True  # reuse a run's record from work_dir when its settings are identical

    def __post_init__(self) -> None:
        self.protocols = tuple(self.protocols)
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"Unknown protocols {unknown or '(none)'}; choose from {list(PROTOCOLS)}.")
        self.ablation_protocols = tuple(p for p in self.ablation_protocols if p in self.protocols) or self.protocols[:1]
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}.")
        if isinstance(self.schedule, str):
            if self.schedule not in SCHEDULES:
                raise ValueError(f"Unknown schedule {self.schedule!r}; choose from {list(SCHEDULES)} or pass a Schedule.")
        if self.max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {self.max_k}.")

    @property
    def schedule_obj(self) -> Schedule:
        return SCHEDULES[self.schedule] if isinstance(self.schedule, str) else self.schedule

    @property
    def schedule_name(self) -> str:
        return self.schedule if isinstance(self.schedule, str) else "custom"

    def methods(self, protocol: str) -> tuple[Method, ...]:
        """Methods run on `protocol`: the main three, plus the ablations where asked."""
        if self.ablations and protocol in self.ablation_protocols:
            return MAIN_METHODS + ablation_methods()
        return MAIN_METHODS


# -------------------------------------------------------------- evaluation helpers
def query_gallery_split(labels: np.ndarray, seed: int = EVAL_SEED, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into disjoint query and gallery halves, stratified by label.

    Args:
        labels: ``[N]`` labels.
        seed: the shuffle within each label.
        limit: at most this many rows per half (taken evenly over labels), or None.
    Returns:
        ``(query_rows [Q], gallery_rows [G])`` sorted int64 row indices, disjoint; each label
        with ``n`` rows gives ``ceil(n / 2)`` queries and ``floor(n / 2)`` gallery rows.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    query, gallery = [], []
    per_class = None if limit is None else max(1, limit // max(1, len(classes)))
    for c in classes:
        rows = rng.permutation(np.flatnonzero(labels == c))
        half = (len(rows) + 1) // 2
        q, g = rows[:half], rows[half:]
        if per_class is not None:
            q, g = q[:per_class], g[:per_class]
        query.append(q)
        gallery.append(g)
    return np.sort(np.concatenate(query)).astype(np.int64), np.sort(np.concatenate(gallery)).astype(np.int64)


def street_style(images: np.ndarray, seed: int = EVAL_SEED) -> np.ndarray:
    """Street-photo versions of catalog-style images: clutter, warp, lighting, occlusion, noise.

    Per image (its own generator ``default_rng([seed, i])``, so the result for image ``i``
    does not depend on the others): a background of 2-5 random grey rectangles / ellipses
    under the item, an affine warp (rotation +-20 deg, scale 0.75-1.0, shift +-3 px), a
    brightness gain 0.6-1.2 and offset +-30, one occluding block covering 10-25% of the side
    length squared on a random edge with probability 0.6, and Gaussian noise (sigma 4-10).

    Args:
        images: uint8 ``[N, H, W, C]`` (C = 1 or 3), objects bright on a dark background
            (Fashion-MNIST) or on any background.
    Returns:
        uint8 ``[N, H, W, C]``.
    """
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"street_style expects uint8 [N, H, W, C] images, got {images.dtype} {images.shape}.")
    n, h, w, c = images.shape
    out = np.empty_like(images)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        channels = []
        # warp all channels with the same parameters
        angle = rng.uniform(-20, 20)
        scale = rng.uniform(0.75, 1.0)
        shift = rng.uniform(-3, 3, size=2)
        theta = np.deg2rad(angle)
        # inverse map output (x, y) -> input: centre, rotate by -theta, scale 1/scale, shift
        cos, sin = np.cos(theta) / scale, np.sin(theta) / scale
        cx, cy = (w - 1) / 2, (h - 1) / 2
        a, b = cos, sin
        d, e = -sin, cos
        tx, ty = cx + shift[0], cy + shift[1]
        coeffs = (a, b, tx - a * cx - b * cy, d, e, ty - d * cx - e * cy)
        for ch in range(c):
            layer = Image.fromarray(images[i, :, :, ch])
            channels.append(np.asarray(layer.transform((w, h), Image.Transform.AFFINE, coeffs,
                                                       Image.Resampling.BILINEAR), np.float32))
        item = np.stack(channels, axis=-1)
        clutter = Image.new("L", (w, h), int(rng.uniform(0, 60)))
        draw = ImageDraw.Draw(clutter)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.uniform(-0.2, 1.0, size=2) * (w, h)
            bw, bh = rng.uniform(0.15, 0.5, size=2) * (w, h)
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape([x0, y0, x0 + bw, y0 + bh], fill=int(rng.uniform(20, 140)))
        background = np.asarray(clutter, np.float32)[..., None]
        mask = np.clip(item.max(axis=-1, keepdims=True) / 40.0, 0.0, 1.0)  # item where it is lit
        pixels = mask * item + (1 - mask) * background
        pixels = pixels * rng.uniform(0.6, 1.2) + rng.uniform(-30, 30)
        if rng.random() < 0.6:
            side = rng.uniform(0.3, 0.5) * h
            edge = int(rng.integers(4))
            pos = rng.uniform(0, h - side)
            y0, x0 = [(0, pos), (pos, w - side), (h - side, pos), (pos, 0)][edge]
            y0, x0 = int(round(y0)), int(round(x0))
            pixels[y0 : y0 + int(side), x0 : x0 + int(side)] = rng.uniform(0, 255)
        pixels += rng.standard_normal(pixels.shape).astype(np.float32) * rng.uniform(4, 10)
        out[i] = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return out


@dataclass
class EvalSetting:
    """Query and gallery arrays of one evaluation (gallery always given here)."""

    name: str
    query_images: np.ndarray
    query_labels: np.ndarray
    gallery_images: np.ndarray
    gallery_labels: np.ndarray


def evaluation_settings(protocol: Protocol, data: Any, schedule: Schedule) -> list[EvalSetting]:
    """The evaluations of `protocol` built from a run's `RetrievalData` (``result.data``)."""
    test = data.test
    if protocol.name == "shop":
        if test.gallery_images is None:
            raise ValueError("The synthetic-shop test set has no gallery; expected street -> catalog.")
        return [EvalSetting("shop", test.query_images, np.asarray(test.query_labels),
                            test.gallery_images, np.asarray(test.gallery_labels))]
    if protocol.name == "fmnist":
        labels = np.asarray(test.query_labels)
        q, g = query_gallery_split(labels, EVAL_SEED, schedule.eval_limit)
        queries = test.query_images[q]
        gallery, gallery_labels = test.query_images[g], labels[g]
        return [
            EvalSetting("fmnist_clean", queries, labels[q], gallery, gallery_labels),
            EvalSetting("fmnist_street", street_style(queries, EVAL_SEED), labels[q], gallery, gallery_labels),
        ]
    raise ValueError(f"Unknown protocol {protocol.name!r}; choose from {list(PROTOCOLS)}.")


def grid_query_rows(num_queries: int, count: int, name: str) -> list[int]:
    """`count` fixed query rows of evaluation `name` (the same for every method and seed)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little"))
    return sorted(rng.choice(num_queries, size=min(count, num_queries), replace=False).tolist())


# ------------------------------------------------------------- shuffled text control
def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation of ``range(n)`` without fixed points (n >= 2): ``[n]`` int64."""
    if n < 2:
        raise ValueError(f"A derangement needs n >= 2 items, got {n}.")
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, np.int64)
    out[order] = np.roll(order, -1)  # each item points to the next one in a random cycle
    return out


class ShuffledTextEncoder:
    """CONTROL encoder: each description is encoded as a *different* item's description.

    The unique non-empty `descriptions` are permuted with `derangement(seed)`; ``encode``
    maps every text to its partner's text and encodes that with `base`. So the margins see
    text embeddings with the catalog's real distribution, detached from the images.
    """

    def __init__(self, base: Any, descriptions: Sequence[str | None], seed: int = 0) -> None:
        unique = sorted({d for d in descriptions if isinstance(d, str) and d.strip()})
        if len(unique) < 2:
            raise ValueError("Shuffling needs at least two distinct descriptions.")
        partner = derangement(len(unique), seed)
        self.base = base
        self.seed = int(seed)
        self.mapping = {text: unique[int(j)] for text, j in zip(unique, partner)}
        digest = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted(self.mapping.items())).encode())
        self._identity = f"shuffled:{digest.hexdigest()[:16]}:{base.identity}"

    @property
    def identity(self) -> str:
        return self._identity

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``texts: N strings -> float32 [N, T]`` (the partners' embeddings)."""
        missing = [t for t in texts if t not in self.mapping]
        if missing:
            raise ValueError(f"{len(missing)} texts were not in the shuffled catalog, e.g. {missing[0]!r}.")
        return self.base.encode([self.mapping[t] for t in texts])


def save_lookup_encoder(encoder: ShuffledTextEncoder, path: str) -> str:
    """Freeze `encoder` on its catalog as a TF SavedModel text encoder at `path` (a table lookup).

    The SavedModel maps ``tf.string [N]`` to the stored ``[N, T]`` vectors; a text outside the
    catalog gets a zero row (= "unknown text" for the loss). Loadable with
    ``load_text_encoder(path)`` like any local TF-Hub model; reused when `path` exists.
    """
    import tensorflow as tf

    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    texts = sorted(encoder.mapping)
    vectors = np.asarray(encoder.encode(texts), np.float32)
    vectors = np.concatenate([vectors, np.zeros((1, vectors.shape[1]), np.float32)])  # row for unknown texts

    class _Lookup(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(texts), tf.range(len(texts), dtype=tf.int64)),
                default_value=len(texts))
            self.vectors = tf.Variable(vectors, trainable=False)

        # autograph=False: nothing to convert, and converting this locally defined class failed
        # once inside a long-running process ("tf____init__() takes 1 positional argument").
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
        def __call__(self, x):
            return tf.gather(self.vectors, self.table.lookup(x))

    tmp = f"{path}.tmp"
    tf.saved_model.save(_Lookup(), tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ runs
@dataclass
class RunRecord:
    """One trained model: its metrics per evaluation, Recall@K curves and grid neighbours."""

    protocol: str
    method: str
    seed: int
    metrics: dict[str, dict[str, float]]  # evaluation -> metric -> value
    curves: dict[str, list[float]]  # evaluation -> [Recall@1, ..., Recall@K]
    grids: dict[str, dict[str, list]]  # evaluation -> {"queries": [...], "top": [[...]]}
    seconds: float
    train_config: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    semantic_threshold: float | None = None
    reused: bool = False  # True when read back from an earlier invocation's record

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_config(protocol: Protocol, method: Method, seed: int, schedule: Schedule, config: ReplicationConfig) -> Any:
    """The `TrainConfig` of one run (without the semantic threshold, resolved at run time)."""
    from atl_keras.train import TrainConfig

    shop = protocol.dataset == "synthetic-shop"
    p, k = schedule.shop_pk if shop else schedule.fmnist_pk
    encoder = method.text_encoder or config.text_encoder
    return TrainConfig(
        dataset=protocol.dataset,
        synthetic_items=schedule.synthetic_items,
        image_size=schedule.shop_image_size if shop else None,
        unseen_classes=protocol.unseen_classes,
        output_dir=os.path.join(config.work_dir, "runs", protocol.name, method.name, f"seed{seed}"),
        loss=method.loss,
        mining=method.mining,
        margin=method.margin,
        min_margin=method.min_margin,
        max_margin=method.max_margin,
        text_encoder=encoder,
        text_cache_dir=config.text_cache_dir,
        p=p,
        k=k,
        epochs=schedule.epochs,
        steps_per_epoch=schedule.steps_per_epoch,
        learning_rate=schedule.learning_rate,
        embedding_dim=schedule.embedding_dim,
        validation_size=schedule.validation_size,
        test_size=schedule.eval_limit,
        seed=seed,
        projector_size=0,
    )


def _run_key(train_cfg: Any, method: Method, config: ReplicationConfig) -> str:
    method_fields = dataclasses.asdict(method)
    if not method.margin_from_text_mean:  # added later: keep the keys of existing records valid
        del method_fields["margin_from_text_mean"]
    payload = {
        "train": {k: v for k, v in dataclasses.asdict(train_cfg).items() if k != "output_dir"},
        "method": method_fields,
        "max_k": config.max_k,
        "grid_queries": config.grid_queries,
        "eval_seed": EVAL_SEED,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record_path(config: ReplicationConfig, protocol: str, method: str, seed: int) -> str:
    return os.path.join(config.work_dir, "records", f"{protocol}__{method}__seed{seed}.json")


def _resolve_text(train_cfg: Any, method: Method, seed: int) -> tuple[Any, float | None]:
    """Apply the method's text hooks: shuffled encoder, quantile threshold, mean margin."""
    if not (method.shuffle_descriptions or method.threshold_quantile is not None
            or method.margin_from_text_mean):
        return train_cfg, None
    from atl_keras.margins import margin_statistics
    from atl_keras.text import embed_descriptions, load_text_encoder
    from atl_keras.train import load_data

    data = load_data(train_cfg)
    encoder = load_text_encoder(train_cfg.text_encoder)
    if method.shuffle_descriptions:
        encoder = ShuffledTextEncoder(encoder, data.descriptions, seed=seed)
        # run_training writes its config as JSON: hand it a path, not an object.
        path = os.path.join(os.path.dirname(train_cfg.output_dir), "..", "..", "..", "text_encoders",
                            encoder.identity.split(":")[1] + f"-seed{seed}")
        path = save_lookup_encoder(encoder, os.path.normpath(path))
        train_cfg = dataclasses.replace(train_cfg, text_encoder=path)
        encoder = load_text_encoder(path)
    threshold = None
    if method.threshold_quantile is not None or method.margin_from_text_mean:
        train_items = np.unique(data.train_labels)
        text = embed_descriptions([data.descriptions[i] for i in train_items], encoder,
                                  cache_dir=train_cfg.text_cache_dir)
        distances, margins, _, _ = margin_statistics(text, method.min_margin, method.max_margin,
                                                     train_cfg.distance)
        if method.threshold_quantile is not None:
            threshold = float(np.quantile(distances, method.threshold_quantile))
            train_cfg = dataclasses.replace(train_cfg, semantic_threshold=threshold)
        if method.margin_from_text_mean:
            train_cfg = dataclasses.replace(train_cfg, margin=round(float(np.mean(margins)), 6))
    return train_cfg, threshold


def run_one(protocol: Protocol, method: Method, seed: int, config: ReplicationConfig) -> RunRecord:
    """Train one (protocol, method, seed) and score every evaluation of the protocol.

    Reuses ``<work_dir>/records/<protocol>__<method>__seed<seed>.json`` when `config.reuse`
    and its settings key matches; writes it otherwise.
    """
    from atl_keras.metrics import retrieval_metrics
    from atl_keras.train import run_training

    schedule = config.schedule_obj
    train_cfg = train_config(protocol, method, seed, schedule, config)
    key = _run_key(train_cfg, method, config)
    path = _record_path(config, protocol.name, method.name, seed)
    if config.reuse and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return dataclasses.replace(RunRecord(**cached), reused=True)
    start = time.perf_counter()
    train_cfg, threshold = _resolve_text(train_cfg, method, seed)
    result = run_training(train_cfg, verbose=0)
    model = result.model
    metrics, curves, grids = {}, {}, {}
    for setting in evaluation_settings(protocol, result.data, schedule):
        query = model.embed(setting.query_images)
        gallery = model.embed(setting.gallery_images)
        max_k = min(config.max_k, len(setting.gallery_labels))
        values = retrieval_metrics(query, setting.query_labels, gallery, setting.gallery_labels,
                                   ks=tuple(range(1, max_k + 1)))
        metrics[setting.name] = {m: float(values[m]) for m in METRICS if m in values}
        metrics[setting.name]["num_queries"] = float(values["num_queries"])
        curves[setting.name] = [float(values[f"recall_at_{k}"]) for k in range(1, max_k + 1)]
        rows = grid_query_rows(len(setting.query_labels), config.grid_queries, setting.name)
        d = ((query[rows, None, :] - gallery[None, :, :]) ** 2).sum(-1)  # [q, G]
        top = np.argsort(d, axis=1, kind="stable")[:, :GRID_TOP]
        grids[setting.name] = {"queries": rows, "top": top.tolist()}
    record = RunRecord(
        protocol=protocol.name, method=method.name, seed=seed, metrics=metrics, curves=curves,
        grids=grids, seconds=time.perf_counter() - start,
        train_config=_json_config(train_cfg, method, config),
        key=key, semantic_threshold=threshold,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record.to_json(), f, indent=1, default=str)  # reused=False: this invocation trained it
    os.replace(tmp, path)
    return record


def _json_config(train_cfg: Any, method: Method, config: ReplicationConfig) -> dict[str, Any]:
    """The run's `TrainConfig` as JSON-ready values (an encoder object becomes its name)."""
    out = {}
    for f in dataclasses.fields(train_cfg):
        value = getattr(train_cfg, f.name)
        if f.name == "text_encoder" and not isinstance(value, str):
            value = f"shuffled({method.text_encoder or config.text_encoder})"
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


@dataclass
class ReplicationResult:
    """All run records plus what the report needs to say how they were made."""

    config: ReplicationConfig
    records: list[RunRecord]
    wall_seconds: float
    command: str | None = None
    environment: dict[str, str] = field(default_factory=dict)

    def methods(self, protocol: str) -> tuple[Method, ...]:
        return self.config.methods(protocol)


def environment_info() -> dict[str, str]:
    """Hardware and software facts for the report."""
    import keras
    import tensorflow as tf

    return {
        "cpu_count": str(os.cpu_count()),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpus": str(len(tf.config.list_physical_devices("GPU"))),
    }


def run_replication(
    config: ReplicationConfig,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
) -> ReplicationResult:
    """Run every (protocol, method, seed) of `config` one after the other.

    Args:
        config: what to run.
        progress: called with a one-line message before and after each run (the CLI prints).
        command: the command line that started this, quoted in the report.
    """
    start = time.perf_counter()
    records = []
    plan = [(PROTOCOLS[p], m, s) for p in config.protocols for m in config.methods(p) for s in config.seeds]
    for i, (protocol, method, seed) in enumerate(plan, 1):
        if progress:
            progress(f"[{i}/{len(plan)}] {protocol.name} {method.name} seed={seed} ...")
        record = run_one(protocol, method, seed, config)
        records.append(record)
        if progress:
            summary = ", ".join(f"{e}: R@1={m['recall_at_1']:.3f} MAP@R={m['map_at_r']:.3f}"
                                for e, m in record.metrics.items())
            progress(f"[{i}/{len(plan)}] done in {record.seconds:.0f} s: {summary}")
    return ReplicationResult(config, records, time.perf_counter() - start, command, environment_info())


# ------------------------------------------------------------------------ aggregation
def method_title(method: Method, config: ReplicationConfig) -> str:
    """The method's title, naming the encoder actually used (e.g. ``hashing`` in quick mode)."""
    encoder = method.text_encoder or config.text_encoder
    if method.is_atl and encoder != "use-m3":
        return method.title.replace("USE", encoder)
    return method.title


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; NaN for fewer than two values)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def aggregate(records: Sequence[RunRecord]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(evaluation, method) -> {metric: (mean, std), "n": seeds, "curve": (mean [K], std [K])}``."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        for evaluation in r.metrics:
            groups.setdefault((evaluation, r.method), []).append(r)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for (evaluation, method), rs in groups.items():
        entry: dict[str, Any] = {"n": len(rs), "seeds": [r.seed for r in rs]}
        for metric in METRICS:
            vals = [r.metrics[evaluation][metric] for r in rs if metric in r.metrics[evaluation]]
            if vals:
                entry[metric] = _mean_std(vals)
        curves = np.asarray([r.curves[evaluation] for r in rs], np.float64)
        entry["curve"] = (curves.mean(0), curves.std(0, ddof=1) if len(rs) > 1 else np.zeros(curves.shape[1]))
        entry["seconds"] = float(np.mean([r.seconds for r in rs]))
        out[(evaluation, method)] = entry
    return out


@dataclass(frozen=True)
class Comparison:
    """Method A vs method B on one evaluation and metric, paired by seed."""

    evaluation: str
    metric: str
    method: str
    baseline: str
    mean: float
    baseline_mean: float
    relative_gain: float  # (mean - baseline_mean) / baseline_mean
    paired_diff: float  # mean over seeds of (A - B)
    paired_std: float  # sample std of the per-seed differences (NaN for one seed)
    wins: int  # seeds where A > B
    n: int
    spread: float  # max of the two methods' seed std (NaN for one seed)
    p_value: float = math.nan  # two-sided paired t-test on the per-seed differences (NaN for one seed)

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` only where the data support it, else ``no clear difference``.

        Supported = every seed agrees on the sign AND the mean difference exceeds both the
        seed-to-seed spread of either method and the spread of the paired differences.
        With one seed nothing is supported.
        """
        if self.n < 2 or not math.isfinite(self.spread):
            return "not testable (1 seed)"
        bar = max(self.spread, self.paired_std)
        if self.wins == self.n and self.paired_diff > bar:
            return "better"
        if self.wins == 0 and -self.paired_diff > bar:
            return "worse"
        return "no clear difference"


def compare(records: Sequence[RunRecord], evaluation: str, metric: str, method: str, baseline: str) -> Comparison | None:
    """Compare `method` to `baseline` over the seeds both ran (None when they share none)."""
    a = {r.seed: r.metrics[evaluation][metric] for r in records if r.method == method and evaluation in r.metrics}
    b = {r.seed: r.metrics[evaluation][metric] for r in records if r.method == baseline and evaluation in r.metrics}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    va, vb = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    diff = va - vb
    n = len(seeds)
    std = lambda x: float(np.std(x, ddof=1)) if n > 1 else math.nan  # noqa: E731
    base = float(vb.mean())
    return Comparison(
        evaluation, metric, method, baseline, float(va.mean()), base,
        (float(va.mean()) - base) / base if base else math.nan,
        float(diff.mean()), std(diff), int(np.sum(diff > 0)), n, max(std(va), std(vb)) if n > 1 else math.nan,
        paired_t_p_value(diff),
    )


def student_t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with integer `df` >= 1 (exact finite series).

    Abramowitz & Stegun 26.7.3-26.7.4 with theta = atan(|t| / sqrt(df)); no SciPy needed.
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: A = (2/pi) * (theta + sin(theta) * cos(theta) * sum)
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = (2 / math.pi) * (theta + math.sin(theta) * math.cos(theta) * total)
    else:  # even: A = sin(theta) * sum
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    return min(1.0, max(0.0, 1.0 - inside))


def paired_t_p_value(differences: Sequence[float]) -> float:
    """Two-sided p of a paired t-test on per-seed differences (NaN for fewer than 2 seeds).

    All-equal non-zero differences give p = 0; all-zero differences give p = 1.
    """
    d = np.asarray(differences, np.float64)
    if d.size < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return student_t_two_sided_p(mean / (sd / math.sqrt(d.size)), int(d.size - 1))


# ------------------------------------------------------------------------------ plots
def plot_recall_curves(result: ReplicationResult, evaluation: str, path: str) -> str:
    """PNG: mean Recall@K (K = 1..max_k) per main method on `evaluation`, +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = aggregate(result.records)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for method in MAIN_METHODS + (ablation_methods() if result.config.ablations else ()):
        entry = stats.get((evaluation, method.name))
        if entry is None or (method.ablation and method.ablation != "control"):
            continue
        mean, std = entry["curve"]
        ks = np.arange(1, len(mean) + 1)
        style = {"atl_shuffled": "--", "triplet_mean_margin": ":"}.get(method.name, "-")
        ax.plot(ks, mean, style, marker="o", markersize=3,
                label=f"{method_title(method, result.config)} (n={entry['n']})")
        ax.fill_between(ks, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("K")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("Recall@K")
    ax.set_title(EVALUATIONS.get(evaluation, evaluation), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_retrieval_grid(
    query_images: np.ndarray,
    query_labels: np.ndarray,
    gallery_images: np.ndarray,
    gallery_labels: np.ndarray,
    panels: Sequence[tuple[str, dict[str, list]]],
    path: str,
    title: str = "",
) -> str:
    """PNG: for each query row, the query then its top-5 under each panel's method, side by side.

    Args:
        query_images, gallery_images: uint8 ``[N, H, W, C]``.
        panels: ``(method title, {"queries": [q rows], "top": [[gallery rows] per query]})``;
            every panel must list the same queries.
    Correct matches get a green frame, wrong ones red.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = panels[0][1]["queries"]
    for name, grid in panels:
        if grid["queries"] != queries:
            raise ValueError(f"Panel {name!r} shows other queries than {panels[0][0]!r}; use the same seed and evaluation.")
    top = len(panels[0][1]["top"][0])
    cols = len(panels) * (top + 1)
    fig, axes = plt.subplots(len(queries), cols, figsize=(cols * 0.9, len(queries) * 1.05 + 0.5), dpi=100, squeeze=False)

    def show(ax, image, colour=None):
        image = np.asarray(image)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                  vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(colour is not None)
            if colour:
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5)

    for row, q in enumerate(queries):
        for p, (name, grid) in enumerate(panels):
            base = p * (top + 1)
            show(axes[row, base], query_images[q], "blue")
            if row == 0:
                axes[row, base].set_title(f"{name}\nquery", fontsize=6, loc="left")
            for j, g in enumerate(grid["top"][row]):
                ok = gallery_labels[g] == query_labels[q]
                show(axes[row, base + 1 + j], gallery_images[g], "green" if ok else "red")
                if row == 0:
                    axes[row, base + 1 + j].set_title(f"#{j + 1}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def chance_recall(query_labels: np.ndarray, gallery_labels: np.ndarray, k: int) -> float:
    """Expected Recall@k under a uniformly random ranking of the gallery.

    Per query with ``R`` matches among ``N`` gallery items: ``1 - C(N - R, k) / C(N, k)``,
    averaged over the queries with ``R > 0``.
    """
    gallery_labels = np.asarray(gallery_labels)
    n = len(gallery_labels)
    values, counts = np.unique(gallery_labels, return_counts=True)
    r_of = dict(zip(values.tolist(), counts.tolist()))
    out = []
    for label in np.asarray(query_labels).tolist():
        r = r_of.get(label, 0)
        if r == 0:
            continue
        # C(N-R, k) / C(N, k) = prod_{i<k} (N-R-i) / (N-i)
        miss = 1.0
        for i in range(min(k, n)):
            miss *= max(n - r - i, 0) / (n - i)
        out.append(1.0 - miss)
    return float(np.mean(out)) if out else math.nan


def _first_seed_settings(result: ReplicationResult) -> dict[str, EvalSetting]:
    """The evaluation sets of the first seed, rebuilt from the data (deterministic per seed)."""
    from atl_keras.train import load_data

    config, schedule = result.config, result.config.schedule_obj
    out: dict[str, EvalSetting] = {}
    for name in config.protocols:
        protocol = PROTOCOLS[name]
        train_cfg = train_config(protocol, ATL_USE, config.seeds[0], schedule, config)
        for s in evaluation_settings(protocol, load_data(train_cfg), schedule):
            out[s.name] = s
    return out


def _grid_plots(result: ReplicationResult, settings: dict[str, EvalSetting], output_dir: str) -> dict[str, str]:
    """Retrieval grids (ATL vs triplet batch-hard, first seed) for each evaluation."""
    config = result.config
    seed = config.seeds[0]
    by_key = {(r.protocol, r.method, r.seed): r for r in result.records}
    paths = {}
    for name in config.protocols:
        atl = by_key.get((name, ATL_USE.name, seed))
        base = by_key.get((name, TRIPLET_BATCH_HARD.name, seed))
        if atl is None or base is None:
            continue
        for evaluation in PROTOCOLS[name].evaluations:
            s = settings[evaluation]
            path = os.path.join(output_dir, f"replication_grid_{s.name}.png")
            paths[s.name] = plot_retrieval_grid(
                s.query_images, s.query_labels, s.gallery_images, s.gallery_labels,
                [(method_title(ATL_USE, config), atl.grids[s.name]), (TRIPLET_BATCH_HARD.title, base.grids[s.name])],
                path, title=f"{EVALUATIONS[s.name]} - seed {seed} (green = same item/class)",
            )
    return paths


# ----------------------------------------------------------------------------- report
def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if math.isfinite(std) else f"{mean:.4f} ± n/a"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%" if math.isfinite(x) else "n/a"


def render_report(result: ReplicationResult, plots: dict[str, str] | None = None,
                  chance: dict[str, dict[int, float]] | None = None) -> str:
    """The Markdown report (``results/replication.md``) of a replication.

    `plots`: as returned by `write_report`; `chance`: evaluation -> {k: chance Recall@k}.
    """
    config, schedule = result.config, result.config.schedule_obj
    stats = aggregate(result.records)
    methods_all = {m.name: m for m in MAIN_METHODS + ablation_methods()}
    evaluations = [e for p in config.protocols for e in PROTOCOLS[p].evaluations]
    plots = plots or {}
    near_chance = _near_chance(stats, chance or {}, evaluations)
    env = result.environment
    lines = [
        "# Replication: adaptive triplet loss (ATL) vs the triplet baseline",
        "",
        "Claim under test (Zhao et al., arXiv 1909.12939): ATL improves over the fixed-margin "
        "triplet loss by +10.6% on cross-domain retrieval (street photo -> catalog).",
        "",
        "Generated by `tools/replicate.py` (library: `atl_keras.replication`). Do not edit by hand.",
        "",
        "## Setup",
        "",
        f"- Command: `{result.command or 'run_replication(...) from Python'}`",
        f"- Schedule `{config.schedule_name}`: {schedule.epochs} epochs x {schedule.steps_per_epoch} steps, "
        f"Adam lr {schedule.learning_rate}, embedding {schedule.embedding_dim}-d, backbone small_cnn; "
        f"shop: {schedule.synthetic_items} items at {schedule.shop_image_size}px, P x K = "
        f"{schedule.shop_pk[0]} x {schedule.shop_pk[1]}; Fashion-MNIST: P x K = "
        f"{schedule.fmnist_pk[0]} x {schedule.fmnist_pk[1]}"
        + (f", at most {schedule.eval_limit} query / gallery images" if schedule.eval_limit else "") + ".",
        f"- Seeds: {', '.join(map(str, config.seeds))} ({len(config.seeds)} per method). Every method uses the same "
        "backbone, sampler, schedule and budget; the seed fixes data split, initialisation and batches, so results "
        "are paired by seed.",
        f"- Text encoder of ATL: `{config.text_encoder}`.",
        f"- Hardware: {env.get('cpu_count', '?')} CPU cores ({env.get('processor', '?')}), "
        f"{env.get('gpus', '0')} GPUs; {env.get('platform', '')}; Python {env.get('python', '?')}, "
        f"TensorFlow {env.get('tensorflow', '?')}, Keras {env.get('keras', '?')}.",
        _wall_time_line(result),
        "",
        "Methods:",
        "",
    ]
    for m in MAIN_METHODS:
        lines.append(f"- `{m.name}`: {method_title(m, config)}.")
    lines += [
        "",
        "Metrics: Recall@K (a correct item among the K nearest), MAP@R (Musgrave et al. 2020); "
        "mean ± sample std over seeds.",
        "",
        "## Results",
        "",
    ]
    for evaluation in evaluations:
        lines += [f"### {EVALUATIONS[evaluation]}", "", f"Evaluation `{evaluation}`.", ""]
        lines.append("| method | n | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |")
        lines.append("|---|---|" + "---|" * len(METRICS))
        for m in MAIN_METHODS:
            entry = stats.get((evaluation, m.name))
            if entry is None:
                continue
            cells = [_fmt(*entry[metric]) for metric in METRICS]
            lines.append(f"| {m.name} | {entry['n']} | " + " | ".join(cells) + " |")
        lines.append("")
        if chance and evaluation in chance:
            lines += ["Chance level (random ranking, evaluation set of seed "
                      f"{config.seeds[0]}): " + ", ".join(f"R@{k} = {v:.4f}" for k, v in sorted(chance[evaluation].items()))
                      + ".", ""]
            if evaluation in near_chance:
                lines += [f"**Near chance:** every method's R@1 closes less than {NEAR_CHANCE:.0%} of the gap "
                          "between chance and 1 here: the models barely learned this task at this budget, so "
                          "differences between methods say little about the paper's claim.", ""]
        if evaluation in plots:
            lines += [f"![Recall@K, {evaluation}]({os.path.basename(plots[evaluation])})", ""]
        grid = plots.get(f"grid:{evaluation}")
        if grid:
            lines += [f"Retrieval grid (seed {config.seeds[0]}; left ATL, right triplet batch-hard):", "",
                      f"![Retrieval grid, {evaluation}]({os.path.basename(grid)})", ""]

    lines += ["## ATL's gain over each baseline", "",
              "Relative gain = (ATL - baseline) / baseline of the seed means. Paired diff = mean over seeds "
              "of ATL minus baseline (± its std). Verdict `better`/`worse` only when every seed agrees and "
              "the mean difference exceeds both methods' seed std and the std of the paired differences; "
              "otherwise `no clear difference`. This is a deliberately conservative heuristic bar (on `shop` "
              "each seed also draws a different shop, so a method's seed std includes data variation). "
              "p = two-sided paired t-test on the per-seed differences, for reference: uncorrected for the "
              "number of comparisons, and with few seeds it has little power.",
              "",
              "| evaluation | baseline | metric | ATL | baseline | relative gain | paired diff | ATL wins | p (paired t) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for evaluation in evaluations:
        for baseline in BASELINES:
            for metric in ("recall_at_1", "map_at_r"):
                c = compare(result.records, evaluation, metric, ATL_USE.name, baseline)
                if c is None:
                    continue
                verdicts.append(c)
                pstd = f" ± {c.paired_std:.4f}" if math.isfinite(c.paired_std) else ""
                lines.append(
                    f"| {evaluation} | {baseline} | {METRIC_TITLES[metric]} | {c.mean:.4f} | {c.baseline_mean:.4f} | "
                    f"{_pct(c.relative_gain)} | {c.paired_diff:+.4f}{pstd} | {c.wins}/{c.n} | "
                    f"{_p(c.p_value)} | {c.verdict} |")
    lines += ["", "## What the data say", ""]
    lines += _conclusions(verdicts)
    for evaluation in sorted(near_chance):
        lines.append(f"Caution: on `{evaluation}` all methods are near chance (see its table); read its verdicts "
                     "as statements about barely trained models, not about the method.")

    if config.ablations:
        lines += _ablation_section(result, stats, methods_all)
    else:
        lines += ["", "## Ablations", "", "Not run in this invocation (pass `--ablations`).", ""]
    lines += ["", "## Per-run records", "",
              "| evaluation | method | seed | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " | seconds |",
              "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for r in result.records:
        for evaluation, values in r.metrics.items():
            lines.append(f"| {evaluation} | {r.method} | {r.seed} | "
                         + " | ".join(f"{values[m]:.4f}" for m in METRICS) + f" | {r.seconds:.0f} |")
    lines.append("")
    return "\n".join(lines)


#: An evaluation is "near chance" when every method's (R@1 - chance) / (1 - chance) is below this.
NEAR_CHANCE = 0.05


def _near_chance(stats: dict, chance: dict[str, dict[int, float]], evaluations: Sequence[str]) -> set[str]:
    out = set()
    for evaluation in evaluations:
        c = chance.get(evaluation, {}).get(1)
        if c is None or not math.isfinite(c) or c >= 1:
            continue
        lifts = [(stats[(evaluation, m.name)]["recall_at_1"][0] - c) / (1 - c)
                 for m in MAIN_METHODS if (evaluation, m.name) in stats]
        if lifts and max(lifts) < NEAR_CHANCE:
            out.add(evaluation)
    return out


def _wall_time_line(result: ReplicationResult) -> str:
    """Wall time, separating runs trained now from runs reused from an earlier invocation."""
    seconds = [r.seconds for r in result.records]
    reused = [r for r in result.records if r.reused]
    line = (f"- Wall time: {len(result.records)} runs, {sum(seconds) / 60:.1f} min of training + evaluation in total "
            f"(mean {np.mean(seconds):.0f} s, min {min(seconds):.0f} s, max {max(seconds):.0f} s per run); "
            f"this invocation took {result.wall_seconds / 60:.1f} min")
    if reused:
        line += f" ({len(reused)} runs reused from an earlier invocation's records, timed when they ran)"
    return line + "."


def _p(p_value: float) -> str:
    return "n/a" if not math.isfinite(p_value) else ("< 0.001" if p_value < 0.001 else f"{p_value:.3f}")


def _conclusions(verdicts: Sequence[Comparison]) -> list[str]:
    """One bullet per (evaluation, baseline, metric), stated only as far as the data go."""
    if not verdicts:
        return ["No ATL/baseline pair ran on a common seed: nothing to conclude."]
    out = []
    for c in verdicts:
        what = f"On `{c.evaluation}` vs `{c.baseline}` ({METRIC_TITLES[c.metric]}):"
        if c.verdict == "better":
            out.append(f"- {what} ATL is better by {_pct(c.relative_gain)} relative "
                       f"({c.paired_diff:+.4f} absolute, all {c.n} seeds), beyond the seed spread.")
        elif c.verdict == "worse":
            out.append(f"- {what} ATL is WORSE by {_pct(c.relative_gain)} relative "
                       f"({c.paired_diff:+.4f}, all {c.n} seeds), beyond the seed spread.")
        elif c.verdict.startswith("not testable"):
            out.append(f"- {what} one seed only ({_pct(c.relative_gain)}): no claim can be made.")
        else:
            out.append(f"- {what} no clear difference ({_pct(c.relative_gain)} relative, ATL ahead on "
                       f"{c.wins}/{c.n} seeds; the difference is within the seed spread).")
    supported = [c for c in verdicts if c.verdict == "better"]
    worse = [c for c in verdicts if c.verdict == "worse"]
    out += ["", f"Summary: ATL is better beyond the seed spread in {len(supported)} of {len(verdicts)} comparisons "
            f"and worse in {len(worse)}."]
    headline = [c for c in verdicts if c.evaluation == "shop" and c.metric == "recall_at_1"]
    for c in headline:
        out.append(f"On the cross-domain protocol the paper reports +10.6%; here ATL vs `{c.baseline}` on R@1 is "
                   f"{_pct(c.relative_gain)} ({c.verdict}).")
    if len(supported) < len(verdicts):
        out += ["Where ATL is not better, see docs/replication.md (\"Why ATL may not beat the baseline here\") "
                "for the likely reasons: short schedules with a small CNN trained from scratch, descriptions "
                "that restate what the image shows, one description per class on Fashion-MNIST, and seed noise "
                f"that hides small effects with {max(c.n for c in verdicts)} seeds."]
    return out


def _ablation_section(result: ReplicationResult, stats: dict, methods_all: dict[str, Method]) -> list[str]:
    config = result.config
    lines = ["", "## Ablations", "",
             f"ATL variants on {', '.join(config.ablation_protocols)}, same schedule and seeds; each differs from "
             f"`{ATL_USE.name}` in one setting. Diff columns are paired by seed (mean ± std).", ""]
    thresholds: dict[str, list[float]] = {}
    for r in result.records:
        if r.semantic_threshold is not None:
            thresholds.setdefault(r.method, []).append(r.semantic_threshold)
    for protocol in config.ablation_protocols:
        for evaluation in PROTOCOLS[protocol].evaluations:
            lines += [f"### {EVALUATIONS[evaluation]}", "",
                      "| group | method | n | R@1 | MAP@R | vs atl_use (R@1) | vs triplet_batch_hard (R@1) | vs triplet_batch_hard (MAP@R) |",
                      "|---|---|---|---|---|---|---|---|"]
            for m in (ATL_USE,) + ablation_methods():
                entry = stats.get((evaluation, m.name))
                if entry is None:
                    continue
                cells = []
                for other, metric in ((ATL_USE.name, "recall_at_1"), (TRIPLET_BATCH_HARD.name, "recall_at_1"),
                                      (TRIPLET_BATCH_HARD.name, "map_at_r")):
                    c = compare(result.records, evaluation, metric, m.name, other)
                    if c is None or (other == m.name):
                        cells.append("-")
                    else:
                        pstd = f" ± {c.paired_std:.4f}" if math.isfinite(c.paired_std) else ""
                        cells.append(f"{c.paired_diff:+.4f}{pstd} ({c.verdict})")
                lines.append(f"| {m.ablation or 'main'} | {m.name} | {entry['n']} | {_fmt(*entry['recall_at_1'])} | "
                             f"{_fmt(*entry['map_at_r'])} | " + " | ".join(cells) + " |")
            lines.append("")
    if thresholds:
        lines += ["Semantic thresholds (squared L2 between unit text embeddings, quantile of the training "
                  "items' pairwise description distances): "
                  + "; ".join(f"`{k}`: {min(v):.3f}-{max(v):.3f}" for k, v in thresholds.items()) + ".", ""]
    mean_margins = [r.train_config["margin"] for r in result.records
                    if r.method == "triplet_mean_margin" and "margin" in (r.train_config or {})]
    if mean_margins:
        lines += ["`triplet_mean_margin` trains the fixed-margin triplet loss with the mean of the margins ATL "
                  "assigns to the training items' pairs: m = "
                  + ", ".join(f"{m:.3f}" for m in mean_margins) + " (per seed) instead of 0.2.", ""]
    lines += ["Control reading: if ATL's gain over the triplet baseline came from the descriptions, "
              "`atl_shuffled` (each item trained with another item's description) must lose it, and "
              "`triplet_mean_margin` (no text, ATL's average margin) must not reach ATL.", ""]
    for p in config.ablation_protocols:
        for e in PROTOCOLS[p].evaluations:
            real = compare(result.records, e, "recall_at_1", ATL_USE.name, TRIPLET_BATCH_HARD.name)
            shuffled = compare(result.records, e, "recall_at_1", "atl_shuffled", TRIPLET_BATCH_HARD.name)
            text = compare(result.records, e, "recall_at_1", ATL_USE.name, "atl_shuffled")
            if real is None or shuffled is None or text is None:
                continue
            if real.verdict != "better":
                reading = ("there is no supported gain with real text, so the control has nothing to remove; "
                           "it cannot attribute an effect to the text")
            elif text.verdict == "better":
                reading = "real text beats shuffled text beyond the seed spread: the gain depends on the descriptions"
            else:
                reading = ("shuffled text does not clearly lose to real text: the gain is NOT shown to come from "
                           "the descriptions (it may come from the margin range itself)")
            lines.append(f"- `{e}`, R@1 vs `{TRIPLET_BATCH_HARD.name}`: real text {real.paired_diff:+.4f} "
                         f"({real.verdict}), shuffled text {shuffled.paired_diff:+.4f} ({shuffled.verdict}); "
                         f"real minus shuffled {text.paired_diff:+.4f} ({text.verdict}). Reading: {reading}.")
            fixed = compare(result.records, e, "recall_at_1", ATL_USE.name, "triplet_mean_margin")
            if fixed is not None:
                reading = {
                    "better": "ATL beats a fixed margin of the same average size: its per-pair margins matter",
                    "worse": "a fixed margin of ATL's average size is clearly better than ATL",
                }.get(fixed.verdict, "a fixed margin of ATL's average size is not clearly worse than ATL: the gain "
                                     "over m=0.2 is NOT shown to need per-pair margins (the average margin size "
                                     "explains it as well)")
                lines.append(f"- `{e}`, R@1, ATL minus `triplet_mean_margin`: {fixed.paired_diff:+.4f} "
                             f"({fixed.verdict}). Reading: {reading}.")
                if real.verdict == "better" and fixed.verdict == "better" and text.verdict != "better":
                    lines.append(f"- `{e}`, together: ATL's gain needs margins that vary from pair to pair, but "
                                 "descriptions shuffled across items give most of it too, so these data do NOT "
                                 "show that the gain comes from what the descriptions say.")
    lines.append("")
    return lines


def load_result(path: str, config: ReplicationConfig) -> ReplicationResult:
    """A `ReplicationResult` from a ``replication_records.json`` written by `write_report`.

    Re-renders a report (new plots, new report code) without training. `config` must be the
    configuration the records were made with (protocols, seeds, schedule); records of other
    protocols or seeds are dropped, and a missing (protocol, method, seed) raises ValueError.
    """
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    fields = {f.name for f in dataclasses.fields(RunRecord)}
    records = {(r["protocol"], r["method"], int(r["seed"])): RunRecord(**{k: v for k, v in r.items() if k in fields})
               for r in payload["records"]}
    wanted = [(p, m.name, s) for p in config.protocols for m in config.methods(p) for s in config.seeds]
    missing = [w for w in wanted if w not in records]
    if missing:
        raise ValueError(f"{path} has no record of {len(missing)} runs this configuration needs, e.g. {missing[0]}; "
                         "run the replication (without --from-records) to train them.")
    return ReplicationResult(config, [records[w] for w in wanted], float(payload["wall_seconds"]),
                             payload.get("command"), payload.get("environment", {}))


def write_report(result: ReplicationResult, output_dir: str = "results") -> dict[str, str]:
    """Write ``replication.md``, Recall@K curves and retrieval grids into `output_dir`.

    Returns ``{"report": path, <evaluation>: curve PNG, "grid:<evaluation>": grid PNG, ...}``.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths: dict[str, str] = {}
    evaluations = sorted({e for r in result.records for e in r.metrics})
    for evaluation in evaluations:
        paths[evaluation] = plot_recall_curves(result, evaluation,
                                               os.path.join(output_dir, f"replication_recall_{evaluation}.png"))
    settings = _first_seed_settings(result)
    for evaluation, path in _grid_plots(result, settings, output_dir).items():
        paths[f"grid:{evaluation}"] = path
    chance = {name: {k: chance_recall(s.query_labels, s.gallery_labels, k) for k in (1, 10, 20)
                     if k <= len(s.gallery_labels)} for name, s in settings.items()}
    report = os.path.join(output_dir, "replication.md")
    text = render_report(result, paths, chance)
    with open(f"{report}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{report}.tmp", report)
    with open(os.path.join(output_dir, "replication_records.json"), "w", encoding="utf-8") as f:
        json.dump({"wall_seconds": result.wall_seconds, "command": result.command,
                   "environment": result.environment,
                   "records": [r.to_json() for r in result.records]}, f, indent=1, default=str)
    paths["report"] = report
    return paths

"""The training recipe behind `atl train`: data -> text margins -> P x K fit -> retrieval metrics.

Everything the CLI does is one call here, so a user can run it from Python:

    from atl_keras.train import TrainConfig, run_training
    result = run_training(TrainConfig(dataset="synthetic-shop", epochs=1, output_dir="runs/try"))
    print(result.test_metrics["recall_at_1"])

Training at scale (see docs/distributed.md):

- `strategy`: ``auto`` (MirroredStrategy over >= 2 GPUs, else one device), ``one_device``,
  ``mirrored``, ``multi_worker`` (TF_CONFIG), ``tpu``. The model is built and compiled in
  ``strategy.scope()``. The global batch is P x K; each of R replicas gets P*K/R contiguous rows
  (whole labels: P must be divisible by R). ``logical_cpus > 0`` splits the CPU into that many
  logical devices first, to exercise the mirrored path without GPUs (tests, benchmarks).
- `cross_replica_mining`: triplets are mined over the global batch (all-gather); the gradient
  equals the one-device gradient of the global-batch loss.
- `mixed_precision`: ``mixed_float16`` on GPUs (dynamic loss scaling via
  `keras.optimizers.LossScaleOptimizer`), ``mixed_bfloat16`` on CPUs / TPUs. The embedding and
  the loss stay float32. The global dtype policy is restored when `run_training` returns.
- Resumable: `keras.callbacks.BackupAndRestore` in ``<output>/backup`` every `save_freq` steps
  (or each epoch); rerunning the same command after a crash resumes from the last backup
  (Keras restarts the interrupted epoch with the backed-up weights and optimizer state; the
  P x K stream skips the batches of the completed epochs). Final files are written atomically.
- `deterministic` (default True): seeds + `tf.config.experimental.enable_op_determinism()`,
  so the same seed on one device gives identical metrics on a rerun. Costs speed on GPUs (and
  a few ops have no deterministic GPU kernel): set False for large GPU runs. Restored on return.
- Observability: TensorBoard scalars (loss, ``fraction_active``, ``mean_active_margin``,
  validation retrieval metrics), ``training_log.csv`` (one row per epoch, appended across
  resumes) and an embedding-projector export of up to `projector_size` test gallery images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from atl_keras.data.datasets import DATASET_SPECS, EvalSet, RetrievalData, load_retrieval_data
from atl_keras.data.augment import make_augmenter
from atl_keras.data.sampler import pk_dataset
from atl_keras.distribute import (
    STRATEGIES,
    check_pk_divisible,
    distribute_batches,
    get_strategy,
    logical_cpu_devices,
    mixed_precision_policy,
    worker_info,
)
from atl_keras.losses import AdaptiveTripletLoss, TripletLoss
from atl_keras.metrics import RetrievalEvaluation, retrieval_metrics
from atl_keras.model import ATLModel
from atl_keras.projector import write_projector
from atl_keras.proxy_losses import AdaptiveProxyLoss, ProxyAnchorLoss
from atl_keras.text import embed_descriptions, load_text_encoder

LOSSES = ("atl", "triplet", "adaptive_proxy", "proxy_anchor")
#: Losses with one learnable proxy per training item (atl_keras.proxy_losses).
PROXY_LOSSES = ("adaptive_proxy", "proxy_anchor")
#: Labels x samples per batch when not given: Fashion-MNIST has only 10 labels (classes).
DEFAULT_PK = {"fashion-mnist": (10, 12)}
DEFAULT_PK_CATALOG = (16, 4)


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults train a useful model in minutes on CPU."""

    dataset: str = "synthetic-shop"
    data_dir: str | None = None
    image_size: int | None = None
    synthetic_items: int = 300
    synthetic_variants: float = 0.0  # share of designs listed several times (weak-label testbed)
    synthetic_street_views: int = 3
    unseen_classes: tuple[str, ...] = ()
    strict: bool = False
    output_dir: str = "runs/main"
    loss: str = "atl"
    mining: str = "batch_hard"
    distance: str = "squared_l2"
    margin: float = 0.2
    min_margin: float = 0.05
    max_margin: float = 0.4
    semantic_threshold: float | None = None
    margin_source: str = "text"  # ATL margins from: text | shuffled_text | permuted | fixed | oracle
    margin_mapping: str = "linear"  # text distance -> margin: linear | paper | catalog
    missing_text_margin: float | None = None  # items without a description; None = midpoint
    proxy_scale: float | None = None  # proxy losses' scale s / alpha; None: 16 adaptive_proxy, 32 proxy_anchor
    proxy_anchor_margin: float = 0.1  # ProxyAnchor's delta
    proxy_lr_multiplier: float = 10.0  # proxies' learning rate / the model's (Adam)
    text_encoder: str = "use-m3"
    text_cache_dir: str = "saved_models/text_encoders/cache"
    text_encoder_dir: str = "saved_models/text_encoders"  # where "use-m3" is built on first use
    backbone: str = "small_cnn"
    weights: str | None = None  # backbone init: None, "imagenet" (Keras' cache) or a weights file
    allow_download: bool = False  # weights="imagenet" may download into Keras' cache when missing
    pooling: str = "avg"  # avg | max | gem
    embedding_dim: int = 64
    p: int | None = None
    k: int | None = None
    epochs: int = 3
    steps_per_epoch: int = 150
    learning_rate: float = 1e-3
    validation_size: int = 2000
    test_size: int | None = None
    ks: tuple[int, ...] = (1, 10, 20)
    seed: int = 0
    augment: bool = False  # flip / translate / zoom / brightness / contrast on training batches
    strategy: str = "auto"
    logical_cpus: int = 0
    tpu: str | None = None
    cross_replica_mining: bool = True
    mixed_precision: bool = False
    save_freq: int | str = "epoch"
    deterministic: bool = True
    projector_size: int = 500

    def __post_init__(self) -> None:
        name = self.dataset.partition(":")[0]
        if name not in {spec.partition(":")[0] for spec in DATASET_SPECS}:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}; available: {', '.join(DATASET_SPECS)}."
            )
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}.")
        from atl_keras.margin_sources import MAPPINGS, SOURCES

        if self.margin_source not in SOURCES:
            raise ValueError(f"Unknown margin_source {self.margin_source!r}; choose one of {', '.join(SOURCES)}.")
        if self.margin_mapping not in MAPPINGS:
            raise ValueError(f"Unknown margin_mapping {self.margin_mapping!r}; choose one of {', '.join(MAPPINGS)}.")
        if not 0.0 <= self.synthetic_variants <= 1.0:
            raise ValueError(f"synthetic_variants must be in [0, 1], got {self.synthetic_variants}.")
        if self.synthetic_street_views < 1:
            raise ValueError(f"synthetic_street_views must be >= 1, got {self.synthetic_street_views}.")
        default_p, default_k = DEFAULT_PK.get(self.dataset, DEFAULT_PK_CATALOG)
        self.p = default_p if self.p is None else self.p
        self.k = default_k if self.k is None else self.k
        for name in ("p", "k", "epochs", "steps_per_epoch", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.k < 2:
            raise ValueError("k must be >= 2: each label needs a positive pair in the batch.")
        self.ks = tuple(int(k) for k in self.ks)
        self.unseen_classes = tuple(self.unseen_classes)
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"Unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}."
            )
        if self.logical_cpus < 0:
            raise ValueError(f"logical_cpus must be >= 0 (0 = leave the CPU as is), got {self.logical_cpus}.")
        if isinstance(self.save_freq, str) and self.save_freq.isdigit():
            self.save_freq = int(self.save_freq)
        if self.save_freq != "epoch" and (
            isinstance(self.save_freq, bool) or not isinstance(self.save_freq, int) or self.save_freq < 1
        ):
            raise ValueError(
                f"save_freq must be 'epoch' or a number of steps >= 1, got {self.save_freq!r}."
            )
        if self.projector_size < 0:
            raise ValueError(f"projector_size must be >= 0 (0 disables the export), got {self.projector_size}.")


@dataclass
class TrainResult:
    """What a run produced: the model, its metrics and where it was written."""

    model: ATLModel
    test_metrics: dict[str, float]
    history: dict[str, list[float]]
    output_dir: str
    model_path: str
    seconds: float
    data: RetrievalData | None = None
    initial_epoch: int = 0
    replicas: int = 1


def build_loss(
    config: TrainConfig, data: RetrievalData | None = None, item_text: np.ndarray | None = None
) -> keras.losses.Loss:
    """The loss named by `config.loss`, with the config's margins and mining.

    Proxy losses (`PROXY_LOSSES`) need `data` and `item_text`: their classes are the training
    items in `proxy_classes` order; ``adaptive_proxy`` takes margins from the items' text
    (``margin_source`` text + ``linear``) or from the margin table of `margin_source` /
    `margin_mapping` restricted to the training items.

    ATL with a `margin_source` other than ``text`` or a `margin_mapping` other than
    ``linear`` trains through a precomputed item x item margin table
    (`atl_keras.margin_sources`), which needs `data` and the items' `item_text` [M, T].
    """
    if config.loss in PROXY_LOSSES:
        return proxy_loss(config, data, item_text)
    if config.loss == "atl" and (config.margin_source != "text" or config.margin_mapping != "linear"):
        if data is None or item_text is None:
            raise ValueError("margin_source/margin_mapping other than text/linear need the data and item text embeddings.")
        return margin_table_loss(config, data, item_text)
    if config.loss == "triplet":
        return TripletLoss(margin=config.margin, mining=config.mining, distance=config.distance)
    return AdaptiveTripletLoss(
        min_margin=config.min_margin,
        max_margin=config.max_margin,
        mining=config.mining,
        distance=config.distance,
        semantic_threshold=config.semantic_threshold,
        missing_text_margin=config.missing_text_margin,
    )


def margin_table_loss(config: TrainConfig, data: RetrievalData, item_text: np.ndarray) -> keras.losses.Loss:
    """ATL through a margin table: `config.margin_source` + `config.margin_mapping` over the
    training items (see `atl_keras.margin_sources.margin_table`); `semantic_threshold` masks
    pairs whose description distance is below it, as `AdaptiveTripletLoss` does."""
    from atl_keras.margin_sources import MarginTableTripletLoss, margin_table, text_distance_table

    train_items = np.unique(data.train_labels)
    table = margin_table(
        config.margin_source, text_embeddings=item_text, item_attributes=data.item_attributes,
        train_items=train_items, mapping=config.margin_mapping, min_margin=config.min_margin,
        max_margin=config.max_margin, distance=config.distance,
        missing_text_margin=config.missing_text_margin, seed=config.seed,
    )
    negatives = None
    if config.semantic_threshold is not None:
        distances = text_distance_table(item_text, config.distance)
        negatives = ~(np.isfinite(distances) & (distances < config.semantic_threshold))
    return MarginTableTripletLoss(table, mining=config.mining, distance=config.distance, negative_table=negatives)


def proxy_classes(data: RetrievalData) -> np.ndarray:
    """The training items, sorted: proxy ``c`` belongs to item ``proxy_classes(data)[c]``."""
    return np.unique(data.train_labels)


def proxy_loss(config: TrainConfig, data: RetrievalData | None, item_text: np.ndarray | None) -> keras.losses.Loss:
    """`AdaptiveProxyLoss` / `ProxyAnchorLoss` over the training items (labels = `proxy_classes` index)."""
    if data is None or item_text is None:
        raise ValueError(f"loss {config.loss!r} needs the data and the item text embeddings [M, T].")
    classes = proxy_classes(data)
    if config.loss == "proxy_anchor":
        alpha = 32.0 if config.proxy_scale is None else config.proxy_scale
        return ProxyAnchorLoss(margin=config.proxy_anchor_margin, alpha=alpha, num_classes=len(classes))
    scale = 16.0 if config.proxy_scale is None else config.proxy_scale
    common = dict(min_margin=config.min_margin, max_margin=config.max_margin, scale=scale,
                  distance=config.distance, missing_text_margin=config.missing_text_margin)
    if config.margin_source == "text" and config.margin_mapping == "linear":
        return AdaptiveProxyLoss(class_text_embeddings=item_text[classes], **common)
    from atl_keras.margin_sources import margin_table

    table = margin_table(
        config.margin_source, text_embeddings=item_text, item_attributes=data.item_attributes,
        train_items=classes, mapping=config.margin_mapping, min_margin=config.min_margin,
        max_margin=config.max_margin, distance=config.distance,
        missing_text_margin=config.missing_text_margin, seed=config.seed,
    )
    return AdaptiveProxyLoss(margin_matrix=table[np.ix_(classes, classes)], **common)


def load_data(config: TrainConfig) -> RetrievalData:
    """The train rows and evaluation sets named by `config.dataset`."""
    return load_retrieval_data(
        config.dataset,
        data_dir=config.data_dir,
        image_size=config.image_size,
        validation_size=config.validation_size,
        synthetic_items=config.synthetic_items,
        unseen_classes=config.unseen_classes,
        strict=config.strict,
        seed=config.seed,
        synthetic_variants=config.synthetic_variants,
        synthetic_street_views=config.synthetic_street_views,
    )


def evaluate_embeddings(
    model: keras.Model,
    evaluation: EvalSet,
    ks: tuple[int, ...] = (1, 10, 20),
    distance: str = "squared_l2",
    limit: int | None = None,
) -> dict[str, float]:
    """Retrieval metrics of `model` on an evaluation set (query/gallery or leave-one-out)."""
    queries, query_labels = evaluation.query_images, evaluation.query_labels
    if limit is not None:
        queries, query_labels = queries[:limit], query_labels[:limit]
    gallery = gallery_labels = None
    if evaluation.gallery_images is not None:
        gallery = _embed(model, evaluation.gallery_images)
        gallery_labels = evaluation.gallery_labels
    return retrieval_metrics(
        _embed(model, queries), query_labels, gallery, gallery_labels, ks=ks, distance=distance
    )


_forward_functions: "weakref.WeakKeyDictionary[keras.Model, Any]" = weakref.WeakKeyDictionary()


def _embed(model: keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``[N, H, W, C]`` -> ``[N, D]`` float32 on this process's default device.

    Calls the model directly instead of `predict`, so a model built under any strategy
    (including multi-worker, whose `predict` would shard and gather across workers)
    embeds locally from its (mirrored, identical) weights.
    """
    images = np.asarray(images)
    if not len(images):
        return np.zeros((0, int(getattr(model, "embedding_dim", 0))), np.float32)
    forward = _forward_functions.get(model)
    if forward is None:  # one traced function per model, not one per call (no retracing)
        model_ref = weakref.ref(model)  # the cache must not keep the model alive
        forward = tf.function(lambda x: model_ref()(x, training=False), reduce_retracing=True)
        _forward_functions[model] = forward
    chunks = [
        np.asarray(forward(tf.constant(images[start : start + batch_size])), np.float32)
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks, axis=0)


def save_model_atomically(model: keras.Model, path: str) -> None:
    """Write a `.keras` file so a crash never leaves a truncated file at `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(suffix=".keras", dir=directory)
    os.close(handle)
    try:
        model.save(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_json_atomically(payload: Any, path: str) -> None:
    """Write JSON via a temporary file and rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp_path, path)


BACKUP_DIR = "backup"
TRAINING_LOG = "training_log.csv"
PROJECTOR_DIR = os.path.join("logs", "projector")


def backup_epoch(backup_dir: str) -> int | None:
    """The epoch a `BackupAndRestore` backup in `backup_dir` resumes at (None: no backup)."""
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["epoch"])
    except (OSError, ValueError, KeyError):
        return None  # a torn write: Keras falls back to the weights alone


def worker_output_dir(output_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this process writes: `output_dir` on the chief, `output_dir/workers/<task>-<i>` else.

    Every multi-worker process runs the same program; only the chief writes the shared
    outputs, the others keep their own backups and files apart (also on a shared file system).
    """
    task_type, task_index, is_chief = worker_info(strategy)
    if is_chief:
        return output_dir
    return os.path.join(output_dir, "workers", f"{task_type}-{task_index}")


def run_training(
    config: TrainConfig,
    verbose: int | str = "auto",
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train an `ATLModel` as configured, evaluate it and write it to `config.output_dir`.

    Writes `model.keras`, `metrics.json`, `config.json`, `training_log.csv`, TensorBoard logs
    (`logs/`, with an embedding-projector export in `logs/projector/`) and, while training,
    a `backup/` that a rerun of the same config resumes from. Test metrics are retrieval
    metrics on the test split (Recall@K, P@1, R-Precision, MAP@R).

    Process-wide state it touches is restored on return: the Keras dtype policy
    (`mixed_precision`) and TensorFlow op determinism (`deterministic`). `logical_cpus`
    cannot be undone (TensorFlow fixes devices at initialisation).

    ``progress`` (e.g. ``print``) gets one-line messages about long steps before training
    (the first-use build of the text encoder, embedding the catalog's descriptions).
    """
    start = time.perf_counter()
    if config.logical_cpus:
        logical_cpu_devices(config.logical_cpus)
    strategy = get_strategy(config.strategy, tpu=config.tpu)
    replicas = int(strategy.num_replicas_in_sync)
    check_pk_divisible(config.p, config.k, replicas)
    output_dir = worker_output_dir(config.output_dir, strategy)

    previous_policy = keras.config.dtype_policy()
    previously_deterministic = _op_determinism_enabled()
    try:
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        if config.mixed_precision:
            keras.config.set_dtype_policy(mixed_precision_policy(strategy))
        return _train(config, strategy, replicas, output_dir, start, verbose, progress)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if config.deterministic and not previously_deterministic:
            _disable_op_determinism()


def _op_determinism_enabled() -> bool:
    from tensorflow.python.framework import config as tf_config

    return bool(getattr(tf_config, "is_op_determinism_enabled", lambda: False)())


def _disable_op_determinism() -> None:
    from tensorflow.python.framework import config as tf_config

    disable = getattr(tf_config, "disable_op_determinism", None)
    if disable is not None:
        disable()


def _train(
    config: TrainConfig,
    strategy: tf.distribute.Strategy,
    replicas: int,
    output_dir: str,
    start: float,
    verbose: int | str,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    keras.utils.set_random_seed(config.seed)
    data = load_data(config)
    encoder = load_text_encoder(config.text_encoder, cache_dir=config.text_encoder_dir, progress=progress)
    item_text = embed_descriptions(
        data.descriptions, encoder, cache_dir=config.text_cache_dir,
        progress=None if progress is None else (
            lambda done, total: progress(f"Embedded {done}/{total} descriptions with {config.text_encoder}")),
    )

    os.makedirs(output_dir, exist_ok=True)
    backup_dir = os.path.join(output_dir, BACKUP_DIR)
    log_path = os.path.join(output_dir, TRAINING_LOG)
    resume_epoch = backup_epoch(backup_dir)
    if resume_epoch is None and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run: do not append to an old run's log

    train_labels, num_proxies = data.train_labels, 0
    if config.loss in PROXY_LOSSES:  # one proxy per training item: labels 0..C-1
        classes = proxy_classes(data)
        train_labels, num_proxies = np.searchsorted(classes, data.train_labels), len(classes)
    dataset = pk_dataset(
        data.train_images,
        train_labels,
        text_embeddings=item_text[data.train_labels],
        p=config.p,
        k=config.k,
        seed=config.seed,
        augment=make_augmenter() if config.augment else None,
    )
    if resume_epoch:
        # Batch b of the P x K stream depends only on (seed, b): continue the stream where
        # the completed epochs left it (Keras reruns the interrupted epoch from its start).
        dataset = dataset.skip(resume_epoch * config.steps_per_epoch)
    dataset = distribute_batches(strategy, dataset)

    if config.weights == "imagenet" and config.allow_download:
        from atl_keras.backbones import download_imagenet_weights

        download_imagenet_weights(config.backbone, data.image_shape)
    with strategy.scope():
        model = ATLModel(
            backbone=config.backbone,
            input_shape=data.image_shape,
            embedding_dim=config.embedding_dim,
            pooling=config.pooling,
            weights=config.weights,
            cross_replica_mining=config.cross_replica_mining,
            num_proxies=num_proxies,
            proxy_learning_rate_multiplier=config.proxy_lr_multiplier,
        )
        optimizer = keras.optimizers.Adam(config.learning_rate)
        if keras.config.dtype_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss=build_loss(config, data, item_text))

    val = data.validation
    callbacks = [
        keras.callbacks.BackupAndRestore(
            backup_dir, save_freq=config.save_freq, delete_checkpoint=True
        ),
        RetrievalEvaluation(
            val.query_images,
            val.query_labels,
            val.gallery_images,
            val.gallery_labels,
            ks=config.ks,
            distance=config.distance,
        ),
        keras.callbacks.CSVLogger(log_path, append=True),
        keras.callbacks.TensorBoard(os.path.join(output_dir, "logs")),
    ]
    history = model.fit(
        dataset,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # the P x K sampler already randomises batches
    )
    initial_epoch = int(history.epoch[0]) if history.epoch else config.epochs
    test_metrics = evaluate_embeddings(
        model, data.test, ks=config.ks, distance=config.distance, limit=config.test_size
    )
    if config.projector_size:
        export_projector(model, data, os.path.join(output_dir, PROJECTOR_DIR), config.projector_size)

    model_path = os.path.join(output_dir, "model.keras")
    save_model_atomically(model, model_path)
    seconds = time.perf_counter() - start
    history_dict = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    write_json_atomically(
        {
            "test": test_metrics,
            "test_protocol": data.test.protocol,
            "history": history_dict,
            "epochs_run": [int(e) for e in history.epoch],
            "initial_epoch": initial_epoch,
            "resumed": bool(resume_epoch is not None),
            "replicas": replicas,
            "dtype_policy": keras.config.dtype_policy().name,
            "seconds": seconds,
        },
        os.path.join(output_dir, "metrics.json"),
    )
    write_json_atomically(
        dataclasses.asdict(config), os.path.join(output_dir, "config.json")
    )
    return TrainResult(
        model=model,
        test_metrics=test_metrics,
        history=history_dict,
        output_dir=output_dir,
        model_path=model_path,
        seconds=seconds,
        data=data,
        initial_epoch=initial_epoch,
        replicas=replicas,
    )


def export_projector(model: keras.Model, data: RetrievalData, log_dir: str, limit: int = 500) -> dict[str, str]:
    """Embedding-projector export of the first `limit` test gallery images (item id, description).

    Uses the gallery of a query->gallery test set, else the leave-one-out test images.
    """
    evaluation = data.test
    images = evaluation.index_images[:limit]
    labels = (
        evaluation.query_labels if evaluation.gallery_labels is None else evaluation.gallery_labels
    )[: len(images)]
    ids = evaluation.gallery_ids[: len(images)]
    if len(ids) != len(images):
        ids = [str(label) for label in labels]
    rows = []
    for row_id, label in zip(ids, labels):
        label = int(label)
        item = data.item_ids[label] if label < len(data.item_ids) else str(label)
        text = data.descriptions[label] if label < len(data.descriptions) else None
        rows.append((item, text if text is not None else "", row_id))
    return write_projector(
        log_dir, _embed(model, images), rows, images, columns=("item_id", "description", "image_id")
    )


def evaluate_saved_model(
    model_path: str,
    config: TrainConfig,
    split: str = "test",
    limit: int | None = None,
) -> tuple[dict[str, float], str]:
    """Retrieval metrics of a saved `.keras` model on `config.dataset`'s test or
    validation set; returns (metrics, protocol)."""
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}.")
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"No model at {model_path!r}; train one with `atl train`.")
    model = keras.models.load_model(model_path)
    evaluation = getattr(load_data(config), split)
    metrics = evaluate_embeddings(model, evaluation, config.ks, config.distance, limit)
    return metrics, evaluation.protocol

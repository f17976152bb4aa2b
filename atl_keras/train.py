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
- Resumable: `atl_keras.backup.TrainingBackup` in ``<output>/backup`` at every epoch end and
  every `save_freq` steps, written atomically (the previous backup is kept until the new one is
  complete) and removed only after the final files are written; rerunning the same command after
  a crash, a kill or a full disk resumes from the last complete backup (like Keras'
  BackupAndRestore, an interrupted epoch restarts with the backed-up weights and optimizer state;
  the P x K stream skips the batches of the completed epochs). Final files are written atomically.
- `deterministic` (default True): seeds + `tf.config.experimental.enable_op_determinism()`,
  so the same seed on one device gives identical metrics on a rerun. Costs speed on GPUs (and
  a few ops have no deterministic GPU kernel): set False for large GPU runs. Restored on return.
- Observability: TensorBoard scalars (loss, ``fraction_active``, ``mean_active_margin`` per
  epoch and every `TENSORBOARD_EVERY_STEPS` steps; validation retrieval metrics per epoch), ``training_log.csv`` (one row per epoch, appended across
  resumes) and an embedding-projector export of up to `projector_size` test gallery images.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import os
import re
import time
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from atl_keras.backup import (
    BackupWriteError,
    TrainingBackup,
    read_backup_state,
    remove_backup,
    restore_backup,
    write_bytes_atomically,
)
from atl_keras.data.datasets import DATASET_SPECS, EvalSet, RetrievalData, load_retrieval_data
from atl_keras.data.augment import make_augmenter
from atl_keras.data.sampler import pk_dataset
from atl_keras.data.streaming import SkippedRows, SkippedRowsWarning, pk_stream_dataset
from atl_keras.distribute import (
    STRATEGIES,
    check_pk_divisible,
    distribute_batch_function,
    distribute_batches,
    get_strategy,
    logical_cpu_devices,
    mixed_precision_policy,
    worker_info,
)
from atl_keras.distances import DISTANCES
from atl_keras.embedding import embed_images
from atl_keras.home import with_home_dirs
from atl_keras.losses import registry as loss_registry
from atl_keras.losses.proxy import proxy_classes
from atl_keras.margins.sources import TEXT_FREE_SOURCES
from atl_keras.metrics import RetrievalEvaluation, retrieval_metrics
from atl_keras.model import ATLModel
from atl_keras.projector import write_projector
from atl_keras.text import embed_descriptions, load_text_encoder

#: Loss names (`atl_keras.losses.registry`, the one registry the CLI and the docs read).
LOSSES = loss_registry.loss_names()
#: Losses with one learnable proxy per training item (`atl_keras.losses.proxy`).
PROXY_LOSSES = loss_registry.proxy_loss_names()
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
    stream: bool = True  # catalog/deepfashion/shards training rows: read per step, not decoded into RAM
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
    text_cache_dir: str | None = None  # description embeddings; None: <ATL home>/text_encoders/cache
    text_encoder_dir: str | None = None  # where "use-m3" is built on first use; None: <ATL home>/text_encoders
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
    #: Stop when validation R@1 has not improved for this many epochs and keep the best epoch's
    #: weights (`keras.callbacks.EarlyStopping`); None: train every epoch. Needs a validation set.
    early_stopping_patience: int | None = None
    deterministic: bool = True
    projector_size: int = 500
    fresh: bool = False  # discard a backup in output_dir (of this run or another) and start over

    def __post_init__(self) -> None:
        _check_field_types(self)
        name = self.dataset.partition(":")[0]
        if name not in {spec.partition(":")[0] for spec in DATASET_SPECS}:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}; available: {', '.join(DATASET_SPECS)}."
            )
        if self.loss not in loss_registry.LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {', '.join(loss_registry.LOSSES)}.")
        from atl_keras.margins import MAPPINGS, SOURCES

        if self.margin_source not in SOURCES:
            raise ValueError(f"Unknown margin_source {self.margin_source!r}; choose one of {', '.join(SOURCES)}.")
        if self.margin_mapping not in MAPPINGS:
            raise ValueError(f"Unknown margin_mapping {self.margin_mapping!r}; choose one of {', '.join(MAPPINGS)}.")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1 (epochs) or None, got {self.early_stopping_patience}.")
        if self.margin_source == "random" and self.semantic_threshold is not None:
            raise ValueError("semantic_threshold compares descriptions; margin_source='random' uses none. "
                             "Drop the threshold or use a text source.")
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
        _check_field_ranges(self)


def _type_problem(value: Any, hint: Any) -> str | None:
    """What `value` should have been to match the type `hint` (None: it matches)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        problems = [_type_problem(value, a) for a in options]
        if any(p is None for p in problems):
            return None
        return " or ".join(p for p in problems if p) + (" (or null)" if len(options) < len(args) else "")
    if hint is bool:
        return None if isinstance(value, (bool, np.bool_)) else "true or false"
    if hint is int:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        return None if ok else "an integer"
    if hint is float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        return None if ok and np.isfinite(value) else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            return f"a list of {'integers' if args[0] is int else 'strings'}"
        if any(_type_problem(v, args[0]) for v in value):
            return f"a list of {'integers' if args[0] is int else 'strings'}"
        return None
    return None  # other types: checked by their own rules


def _check_field_types(config: "TrainConfig") -> None:
    """Every field has the type its annotation says (YAML and JSON give any type)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "save_freq" and isinstance(value, str):
            continue  # 'epoch' or digits, checked below
        problem = _type_problem(value, hints.get(f.name))
        if problem:
            raise ValueError(f"{f.name} must be {problem}, got {value!r}.")


def _check_field_ranges(config: "TrainConfig") -> None:
    """Ranges and choices of the fields the other checks in `__post_init__` leave out."""
    from atl_keras.backbones import available_backbones

    choices = {
        "mining": loss_registry.MINING_MODES,
        "distance": DISTANCES,
        "backbone": available_backbones(),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"Unknown {name} {getattr(config, name)!r}; choose one of {', '.join(allowed)}.")
    at_least = {"image_size": 8, "synthetic_items": 1, "validation_size": 0, "test_size": 1, "seed": 0}
    for name, low in at_least.items():
        value = getattr(config, name)
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}.")
    if config.seed >= 2**32:
        raise ValueError(f"seed must be < 2**32, got {config.seed}.")
    for name in ("margin", "min_margin", "max_margin", "semantic_threshold", "missing_text_margin"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    if config.max_margin < config.min_margin:
        raise ValueError(f"max_margin ({config.max_margin}) must be >= min_margin ({config.min_margin}).")
    if config.learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {config.learning_rate}.")
    if not config.ks or any(k < 1 for k in config.ks):
        raise ValueError(f"ks must be a non-empty list of integers >= 1 (e.g. [1, 10, 20]), got {list(config.ks)}.")
    for name in ("output_dir", "text_encoder", "text_cache_dir", "text_encoder_dir"):
        if getattr(config, name) is not None and not getattr(config, name).strip():
            raise ValueError(f"{name} must not be empty.")


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
    epochs_trained: int = 0  # epochs done when training ended (early stopping: fewer than config.epochs)
    best_epoch: int | None = None  # early stopping: the epoch (1-based) whose weights the model keeps


def build_loss(
    config: TrainConfig, data: RetrievalData | None = None, item_text: np.ndarray | None = None
) -> keras.losses.Loss:
    """The loss named by `config.loss`, built by its builder in `atl_keras.losses.registry`.

    Proxy losses (`PROXY_LOSSES`) need `data` and `item_text`: their classes are the training
    items in `proxy_classes` order. ATL with a `margin_source` other than ``text`` or a
    `margin_mapping` other than ``linear`` trains through a precomputed item x item margin
    table (`atl_keras.margins.sources`), which needs `data` and the items' `item_text` [M, T].
    """
    return loss_registry.build_loss(config, data, item_text)


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
        stream=config.stream,
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


def eval_batch_size(image_shape: Any) -> int:
    """Images per evaluation batch: 256 up to 112 x 112 px, fewer for larger images (64 at
    224 px), so an evaluation batch's activations stay within those of a training step
    instead of growing 4x at 224 px (measured: +2.6 GB peak RSS with 256 at 224 px)."""
    height, width = (int(image_shape[0]), int(image_shape[1])) if image_shape is not None else (0, 0)
    return int(np.clip(256 * 112 * 112 // max(height * width, 1), 1, 256))


def _embed(model: keras.Model, images: Any, batch_size: int | None = None) -> np.ndarray:
    """Pixels ``[N, H, W, C]`` (or image files, encoded images) -> ``[N, D]`` float32.

    `atl_keras.embedding.embed_images`: the model is called directly on this process's
    default device (not `predict`, which under multi-worker would shard and gather).
    Every row must embed (evaluation rows are aligned with their labels). ``batch_size``
    defaults to `eval_batch_size` of the model's input.
    """
    if batch_size is None:
        batch_size = eval_batch_size(getattr(model, "image_shape", None) or getattr(images, "shape", (0, 0, 0))[1:])
    return embed_images(model, images, batch_size=batch_size, strict=True).vectors


def save_model_atomically(model: keras.Model, path: str) -> None:
    """Write a `.keras` file so a crash never leaves a truncated file at `path`.

    Serialised in memory, then `path.tmp` + fsync + rename (mode 0666 minus the umask);
    a full disk raises `OSError` with the tmp file removed and any old `path` intact.
    """
    from keras.src.saving import saving_lib

    buffer = io.BytesIO()
    saving_lib.save_model(model, buffer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_bytes_atomically(buffer.getvalue(), path)


def write_json_atomically(payload: Any, path: str) -> None:
    """Write JSON via a temporary file, fsync and rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_bytes_atomically(json.dumps(payload, indent=2, sort_keys=True).encode("utf-8"), path)


BACKUP_DIR = "backup"
#: TrainConfig fields a rerun may change and still resume its backup (how the run is carried
#: out or reported, not what is trained); any other difference refuses the backup.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "epochs", "save_freq", "early_stopping_patience", "test_size", "ks", "projector_size",
    "text_cache_dir", "text_encoder_dir", "strategy", "logical_cpus", "tpu", "allow_download",
    "deterministic", "strict", "stream", "fresh",
})


def backup_settings(config: "TrainConfig") -> dict[str, Any]:
    """The settings recorded with each backup and compared on resume (JSON-able)."""
    values = dataclasses.asdict(config)
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in RESUMABLE_CHANGES}, default=str))
TRAINING_LOG = "training_log.csv"
PROJECTOR_DIR = os.path.join("logs", "projector")
#: Temporary files a killed write can leave in the output directory (this module's `.tmp`
#: files, and the ``tmpXXXXXXXX.keras`` of `tempfile.mkstemp` used by earlier versions).
_STALE_TMP = re.compile(r"^(?:(?:model\.keras|metrics\.json|config\.json|training_log\.csv)\.tmp|tmp[a-z0-9_]{8}\.keras)$")
#: Named moments of `run_training`, in order, passed to its ``on_phase`` hook.
PHASES = ("data", "restored", "trained", "evaluated", "projector", "model", "metrics", "published")


#: Training steps between TensorBoard's per-step scalars (``batch_loss``, ...).
TENSORBOARD_EVERY_STEPS = 10


class StepTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback whose step count starts at `initial_step`, so the
    per-step scalars of a resumed run continue the curve instead of restarting at 0."""

    def __init__(self, log_dir: str, initial_step: int = 0, **kwargs: Any) -> None:
        super().__init__(log_dir, **kwargs)
        self.initial_step = int(initial_step)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        self._global_train_batch = self.initial_step  # Keras resets it to 0 here


def backup_epoch(backup_dir: str) -> int | None:
    """The number of finished epochs the backup in `backup_dir` resumes after (None: no backup)."""
    state = read_backup_state(backup_dir)
    return None if state is None else state.epoch


def check_output_dir(output_dir: str) -> None:
    """Raise `ValueError` now (before anything is written) if `output_dir` cannot be a
    run directory: it, or a parent of it, is an existing file, or it is not writable."""
    path = os.path.abspath(output_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is an existing file" if path == os.path.abspath(output_dir) else f"is inside the file {path!r}"
        raise ValueError(
            f"output_dir {output_dir!r} {what}, not a directory; choose another output directory."
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {output_dir!r}: {path!r} is not writable; choose another output directory.")


def check_evaluation_sizes(data: RetrievalData, config: TrainConfig) -> tuple[RetrievalData, tuple[int, ...]]:
    """Fail before training when the test set cannot give Recall@max(ks). A validation set
    too small for some ks is scored at the ks that fit (with a warning), and dropped only
    when none fits, so a small catalog still trains with validation metrics.

    Returns (data, the ks the validation set is scored at; empty without validation).
    """
    need = max(config.ks)
    validation_ks = tuple(config.ks) if data.validation is not None else ()
    for split in ("test", "validation"):
        evaluation = getattr(data, split)
        if evaluation is None:
            continue
        limit = config.test_size if split == "test" else None
        if evaluation.gallery_images is None:
            queries = len(evaluation.query_images) if limit is None else min(limit, len(evaluation.query_images))
            have, what, labels = queries - 1, "other images (leave-one-out)", evaluation.query_labels[:queries]
        else:
            have, what, labels = len(evaluation.gallery_images), "gallery images", evaluation.gallery_labels
        if have >= need:
            continue
        fitting = tuple(k for k in config.ks if k <= have)
        fits = ",".join(str(k) for k in fitting) or "none"
        items = len(np.unique(labels))
        per_item = max(have, 1) / max(items, 1)
        message = (
            f"recall_at_{need} needs at least {need} {what} in the {split} set "
            f"({evaluation.protocol}) of {config.dataset}, but it has {have} from {items} items "
            f"(about {int(np.ceil((need + (evaluation.gallery_images is None)) / per_item))} {split} items needed)"
        )
        if split == "test":
            raise ValueError(
                f"{message}. Use smaller ks (ks that fit: {fits}; `atl train --ks ...`) or a "
                "larger catalog."
            )
        if fitting:
            warnings.warn(f"{message}; validating at ks {fits} only.", stacklevel=2)
            validation_ks = fitting
        else:
            warnings.warn(f"{message}; training without validation metrics (no k fits).", stacklevel=2)
            data, validation_ks = dataclasses.replace(data, validation=None), ()
    return data, validation_ks


def _remove_stale_tmp_files(output_dir: str) -> None:
    for name in os.listdir(output_dir):
        if _STALE_TMP.match(name) and os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))


def _trim_log(log_path: str, epochs_done: int) -> None:
    """Keep the log rows of the epochs a backup holds (a rerun repeats the later ones)."""
    if not os.path.exists(log_path):
        return
    with open(log_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < epochs_done]
    if len(kept) != len(rows):
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(kept)
        write_bytes_atomically(out.getvalue().encode("utf-8"), log_path)


def _is_storage_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES)
    if isinstance(exc, tf.errors.OpError):
        text = str(exc).lower()
        return any(s in text for s in ("no space left", "disk quota", "read-only file system", "file too large"))
    return False


def _storage_error(exc: BaseException, where: str, backup_dir: str, finishing: bool) -> BackupWriteError:
    state = read_backup_state(backup_dir)
    cause = "no space left on device" if "space" in str(exc).lower() or getattr(exc, "errno", None) == errno.ENOSPC \
        else str(exc).splitlines()[0][:200]
    if state is None:
        kept = "there is no backup yet, so a rerun starts over"
    elif finishing:
        kept = (f"training is finished and its backup ({state.epoch} epochs) in {backup_dir} is kept: "
                "a rerun only evaluates and writes the final files")
    else:
        kept = f"the last complete backup ({state.epoch} epochs done) in {backup_dir} is kept"
    error = BackupWriteError(
        f"Writing {where} failed: {cause}; {kept}. Free space and rerun the same command to resume."
    )
    error.errno = getattr(exc, "errno", None) or errno.ENOSPC
    return error


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
    on_phase: Callable[[str], None] | None = None,
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
    (the first-use build of the text encoder, embedding the catalog's descriptions) and
    "Resuming ..." when a backup is restored.

    Durability: the backup (see `atl_keras.backup`) is written atomically at every epoch end
    (and every `save_freq` steps) and removed only after the final files are written, so a run
    killed at any moment, or stopped by a full disk (`atl_keras.backup.BackupWriteError`),
    resumes on a rerun; a torn backup falls back to the previous one, or starts over with
    a warning. ``on_phase(name)`` is called at each of `PHASES` (fault-injection tests).
    """
    start = time.perf_counter()
    config = with_home_dirs(config)  # None text directories: the ATL home ($ATL_HOME, ~/.cache/atl-keras)
    check_output_dir(config.output_dir)
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
        return _train(config, strategy, replicas, output_dir, start, verbose, progress, on_phase)
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
    on_phase: Callable[[str], None] | None = None,
) -> TrainResult:
    phase = on_phase or (lambda name: None)
    keras.utils.set_random_seed(config.seed)
    data, validation_ks = check_evaluation_sizes(load_data(config), config)
    if config.margin_source in TEXT_FREE_SOURCES and config.loss in ("atl", "adaptive_proxy"):
        item_text = np.zeros((len(data.descriptions), 1), np.float32)  # no text read: no encoder loaded
    else:
        encoder = load_text_encoder(config.text_encoder, cache_dir=config.text_encoder_dir, progress=progress)
        item_text = embed_descriptions(
            data.descriptions, encoder, cache_dir=config.text_cache_dir,
            progress=None if progress is None else (
                lambda done, total: progress(f"Embedded {done}/{total} descriptions with {config.text_encoder}")),
        )

    phase("data")

    os.makedirs(output_dir, exist_ok=True)
    _remove_stale_tmp_files(output_dir)
    backup_dir = os.path.join(output_dir, BACKUP_DIR)
    log_path = os.path.join(output_dir, TRAINING_LOG)

    train_labels, num_proxies, label_text = data.train_labels, 0, item_text
    if loss_registry.LOSSES[config.loss].proxies:  # one proxy per training item: labels 0..C-1
        classes = proxy_classes(data)
        train_labels, num_proxies = np.searchsorted(classes, data.train_labels), len(classes)
        label_text = item_text[classes]
    augment = make_augmenter() if config.augment else None
    skipped = SkippedRows() if data.train_source is not None else None
    if skipped is None:
        dataset = pk_dataset(
            data.train_images,
            train_labels,
            text_embeddings=label_text[train_labels],
            p=config.p,
            k=config.k,
            seed=config.seed,
            augment=augment,
        )

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
        if config.fresh:
            remove_backup(backup_dir)
        restored = restore_backup(model, backup_dir, settings=backup_settings(config))
    resume_epoch = None if restored is None else min(restored.epoch, config.epochs)
    if resume_epoch is None:
        if os.path.exists(log_path):
            os.remove(log_path)  # a fresh run: do not append to an old run's log
    else:
        _trim_log(log_path, resume_epoch)
        if progress is not None:
            progress(f"Resuming from epoch {resume_epoch + 1} of {config.epochs} ({resume_epoch} done; "
                     f"backup in {backup_dir})" if resume_epoch < config.epochs else
                     f"All {config.epochs} epochs were done (backup in {backup_dir}); "
                     "writing the final files")
    phase("restored")
    # Batch b of the P x K stream depends only on (seed, b): a resumed run continues the stream
    # where the completed epochs left it (like Keras, an interrupted epoch reruns from its start).
    done_steps = (resume_epoch or 0) * config.steps_per_epoch
    if skipped is None:
        dataset = distribute_batches(strategy, dataset.skip(done_steps))
    else:  # each worker reads and decodes only its replicas' rows of every global batch
        def streamed(first: int, count: int) -> tf.data.Dataset:
            return pk_stream_dataset(
                data.train_source, train_labels, label_text, data.preprocessing, p=config.p, k=config.k,
                seed=config.seed, augment=augment, batch_rows=(first, count), skipped=skipped,
            ).skip(done_steps)

        dataset = distribute_batch_function(strategy, streamed, config.p * config.k)

    val = data.validation
    callbacks: list[keras.callbacks.Callback] = []
    if val is not None:
        callbacks.append(RetrievalEvaluation(
            val.query_images,
            val.query_labels,
            val.gallery_images,
            val.gallery_labels,
            ks=validation_ks,
            distance=config.distance,
            batch_size=eval_batch_size(data.image_shape),
        ))
    stopper = None
    if config.early_stopping_patience is not None and val is not None:  # after the evaluation: reads its logs
        stopper = keras.callbacks.EarlyStopping(monitor="val_recall_at_1", mode="max",
                                                patience=config.early_stopping_patience, restore_best_weights=True)
        callbacks.append(stopper)
    if skipped is not None:
        callbacks.append(SkippedRowsWarning(skipped, data.train_source))
    callbacks += [
        keras.callbacks.CSVLogger(log_path, append=True),
        StepTensorBoard(os.path.join(output_dir, "logs"),
                        update_freq=min(TENSORBOARD_EVERY_STEPS, config.steps_per_epoch),
                        initial_step=(resume_epoch or 0) * config.steps_per_epoch),
        # last: commits the epoch's logs
        TrainingBackup(backup_dir, save_freq=config.save_freq, settings=backup_settings(config)),
    ]
    initial_epoch = resume_epoch or 0
    history = keras.callbacks.History()
    history.epoch, history.history = [], {}
    if initial_epoch < config.epochs:
        try:
            history = model.fit(
                dataset,
                epochs=config.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=config.steps_per_epoch,
                callbacks=callbacks,
                verbose=verbose,
                shuffle=False,  # the P x K sampler already randomises batches
            )
        except BackupWriteError:
            raise
        except (OSError, tf.errors.OpError) as exc:
            if _is_storage_error(exc):
                raise _storage_error(exc, f"the training logs in {output_dir}", backup_dir, False) from exc
            raise
    phase("trained")
    epochs_trained = initial_epoch + len(history.epoch)
    best_epoch = stopper.best_epoch + 1 if stopper is not None and stopper.best_weights is not None else None
    test_metrics = evaluate_embeddings(
        model, data.test, ks=config.ks, distance=config.distance, limit=config.test_size
    )
    phase("evaluated")
    model_path = os.path.join(output_dir, "model.keras")
    history_dict = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    try:
        if config.projector_size:
            export_projector(model, data, os.path.join(output_dir, PROJECTOR_DIR), config.projector_size)
        phase("projector")
        save_model_atomically(model, model_path)
        phase("model")
        seconds = time.perf_counter() - start
        _write_run_files(config, data, output_dir, test_metrics, history, history_dict,
                         initial_epoch, resume_epoch, replicas, seconds, best_epoch)
    except (OSError, tf.errors.OpError) as exc:
        if _is_storage_error(exc):
            raise _storage_error(exc, f"the final files in {output_dir}", backup_dir, True) from exc
        raise
    phase("metrics")
    remove_backup(backup_dir)  # only now: the final files are complete
    phase("published")
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
        epochs_trained=epochs_trained,
        best_epoch=best_epoch,
    )


def _write_run_files(
    config: TrainConfig,
    data: RetrievalData,
    output_dir: str,
    test_metrics: dict[str, float],
    history: keras.callbacks.History,
    history_dict: dict[str, list[float]],
    initial_epoch: int,
    resume_epoch: int | None,
    replicas: int,
    seconds: float,
    best_epoch: int | None = None,
) -> None:
    write_json_atomically(
        {
            "test": test_metrics,
            "test_protocol": data.test.protocol,
            "history": history_dict,
            "epochs_run": [int(e) for e in history.epoch],
            "best_epoch": best_epoch,  # early stopping: the kept weights' epoch (1-based)
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


def export_projector(model: keras.Model, data: RetrievalData, log_dir: str, limit: int = 500) -> dict[str, str]:
    """Embedding-projector export of the first `limit` test gallery images (item id, description).

    Uses the gallery of a query->gallery test set, else the leave-one-out test images. Streamed
    datasets' images are decoded batch by batch for the embeddings and one at a time for the
    sprite's thumbnails (`atl_keras.projector.make_sprite`): no copy of the set in memory.
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
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (the number of queries to evaluate), got {limit}.")
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"No model at {model_path!r}; train one with `atl train`.")
    model = keras.models.load_model(model_path)
    evaluation = getattr(load_data(config), split)
    if evaluation is None:
        raise ValueError(f"{config.dataset} has no {split} set (too few items to carve one); use split='test'.")
    metrics = evaluate_embeddings(model, evaluation, config.ks, config.distance, limit)
    return metrics, evaluation.protocol

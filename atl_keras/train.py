"""The training recipe behind `atl train`: data -> text margins -> P x K fit -> retrieval metrics.

Everything the CLI does is one call here, so a user can run it from Python:

    result = atl.train.run_training(atl.train.TrainConfig(epochs=1, output_dir="runs/try"))
    print(result.test_metrics["recall_at_1"])
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from atl_keras.data.fashion_mnist import load_fashion_mnist
from atl_keras.data.sampler import pk_dataset
from atl_keras.losses import AdaptiveTripletLoss, TripletLoss
from atl_keras.metrics import RetrievalEvaluation, retrieval_metrics
from atl_keras.model import ATLModel
from atl_keras.text import embed_descriptions, load_text_encoder

DATASETS = ("fashion-mnist",)
LOSSES = ("atl", "triplet")


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults train a useful model in minutes on CPU."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    output_dir: str = "runs/main"
    loss: str = "atl"
    mining: str = "batch_hard"
    distance: str = "squared_l2"
    margin: float = 0.2
    min_margin: float = 0.05
    max_margin: float = 0.4
    semantic_threshold: float | None = None
    text_encoder: str = "use-m3"
    text_cache_dir: str = "saved_models/text_encoders/cache"
    backbone: str = "small_cnn"
    embedding_dim: int = 64
    p: int = 10
    k: int = 12
    epochs: int = 3
    steps_per_epoch: int = 150
    learning_rate: float = 1e-3
    validation_size: int = 2000
    test_size: int | None = None
    ks: tuple[int, ...] = (1, 10, 20)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}; available: {', '.join(DATASETS)}."
            )
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}.")
        for name in ("p", "k", "epochs", "steps_per_epoch", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.k < 2:
            raise ValueError("k must be >= 2: each label needs a positive pair in the batch.")
        self.ks = tuple(int(k) for k in self.ks)


@dataclass
class TrainResult:
    """What a run produced: the model, its metrics and where it was written."""

    model: ATLModel
    test_metrics: dict[str, float]
    history: dict[str, list[float]]
    output_dir: str
    model_path: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def build_loss(config: TrainConfig) -> keras.losses.Loss:
    """The loss named by `config.loss`, with the config's margins and mining."""
    if config.loss == "triplet":
        return TripletLoss(margin=config.margin, mining=config.mining, distance=config.distance)
    return AdaptiveTripletLoss(
        min_margin=config.min_margin,
        max_margin=config.max_margin,
        mining=config.mining,
        distance=config.distance,
        semantic_threshold=config.semantic_threshold,
    )


def _split_validation(
    num_samples: int, validation_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint (train, validation) index arrays."""
    if validation_size >= num_samples:
        raise ValueError(
            f"validation_size={validation_size} leaves no training data "
            f"({num_samples} samples)."
        )
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.sort(order[validation_size:]), np.sort(order[:validation_size])


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


def run_training(config: TrainConfig, verbose: int | str = "auto") -> TrainResult:
    """Train an `ATLModel` as configured, evaluate it and write it to `config.output_dir`.

    Writes `model.keras`, `metrics.json`, `config.json` and TensorBoard logs (`logs/`).
    Test metrics are leave-one-out retrieval on the test split (Recall@K, P@1,
    R-Precision, MAP@R).
    """
    start = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    train_set = load_fashion_mnist("train", data_dir=config.data_dir)
    test_set = load_fashion_mnist("test", data_dir=config.data_dir)

    train_idx, val_idx = _split_validation(
        len(train_set.labels), config.validation_size, config.seed
    )
    encoder = load_text_encoder(config.text_encoder)
    class_text = embed_descriptions(
        train_set.descriptions, encoder, cache_dir=config.text_cache_dir
    )
    sample_text = class_text[train_set.labels[train_idx]]

    dataset = pk_dataset(
        train_set.images[train_idx],
        train_set.labels[train_idx],
        text_embeddings=sample_text,
        p=config.p,
        k=config.k,
        seed=config.seed,
    )
    model = ATLModel(
        backbone=config.backbone,
        input_shape=train_set.images.shape[1:],
        embedding_dim=config.embedding_dim,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate), loss=build_loss(config)
    )
    os.makedirs(config.output_dir, exist_ok=True)
    callbacks = [
        RetrievalEvaluation(
            train_set.images[val_idx],
            train_set.labels[val_idx],
            ks=config.ks,
            distance=config.distance,
        ),
        keras.callbacks.TensorBoard(os.path.join(config.output_dir, "logs")),
    ]
    history = model.fit(
        dataset,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # the P x K sampler already randomises batches
    )

    test_images, test_labels = test_set.images, test_set.labels
    if config.test_size is not None:
        test_images, test_labels = test_images[: config.test_size], test_labels[: config.test_size]
    test_metrics = retrieval_metrics(
        model.embed(test_images), test_labels, ks=config.ks, distance=config.distance
    )

    model_path = os.path.join(config.output_dir, "model.keras")
    save_model_atomically(model, model_path)
    seconds = time.perf_counter() - start
    write_json_atomically(
        {"test": test_metrics, "history": history.history, "seconds": seconds},
        os.path.join(config.output_dir, "metrics.json"),
    )
    write_json_atomically(
        dataclasses.asdict(config), os.path.join(config.output_dir, "config.json")
    )
    return TrainResult(
        model=model,
        test_metrics=test_metrics,
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        output_dir=config.output_dir,
        model_path=model_path,
        seconds=seconds,
    )


def evaluate_saved_model(
    model_path: str,
    dataset: str = "fashion-mnist",
    split: str = "test",
    data_dir: str | None = None,
    ks: tuple[int, ...] = (1, 10, 20),
    distance: str = "squared_l2",
    limit: int | None = None,
) -> dict[str, float]:
    """Leave-one-out retrieval metrics of a saved `.keras` model on a dataset split."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; available: {', '.join(DATASETS)}.")
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"No model at {model_path!r}; train one with `atl train`.")
    model = keras.models.load_model(model_path)
    data = load_fashion_mnist(split, data_dir=data_dir)
    images, labels = data.images, data.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    embeddings = model.embed(images)
    return retrieval_metrics(embeddings, labels, ks=ks, distance=distance)

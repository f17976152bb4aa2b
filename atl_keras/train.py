"""The training recipe behind `atl train`: data -> text margins -> P x K fit -> retrieval metrics.

Everything the CLI does is one call here, so a user can run it from Python:

    from atl_keras.train import TrainConfig, run_training
    result = run_training(TrainConfig(dataset="synthetic-shop", epochs=1, output_dir="runs/try"))
    print(result.test_metrics["recall_at_1"])
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from atl_keras.data.datasets import DATASET_SPECS, EvalSet, RetrievalData, load_retrieval_data
from atl_keras.data.sampler import pk_dataset
from atl_keras.losses import AdaptiveTripletLoss, TripletLoss
from atl_keras.metrics import RetrievalEvaluation, retrieval_metrics
from atl_keras.model import ATLModel
from atl_keras.text import embed_descriptions, load_text_encoder

LOSSES = ("atl", "triplet")
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
    text_encoder: str = "use-m3"
    text_cache_dir: str = "saved_models/text_encoders/cache"
    backbone: str = "small_cnn"
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

    def __post_init__(self) -> None:
        name = self.dataset.partition(":")[0]
        if name not in {spec.partition(":")[0] for spec in DATASET_SPECS}:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}; available: {', '.join(DATASET_SPECS)}."
            )
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}.")
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


def _embed(model: keras.Model, images: np.ndarray) -> np.ndarray:
    if hasattr(model, "embed"):
        return model.embed(images)
    return np.asarray(model.predict(images, verbose=0))


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
    data = load_data(config)
    encoder = load_text_encoder(config.text_encoder)
    item_text = embed_descriptions(data.descriptions, encoder, cache_dir=config.text_cache_dir)

    dataset = pk_dataset(
        data.train_images,
        data.train_labels,
        text_embeddings=item_text[data.train_labels],
        p=config.p,
        k=config.k,
        seed=config.seed,
    )
    model = ATLModel(
        backbone=config.backbone,
        input_shape=data.image_shape,
        embedding_dim=config.embedding_dim,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate), loss=build_loss(config)
    )
    os.makedirs(config.output_dir, exist_ok=True)
    val = data.validation
    callbacks = [
        RetrievalEvaluation(
            val.query_images,
            val.query_labels,
            val.gallery_images,
            val.gallery_labels,
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
    test_metrics = evaluate_embeddings(
        model, data.test, ks=config.ks, distance=config.distance, limit=config.test_size
    )

    model_path = os.path.join(config.output_dir, "model.keras")
    save_model_atomically(model, model_path)
    seconds = time.perf_counter() - start
    write_json_atomically(
        {
            "test": test_metrics,
            "test_protocol": data.test.protocol,
            "history": history.history,
            "seconds": seconds,
        },
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
        data=data,
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

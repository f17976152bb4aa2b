"""Train and score one (protocol, method, seed), with per-run records that make reruns resume."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from atl_keras.experiments.controls import ShuffledTextEncoder, save_lookup_encoder
from atl_keras.experiments.evaluation import evaluation_settings, grid_query_rows
from atl_keras.experiments.methods import Method
from atl_keras.experiments.protocols import EVAL_SEED, GRID_TOP, METRICS, Protocol, ReplicationConfig, Schedule
from atl_keras.home import with_home_dirs

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
    host: str = ""  # the machine that trained it (records of other hosts are never reused)
    code_version: str = ""  # git commit of the checkout (or the package version)
    settings_key: str = ""  # the run's settings without the host (blocks from other hosts are checked by it)
    steps_trained: int = 0  # optimizer steps run (early stopping: fewer than the schedule's cap)
    steps_used: int = 0  # steps of the weights scored (early stopping: the best validation epoch's)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_config(protocol: Protocol, method: Method, seed: int, schedule: Schedule, config: ReplicationConfig) -> Any:
    """The `TrainConfig` of one run (without the semantic threshold, resolved at run time)."""
    from atl_keras.train import TrainConfig

    shop = protocol.dataset == "synthetic-shop"
    p, k = schedule.shop_pk if shop else schedule.fmnist_pk
    if protocol.name == "catalog":  # a user's catalog: TrainConfig's catalog defaults
        p, k = None, None
    encoder = method.text_encoder or config.text_encoder
    return TrainConfig(
        dataset=protocol.dataset,
        synthetic_items=schedule.synthetic_items,
        synthetic_variants=protocol.synthetic_variants,
        synthetic_street_views=protocol.street_views,
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
        text_encoder_dir=config.text_encoder_dir,
        margin_source=method.margin_source,
        margin_mapping=method.margin_mapping,
        p=p,
        k=k,
        epochs=schedule.epochs,
        steps_per_epoch=schedule.steps_per_epoch,
        early_stopping_patience=schedule.early_stopping_patience,
        learning_rate=schedule.learning_rate,
        embedding_dim=schedule.embedding_dim,
        validation_size=schedule.validation_size,
        test_size=schedule.eval_limit,
        ks=(1,) if protocol.name == "catalog" else (1, 10, 20),  # small catalogs: run_one scores up to max_k
        seed=seed,
        projector_size=0,
    )


def host_name() -> str:
    """This machine's name (records are keyed by it: results of other machines never mix in)."""
    return platform.node() or "unknown-host"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The commit of the checkout this process's code was loaded from (read once, at first
    use: modules are imported then), ``-dirty`` when atl_keras/ had uncommitted changes; else
    the package version."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=10", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "atl_keras"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib import metadata

        try:
            return "atl-keras " + metadata.version("atl-keras")
        except metadata.PackageNotFoundError:
            return "unknown"


#: `TrainConfig` fields added after records were keyed, left out of the key at these values so
#: that earlier records (and the confirmatory blocks' settings keys) stay valid.
_KEY_OMIT_AT = {"early_stopping_patience": None}


def _run_key(train_cfg: Any, method: Method, config: ReplicationConfig, host: bool = True) -> str:
    """A hash of every setting of a run (and of this host unless `host=False`)."""
    train = {k: v for k, v in dataclasses.asdict(train_cfg).items()
             if k != "output_dir" and not (k in _KEY_OMIT_AT and v == _KEY_OMIT_AT[k])}
    # Where caches live does not change a run: fixed values keep the keys of records made
    # when these were paths relative to the working directory.
    train.update(text_cache_dir="saved_models/text_encoders/cache", text_encoder_dir="saved_models/text_encoders")
    payload = {
        "train": train,
        "method": dataclasses.asdict(method),
        "max_k": config.max_k,
        "grid_queries": config.grid_queries,
        "eval_seed": EVAL_SEED,
        "host": host_name() if host else None,
        "version": 2,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_key(protocol: Protocol, method: Method, seed: int, config: ReplicationConfig) -> str:
    """The key of a run's settings on any host (`RunRecord.settings_key`)."""
    return _run_key(train_config(protocol, method, seed, config.schedule_obj, config), method, config, host=False)


def _record_path(config: ReplicationConfig, protocol: str, method: str, seed: int) -> str:
    return os.path.join(config.work_dir, "records", f"{protocol}__{method}__seed{seed}.json")


def _resolve_text(train_cfg: Any, method: Method, seed: int) -> tuple[Any, float | None]:
    """Apply the method's text hooks: shuffled encoder, quantile threshold, mean margin."""
    if not (method.shuffle_descriptions or method.threshold_quantile is not None
            or method.margin_from_text_mean or method.variant_threshold):
        return train_cfg, None
    from atl_keras.margins.report import margin_statistics
    from atl_keras.text import embed_descriptions, load_text_encoder
    from atl_keras.train import load_data

    data = load_data(train_cfg)
    encoder = load_text_encoder(train_cfg.text_encoder, cache_dir=train_cfg.text_encoder_dir)
    if method.shuffle_descriptions:
        encoder = ShuffledTextEncoder(encoder, data.descriptions, seed=seed)
        # run_training writes its config as JSON: hand it a path, not an object.
        path = os.path.join(os.path.dirname(train_cfg.output_dir), "..", "..", "..", "text_encoders",
                            encoder.identity.split(":")[1] + f"-seed{seed}")
        path = save_lookup_encoder(encoder, os.path.normpath(path))
        train_cfg = dataclasses.replace(train_cfg, text_encoder=path)
        encoder = load_text_encoder(path)
    threshold = None
    if method.variant_threshold:
        threshold = variant_threshold(data, encoder, train_cfg)
        train_cfg = dataclasses.replace(train_cfg, semantic_threshold=threshold)
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


def variant_threshold(data: Any, encoder: Any, train_cfg: Any) -> float:
    """The median text distance between listings of one design among the training items."""
    from atl_keras.margins import text_distance_table
    from atl_keras.text import embed_descriptions

    designs = item_designs(data)
    if designs is None:
        raise ValueError("The variant threshold needs a catalog with variant listings (item attribute 'design').")
    items = np.unique(data.train_labels)
    text = embed_descriptions([data.descriptions[i] for i in items], encoder, cache_dir=train_cfg.text_cache_dir)
    d = text_distance_table(text, train_cfg.distance)
    same = designs[items][:, None] == designs[items][None, :]
    upper = np.triu(np.ones_like(same), k=1).astype(bool)
    values = d[same & upper]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("No two training listings share a design: no variant distance to threshold at.")
    return float(np.median(values))


def item_designs(data: Any) -> np.ndarray | None:
    """``[M]`` design group per item from the items' ``"design"`` attribute (None without one)."""
    attributes = getattr(data, "item_attributes", None)
    if not attributes or not any("design" in a for a in attributes):
        return None
    names = np.asarray([str(a.get("design", f"item:{i}")) for i, a in enumerate(attributes)])
    return np.unique(names, return_inverse=True)[1].astype(np.int64)


def _semantic_metrics(data: Any, setting: Any, query: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
    """Variant-aware Recall@1/10 and attribute agreement@10 where the catalog has attributes."""
    from atl_keras.semantic_metrics import semantic_retrieval_metrics

    attributes = getattr(data, "item_attributes", None)
    if not attributes:
        return {}
    designs = item_designs(data)
    values = semantic_retrieval_metrics(
        query, setting.query_labels, gallery, setting.gallery_labels,
        item_attributes=attributes, design_ids=designs, ks=(1, 10), ignore_keys=("design", "listing"))
    keep = ("variant_recall_at_1", "variant_recall_at_10", "attribute_agreement_at_10", "attribute_agreement_chance")
    return {k: float(values[k]) for k in keep if k in values}


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
        if protocol.name == "variant_shop":
            metrics[setting.name].update(_semantic_metrics(result.data, setting, query, gallery))
        curves[setting.name] = [float(values[f"recall_at_{k}"]) for k in range(1, max_k + 1)]
        rows = grid_query_rows(len(setting.query_labels), config.grid_queries, setting.name)
        d = ((query[rows, None, :] - gallery[None, :, :]) ** 2).sum(-1)  # [q, G]
        top = np.argsort(d, axis=1, kind="stable")[:, :GRID_TOP]
        grids[setting.name] = {"queries": rows, "top": top.tolist()}
    record = RunRecord(
        protocol=protocol.name, method=method.name, seed=seed, metrics=metrics, curves=curves,
        grids=grids, seconds=time.perf_counter() - start,
        train_config=_json_config(train_cfg, method, config),
        key=key, semantic_threshold=threshold, host=host_name(), code_version=code_version(),
        settings_key=settings_key(protocol, method, seed, config),
        steps_trained=result.epochs_trained * schedule.steps_per_epoch,
        steps_used=(result.best_epoch or result.epochs_trained) * schedule.steps_per_epoch,
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
    config = with_home_dirs(config)  # None text directories: the ATL home
    records = []
    plan = [(config.protocol(p), m, s) for p, m, s in config.plan()]
    for i, (protocol, method, seed) in enumerate(plan, 1):
        if progress:
            progress(f"[{i}/{len(plan)}] {protocol.name} {method.name} seed={seed} ...")
        record = run_one(protocol, method, seed, config)
        records.append(record)
        if progress:
            summary = ", ".join(f"{e}: R@1={m['recall_at_1']:.3f} MAP@R={m['map_at_r']:.3f}"
                                for e, m in record.metrics.items())
            elapsed = time.perf_counter() - start
            left = f"; about {elapsed / i * (len(plan) - i) / 60:.0f} min left" if i < len(plan) else ""
            progress(f"[{i}/{len(plan)}] done in {record.seconds:.0f} s (elapsed {elapsed / 60:.1f} min{left}): "
                     f"{summary}")
    return ReplicationResult(config, records, time.perf_counter() - start, command, environment_info())


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
    wanted = [(p, m.name, s) for p, m, s in config.plan()]
    missing = [w for w in wanted if w not in records]
    if missing:
        raise ValueError(f"{path} has no record of {len(missing)} runs this configuration needs, e.g. {missing[0]}; "
                         "run the replication (without --from-records) to train them.")
    return ReplicationResult(config, [records[w] for w in wanted], float(payload["wall_seconds"]),
                             payload.get("command"), payload.get("environment", {}))

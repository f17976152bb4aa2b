"""tf.distribute strategy selection: one device, mirrored GPUs, multi-worker, TPU.

    strategy = atl.distribute.get_strategy("auto")
    with strategy.scope():
        model = atl.ATLModel(...)
        model.compile(...)
    model.fit(...)

`logical_cpu_devices(n)` splits the CPU into n logical devices so mirrored paths can be
exercised on a machine without GPUs (it must run before TensorFlow initialises devices).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import tensorflow as tf

__all__ = [
    "STRATEGIES",
    "check_pk_divisible",
    "distribute_batch_function",
    "distribute_batches",
    "gather_replicas",
    "get_strategy",
    "in_multi_replica_context",
    "logical_cpu_devices",
    "mixed_precision_policy",
    "num_replicas",
    "worker_info",
]

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def logical_cpu_devices(count: int) -> list[str]:
    """Split the first physical CPU into `count` logical devices; returns their names.

    Must be called before any TensorFlow op runs (device configuration is frozen after).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as error:
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) != count:
            raise RuntimeError(
                f"TensorFlow is already initialised with {len(existing)} logical CPU "
                f"device(s); call logical_cpu_devices({count}) before any TensorFlow op."
            ) from error
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def get_strategy(
    name: str = "auto",
    devices: list[str] | None = None,
    tpu: str | None = None,
) -> tf.distribute.Strategy:
    """The `tf.distribute.Strategy` called `name`.

    - `auto`: MirroredStrategy over the visible GPUs when there are two or more, else
      OneDeviceStrategy on the single GPU or the CPU.
    - `one_device`: the first GPU, else the CPU.
    - `mirrored`: MirroredStrategy over `devices` (default: all GPUs, else all logical CPUs).
    - `multi_worker`: MultiWorkerMirroredStrategy configured from the `TF_CONFIG` environment
      variable (cluster spec + this task), which must be set.
    - `tpu`: TPUStrategy through a TPUClusterResolver (`tpu` = TPU name or grpc address).
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    if name == "multi_worker":
        # Before anything initialises the TensorFlow runtime (listing *logical* devices does):
        # collective ops must be configured at program start-up.
        return _multi_worker_strategy()
    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) >= 2 else "one_device"
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one_device":
        device = gpus[0].name if gpus else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if devices is None:
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)


def _multi_worker_strategy() -> tf.distribute.Strategy:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "strategy 'multi_worker' needs TF_CONFIG, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}.'
        )
    try:
        json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from error
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:
        raise RuntimeError(
            "MultiWorkerMirroredStrategy must be created before TensorFlow runs any op "
            "(collective ops are configured at start-up): create the strategy first in the "
            "worker program."
        ) from error

# ----------------------------------------------------------------------------- replicas
def num_replicas(strategy: tf.distribute.Strategy | None = None) -> int:
    """Replicas in sync of `strategy` (default: the current one; 1 outside any scope)."""
    strategy = strategy or tf.distribute.get_strategy()
    return int(strategy.num_replicas_in_sync)


def check_pk_divisible(p: int, k: int, replicas: int) -> int:
    """Rows per replica of a ``P x K`` global batch; raises unless whole labels fit on each replica.

    The global batch of ``P * K`` rows is cut into ``replicas`` contiguous slices of
    ``P * K / replicas`` rows. A label's K rows are contiguous, so ``P % replicas == 0``
    keeps every label on one replica (each replica then holds ``P / replicas`` labels).
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}.")
    if p % replicas:
        lower = (p // replicas) * replicas
        raise ValueError(
            f"p={p} labels per batch cannot be split evenly over {replicas} replicas: each "
            f"replica takes P*K/R contiguous rows and must hold whole labels. Use a p divisible "
            f"by {replicas} (e.g. p={max(lower, replicas)} or p={lower + replicas})."
        )
    return p * k // replicas


def in_multi_replica_context() -> bool:
    """True inside `strategy.run` (a replica context) of a strategy with > 1 replicas."""
    context = tf.distribute.get_replica_context()
    return context is not None and context.num_replicas_in_sync > 1


def gather_replicas(structure: Any) -> Any:
    """All-gather every tensor of a nest along axis 0 over the replicas in sync.

    Inside a replica context with R > 1 replicas, each ``[b, ...]`` tensor becomes the
    global ``[R * b, ...]`` tensor (replica order; identical on every replica). Anywhere
    else (one device, cross-replica context, no strategy) the structure is returned as is.

    Gradients: `ReplicaContext.all_gather`'s gradient all-reduces (sums) the incoming
    gradient over replicas and keeps this replica's slice. If every replica computes the
    same global loss ``L`` scaled by ``1 / R`` (as Keras losses do under a strategy) and
    the optimizer sums gradients over replicas, the applied gradient is exactly
    ``dL/dtheta`` of the global batch on one device.
    """
    if not in_multi_replica_context():
        return structure
    context = tf.distribute.get_replica_context()
    devices = tuple(getattr(context.strategy.extended, "worker_devices", ()) or ())
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    local_device = None
    if len(devices) == 1:
        local_device = devices[0]
    elif devices and replica_id is not None:
        local_device = devices[int(replica_id) % len(devices)]

    def gather(x: Any) -> Any:
        x = tf.convert_to_tensor(x)
        if not x.device and local_device:
            # all_gather sends to the input's device; under MultiWorkerMirroredStrategy graph
            # tensors may carry none ("destinations can not be empty"): pin the replica's.
            with tf.device(local_device):
                x = tf.identity(x)
        return context.all_gather(x, axis=0)

    # One collective per tensor: a batched all-gather concatenates its inputs and needs one dtype.
    return tf.nest.map_structure(gather, structure)


def worker_info(strategy: tf.distribute.Strategy | None = None) -> tuple[str, int, bool]:
    """``(task_type, task_index, is_chief)`` of this process (``("worker", 0, True)`` locally).

    For MultiWorkerMirroredStrategy the chief is the ``chief`` task, or worker 0 when the
    cluster has no ``chief``: the only process that should write shared outputs.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None) if resolver is not None else None
    if not task_type:
        return "worker", 0, True
    task_index = int(resolver.task_id or 0)
    cluster = resolver.cluster_spec().as_dict() if resolver.cluster_spec() else {}
    is_chief = task_type == "chief" or (
        task_type == "worker" and task_index == 0 and "chief" not in cluster
    )
    return task_type, task_index, is_chief


def distribute_batches(
    strategy: tf.distribute.Strategy, dataset: tf.data.Dataset
) -> tf.data.Dataset | tf.distribute.DistributedDataset:
    """Split each *global* batch of `dataset` into contiguous per-replica slices.

    `dataset` yields global batches (``[B, ...]`` nests, B divisible by the replica count R).
    Replica r (in the order of the strategy's replicas, across workers) receives rows
    ``[r * B / R, (r + 1) * B / R)`` of every batch, so the all-gather in
    `gather_replicas` rebuilds the global batch in its original order. Every worker runs the
    same (deterministic) pipeline and keeps only its replicas' slices: no auto-sharding, no
    dependence on file layout. With one replica the dataset is returned unchanged.
    """
    replicas = num_replicas(strategy)
    if replicas == 1:
        return dataset

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        pipelines = context.num_input_pipelines
        local = context.num_replicas_in_sync // pipelines
        first = context.input_pipeline_id * local

        def slices(*batch: Any) -> Any:
            batch = batch[0] if len(batch) == 1 else batch

            def cut(x: tf.Tensor) -> tf.Tensor:
                size = x.shape[0]
                if size is None:
                    raise ValueError(
                        "distribute_batches needs batches of static size (e.g. pk_dataset or "
                        "batch(..., drop_remainder=True)); got an unknown batch dimension."
                    )
                if size % replicas:
                    raise ValueError(
                        f"The global batch of {size} rows cannot be split over {replicas} "
                        "replicas; use a batch size divisible by the replica count."
                    )
                parts = tf.reshape(x, [replicas, size // replicas, *x.shape[1:]])
                return parts[first : first + local]

            return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(cut, batch))

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return dataset.flat_map(slices).with_options(options)

    return strategy.distribute_datasets_from_function(dataset_fn)


def distribute_batch_function(
    strategy: tf.distribute.Strategy,
    make_batches: Callable[[int, int], tf.data.Dataset],
    batch_size: int,
) -> tf.data.Dataset | tf.distribute.DistributedDataset:
    """Like `distribute_batches`, but each worker builds only the rows its replicas take.

    ``make_batches(first, count)`` returns the dataset of rows ``[first, first + count)`` of
    every global batch of ``batch_size`` rows (e.g. `atl_keras.data.streaming.pk_stream_dataset`
    with ``batch_rows``). A worker with L of the R replicas builds one pipeline for its
    ``L * batch_size / R`` contiguous rows and hands replica r its own slice: the same layout
    as `distribute_batches` (replica r gets rows ``[r * B / R, (r + 1) * B / R)``), but a
    streaming worker reads and decodes only its share of the files.
    """
    replicas = num_replicas(strategy)
    if replicas == 1:
        return make_batches(0, batch_size)
    if batch_size % replicas:
        raise ValueError(f"The global batch of {batch_size} rows cannot be split over {replicas} replicas.")
    per_replica = batch_size // replicas

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = context.num_replicas_in_sync // context.num_input_pipelines
        first = context.input_pipeline_id * local * per_replica
        dataset = make_batches(first, local * per_replica)

        def slices(*batch: Any) -> tf.data.Dataset:
            batch = batch[0] if len(batch) == 1 else batch
            cut = lambda x: tf.reshape(x, [local, per_replica, *x.shape[1:]])  # noqa: E731
            return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(cut, batch))

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return dataset.flat_map(slices).with_options(options)

    return strategy.distribute_datasets_from_function(dataset_fn)


# ----------------------------------------------------------------------- mixed precision
def mixed_precision_policy(strategy: tf.distribute.Strategy | None = None) -> str:
    """The mixed-precision policy for the devices training runs on.

    ``"mixed_float16"`` on GPUs (fast float16 tensor cores; needs loss scaling, which
    `keras.optimizers.LossScaleOptimizer` does), ``"mixed_bfloat16"`` on TPUs and CPUs
    (float32's exponent range: no loss scaling needed).
    """
    strategy = strategy or tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    devices = getattr(strategy.extended, "worker_devices", ()) or ()
    uses_gpu = any("GPU" in d.upper() for d in devices) or (
        not devices and bool(tf.config.list_logical_devices("GPU"))
    )
    return "mixed_float16" if uses_gpu else "mixed_bfloat16"

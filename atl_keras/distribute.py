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

import tensorflow as tf

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
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) >= 2 else "one_device"
    if name == "one_device":
        device = gpus[0].name if gpus else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        if devices is None:
            devices = [d.name for d in gpus] or [
                d.name for d in tf.config.list_logical_devices("CPU")
            ]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
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
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)

"""Dynamic request batching with TF Serving's ``BatchingParameters`` and semantics.

``--enable_batching`` merges concurrent Predict requests for the same model version and
signature into one signature call and splits the outputs back, as TF Serving's
``SharedBatchScheduler`` + ``BatchingSession`` do:

- one queue per (model version, signature, values of the unbatched inputs such as ``k``);
  all queues share ``num_batch_threads`` threads;
- a batch holds at most ``max_batch_size`` rows; a thread takes a batch as soon as it is
  full, or once its oldest request has waited ``batch_timeout_micros`` (0: whenever a
  thread is free, so batches form while the threads are busy);
- a queue holds at most ``max_enqueued_batches`` batches (a batch taken by a thread has
  left the queue); a request that does not fit answers UNAVAILABLE at once;
- ``allowed_batch_sizes`` pads a batch up to the next allowed size (rows repeated, their
  outputs dropped); the last entry must equal ``max_batch_size``;
- a request larger than ``max_batch_size`` is INVALID_ARGUMENT.

If a merged call fails, each request in it is run on its own, so one bad image fails
only its own request.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import threading
import time
from typing import Any, Callable, Mapping

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

from atl_keras.serving.errors import RequestError, invalid_argument
from atl_keras.serving.loader import LoadedVersion, SignatureInfo
from atl_keras.serving.requests import spec_dims

logger = logging.getLogger(__name__)

#: The file TF Serving reads per model version with --enable_per_model_batching_parameters.
PER_MODEL_FILE = "batching_params.pbtxt"


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's ``BatchingParameters`` (defaults: its ``BasicBatchScheduler`` options)."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"batching parameter {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")
        sizes = list(self.allowed_batch_sizes)
        if sizes:
            if sizes != sorted(set(sizes)) or sizes[0] < 1:
                raise ValueError(f"allowed_batch_sizes must be positive and strictly increasing, got {sizes}")
            if sizes[-1] != self.max_batch_size:
                raise ValueError(
                    f"the last allowed_batch_sizes entry ({sizes[-1]}) must equal max_batch_size "
                    f"({self.max_batch_size})"
                )
        if self.pad_variable_length_inputs:
            raise ValueError("pad_variable_length_inputs is not supported: atl signatures have fixed-size rows")

    def padded_size(self, rows: int) -> int:
        """The batch size a batch of ``rows`` rows is run at (next allowed size, or ``rows``)."""
        for size in self.allowed_batch_sizes:
            if size >= rows:
                return size
        return rows


def _batching_parameters_class():
    fdp = descriptor_pb2.FileDescriptorProto(
        name="atl_serving/batching_parameters.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = fdp.message_type.add(name="BatchingParameters")
    F = descriptor_pb2.FieldDescriptorProto
    for name, number, type_name in [
        ("max_batch_size", 1, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, ".google.protobuf.StringValue"),
        ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue"),
        ("max_execution_batch_size", 9, ".google.protobuf.Int64Value"),
    ]:
        msg.field.add(name=name, number=number, type=F.TYPE_MESSAGE, type_name=type_name, label=F.LABEL_OPTIONAL)
    msg.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    msg.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def parse_batching_parameters(text: str) -> BatchingParameters:
    """Parse a text-format ``BatchingParameters`` (``--batching_parameters_file``).

    Example: ``max_batch_size { value: 32 } batch_timeout_micros { value: 2000 }``.
    """
    proto = _batching_parameters_class()()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as err:
        raise ValueError(f"invalid batching parameters (BatchingParameters text format): {err}") from err
    if proto.HasField("enable_large_batch_splitting") and proto.enable_large_batch_splitting.value:
        raise ValueError(
            "enable_large_batch_splitting is not supported; requests larger than max_batch_size are "
            "refused (limit them with --max_batch_size)"
        )
    kwargs: dict[str, Any] = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        if proto.HasField(name):
            kwargs[name] = int(getattr(proto, name).value)
    kwargs["allowed_batch_sizes"] = tuple(int(s) for s in proto.allowed_batch_sizes)
    kwargs["pad_variable_length_inputs"] = bool(proto.pad_variable_length_inputs)
    return BatchingParameters(**kwargs)


def load_batching_parameters(path: str | os.PathLike) -> BatchingParameters:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batching parameters file {path} does not exist")
    return parse_batching_parameters(path.read_text())


# --------------------------------------------------------------------------- the scheduler


class _Task:
    __slots__ = ("arrays", "rows", "enqueued", "done", "outputs", "error")

    def __init__(self, arrays: Mapping[str, np.ndarray], rows: int):
        self.arrays = arrays
        self.rows = rows
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None


class _Queue:
    """Batches of one (version, signature, unbatched inputs); the last batch is the open one."""

    def __init__(self, key: tuple, signature: SignatureInfo, params: BatchingParameters):
        self.key = key
        self.signature = signature
        self.params = params
        self.batches: collections.deque[list[_Task]] = collections.deque()
        self.rows: collections.deque[int] = collections.deque()

    def ready(self, now: float) -> bool:
        if not self.batches:
            return False
        if len(self.batches) > 1 or self.rows[0] >= self.params.max_batch_size:
            return True  # closed or full
        return now - self.batches[0][0].enqueued >= self.params.batch_timeout_micros / 1e6

    def deadline(self) -> float:
        return self.batches[0][0].enqueued + self.params.batch_timeout_micros / 1e6


RunFn = Callable[[SignatureInfo, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class BatchScheduler:
    """Shared batch scheduler: per-(version, signature) queues served by one thread pool.

    ``run(loaded, signature, arrays)`` blocks until the request's rows come back. It runs
    the request unbatched when the signature has no batched input. ``params_for(loaded)``
    returns the parameters of a version (per-model files), default ``params``.
    """

    def __init__(
        self,
        params: BatchingParameters,
        run_signature: RunFn,
        *,
        params_for: Callable[[LoadedVersion], BatchingParameters] | None = None,
    ):
        self.params = params
        self._run_signature = run_signature
        self._params_for = params_for or (lambda loaded: params)
        self._cond = threading.Condition()
        self._queues: dict[tuple, _Queue] = {}
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(params.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    # -- request side
    def run(self, loaded: LoadedVersion, signature: SignatureInfo, arrays: Mapping[str, np.ndarray]):
        batched = [k for k, spec in signature.inputs.items() if spec_dims(spec)[1]]
        if not batched:
            return self._run_signature(signature, arrays)
        params = self._params_for(loaded)
        rows = int(arrays[batched[0]].shape[0])
        if rows > params.max_batch_size:
            raise invalid_argument(
                f"batch size {rows} is larger than the batching max_batch_size {params.max_batch_size}; "
                "split the request"
            )
        fixed = tuple(
            (k, arrays[k].dtype.str, arrays[k].shape, arrays[k].tobytes())
            for k in sorted(arrays) if k not in batched
        )
        key = (id(loaded), signature.name, fixed)
        task = _Task(arrays, rows)
        with self._cond:
            if self._stopped:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(key, signature, params)
            if not queue.batches or queue.rows[-1] + rows > params.max_batch_size:
                if len(queue.batches) >= params.max_enqueued_batches:
                    raise RequestError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the batching queue of model {loaded.name!r} signature {signature.name!r} is full "
                        f"({params.max_enqueued_batches} batches of up to {params.max_batch_size} rows; "
                        "max_enqueued_batches); retry later",
                    )
                queue.batches.append([])
                queue.rows.append(0)
            queue.batches[-1].append(task)
            queue.rows[-1] += rows
            self._cond.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    # -- thread side
    def _next_batch(self) -> tuple[_Queue, list[_Task]] | None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                ready = [q for q in self._queues.values() if q.ready(now)]
                if ready:
                    queue = min(ready, key=lambda q: q.batches[0][0].enqueued)  # oldest request first
                    tasks = queue.batches.popleft()
                    queue.rows.popleft()
                    if not queue.batches:
                        del self._queues[queue.key]
                    return queue, tasks
                waiting = [q.deadline() for q in self._queues.values() if q.batches]
                self._cond.wait(max(0.0, min(waiting) - now) if waiting else None)
            return None

    def _work(self) -> None:
        while True:
            item = self._next_batch()
            if item is None:
                return
            queue, tasks = item
            try:
                self._process(queue, tasks)
            except BaseException as err:  # never lose a waiting request
                logger.exception("batch failed")
                for task in tasks:
                    if not task.done.is_set():
                        task.error = err
                        task.done.set()

    def _process(self, queue: _Queue, tasks: list[_Task]) -> None:
        signature = queue.signature
        if len(tasks) == 1 and queue.params.padded_size(tasks[0].rows) == tasks[0].rows:
            self._run_one(signature, tasks[0])
            return
        rows = sum(t.rows for t in tasks)
        padded = queue.params.padded_size(rows)
        merged: dict[str, np.ndarray] = {}
        for key, spec in signature.inputs.items():
            first = tasks[0].arrays[key]
            if spec_dims(spec)[1]:
                parts = [t.arrays[key] for t in tasks]
                if padded > rows:
                    parts.append(np.repeat(parts[-1][-1:], padded - rows, axis=0))
                merged[key] = np.concatenate(parts, axis=0)
            else:
                merged[key] = first
        try:
            outputs = self._run_signature(signature, merged)
            bad = [k for k, v in outputs.items() if np.ndim(v) == 0 or np.shape(v)[0] != padded]
            if bad:
                raise RequestError(
                    grpc.StatusCode.INTERNAL,
                    f"signature {signature.name!r} outputs {bad} have no batch dimension of size {padded}; "
                    "they cannot be split back into requests (turn --enable_batching off for this model)",
                )
        except RequestError:
            for task in tasks:  # rerun each request alone: only the bad one fails
                self._run_one(signature, task)
            return
        start = 0
        for task in tasks:
            task.outputs = {k: v[start : start + task.rows] for k, v in outputs.items()}
            start += task.rows
            task.done.set()

    def _run_one(self, signature: SignatureInfo, task: _Task) -> None:
        try:
            task.outputs = dict(self._run_signature(signature, task.arrays))
        except BaseException as err:
            task.error = err
        task.done.set()

    def stop(self) -> None:
        """Finish nothing new: waiting requests answer UNAVAILABLE; threads exit."""
        with self._cond:
            self._stopped = True
            pending = [t for q in self._queues.values() for b in q.batches for t in b]
            self._queues.clear()
            self._cond.notify_all()
        for task in pending:
            task.error = RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            task.done.set()
        for thread in self._threads:
            thread.join(timeout=10)

"""A gRPC model server speaking TensorFlow Serving's API, for atl SavedModel exports.

    python -m serving.server --port 8500 --model_name atl --model_base_path saved_models/atl
    python -m serving.server --port 8500 --model_config_file serving/models.config

Services (official ``tensorflow_serving.apis`` protos, so any TF Serving client works):

- ``tensorflow.serving.PredictionService``: ``Predict``, ``GetModelMetadata``
  (``signature_def``); ``Classify``, ``Regress``, ``MultiInference`` -> UNIMPLEMENTED.
- ``tensorflow.serving.ModelService``: ``GetModelStatus``;
  ``HandleReloadConfigRequest`` -> UNIMPLEMENTED.
- ``grpc.health.v1.Health``: SERVING once every configured model has a version loaded.

Versions: ``<base_path>/<N>/`` integer directories holding a SavedModel. The base paths
are polled every ``--file_system_poll_wait_seconds``; new versions load in the background
and are swapped in atomically. A request holds a reference to the version it runs on, so
nothing in flight fails during a swap, and an old version is only dropped (UNLOADING ->
END) once it is no longer aspired, a newer one is AVAILABLE and its in-flight count is 0.

Library use::

    from serving import ModelServer, ServerConfig, single_model
    server = ModelServer(ServerConfig([single_model("atl", "saved_models/atl")], port=0)).start()
    print(server.port); ...; server.stop(grace=5).wait()
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Iterator, Mapping, Sequence

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.model_config import (
    ServedModel,
    TLSConfig,
    dir_fingerprint,
    list_version_dirs,
    load_model_config_file,
    parse_channel_arguments,
    parse_ssl_config,
    single_model,
)

logger = logging.getLogger("serving.server")

DEFAULT_SIGNATURE = "serving_default"
State = get_model_status_pb2.ModelVersionStatus.State
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
MAX_TENSOR_ELEMENTS = 1 << 31
IMAGE_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}


class RequestError(Exception):
    """A request that cannot be served; becomes a gRPC status with this message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs; the CLI flags map one-to-one onto these fields.

    ``port=0`` binds a free port (read it back from ``ModelServer.port``).
    ``file_system_poll_wait_seconds=0`` loads once at start and never polls.
    ``max_batch_size=0`` disables the batch-size limit.
    """

    models: Sequence[ServedModel]
    host: str = "127.0.0.1"
    port: int = 8500
    file_system_poll_wait_seconds: float = 1.0
    grpc_max_threads: int = 16
    max_batch_size: int = 256
    max_message_size: int = 64 * 1024 * 1024
    channel_arguments: Sequence[tuple[str, int | str]] = ()
    tls: TLSConfig | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("ServerConfig needs at least one model (--model_base_path or --model_config_file)")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.grpc_max_threads < 1:
            raise ValueError(f"grpc_max_threads must be >= 1, got {self.grpc_max_threads}")
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0 (0 = no limit), got {self.max_batch_size}")
        if self.file_system_poll_wait_seconds < 0:
            raise ValueError("file_system_poll_wait_seconds must be >= 0 (0 = load once, no polling)")


# --------------------------------------------------------------------------- loaded versions


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    """A callable signature and its input/output specs (keyword name -> ``tf.TensorSpec``)."""

    name: str
    function: Any
    inputs: Mapping[str, tf.TensorSpec]
    outputs: Mapping[str, tf.TensorSpec]


def signature_info(name: str, function: Any) -> SignatureInfo:
    """Read inputs/outputs from a loaded signature's ``structured_input_signature`` / ``structured_outputs``."""
    args, kwargs = function.structured_input_signature
    if args:
        raise ValueError(f"signature {name!r} takes positional inputs; SavedModel signatures are keyword-only")
    outputs = function.structured_outputs
    if not isinstance(outputs, Mapping):
        raise ValueError(f"signature {name!r} does not return a dict of named outputs")
    return SignatureInfo(name, function, dict(kwargs), dict(outputs))


def read_signature_defs(path: pathlib.Path, tags: str = "serve") -> dict[str, meta_graph_pb2.SignatureDef]:
    """The ``SignatureDef`` map of the meta graph tagged ``tags``, as TF Serving reports it."""
    pb, pbtxt = path / "saved_model.pb", path / "saved_model.pbtxt"
    saved = saved_model_pb2.SavedModel()
    if pb.is_file():
        saved.ParseFromString(pb.read_bytes())
    else:
        text_format.Parse(pbtxt.read_text(), saved)
    for meta_graph in saved.meta_graphs:
        if tags in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise ValueError(f"{path} has no meta graph tagged {tags!r}")


def _import_custom_ops() -> None:
    """ScaNN's ops must be registered before loading a SavedModel whose ``retrieve`` uses them."""
    try:
        import scann  # noqa: F401
    except Exception as err:  # ImportError, or a broken .so
        logger.warning("could not import scann (%s); ScaNN-based signatures will not load", err)


class LoadedVersion:
    """One loaded SavedModel version: its signatures, SignatureDefs, manifest, in-flight count."""

    def __init__(self, name: str, version: int, path: pathlib.Path):
        self.name = name
        self.version = version
        self.path = path
        self.module = tf.saved_model.load(str(path))
        self.signatures = {k: signature_info(k, fn) for k, fn in self.module.signatures.items()}
        self.signature_defs = read_signature_defs(path)
        manifest_path = path / "assets" / "manifest.json"
        self.manifest: dict = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def acquire(self) -> None:
        with self._lock:
            self._in_flight += 1

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1


@dataclasses.dataclass
class _VersionState:
    state: int
    error: str = ""


class ModelManager:
    """Loads, swaps and unloads versions of the configured models; thread-safe.

    ``poll()`` syncs every model with its base path once; ``start()`` polls once
    synchronously, then every ``poll_wait_seconds`` in a daemon thread.
    """

    def __init__(self, models: Sequence[ServedModel], poll_wait_seconds: float = 1.0, on_change=None):
        self.models = {m.name: m for m in models}
        self.poll_wait_seconds = poll_wait_seconds
        self._on_change = on_change
        self._lock = threading.Lock()
        self._served: dict[str, dict[int, LoadedVersion]] = {m.name: {} for m in models}
        self._draining: list[LoadedVersion] = []
        self._states: dict[str, dict[int, _VersionState]] = {m.name: {} for m in models}
        self._failed: dict[tuple[str, int], tuple] = {}
        self._warned_missing: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()

    # -- lifecycle
    def start(self) -> "ModelManager":
        _import_custom_ops()
        self.poll()
        if self.poll_wait_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll()
            except Exception:  # never let the poller die
                logger.exception("model poll failed; retrying in %ss", self.poll_wait_seconds)

    # -- syncing with disk
    def poll(self) -> None:
        with self._poll_lock:
            for model in self.models.values():
                if self._stop.is_set():
                    return
                self._sync(model)
            self._finish_draining()
        if self._on_change is not None:
            self._on_change()

    def _set_state(self, name: str, version: int, state: int, error: str = "") -> None:
        with self._lock:
            self._states[name][version] = _VersionState(state, error)

    def _sync(self, model: ServedModel) -> None:
        on_disk = list_version_dirs(model.base_path)
        if not on_disk and model.name not in self._warned_missing:
            self._warned_missing.add(model.name)
            logger.warning(
                "model %r: no version directories <int>/ with a saved_model.pb under %s yet",
                model.name, model.base_path,
            )
        aspired = model.version_policy.select(on_disk)
        for version in aspired:  # highest first: the newest version becomes available first
            if version in self._served[model.name] or self._stop.is_set():
                continue
            path = on_disk[version]
            fingerprint = dir_fingerprint(path)
            if self._failed.get((model.name, version)) == fingerprint:
                continue  # failed before and unchanged since: skip until it changes
            self._set_state(model.name, version, State.LOADING)
            logger.info("model %r: loading version %d from %s", model.name, version, path)
            try:
                loaded = LoadedVersion(model.name, version, path)
            except Exception as err:
                self._failed[(model.name, version)] = fingerprint
                message = f"failed to load version {version} from {path}: {type(err).__name__}: {err}"
                logger.error("model %r: %s", model.name, message)
                self._set_state(model.name, version, State.END, message)
                continue
            self._failed.pop((model.name, version), None)
            with self._lock:  # copy-on-write swap: readers see either the old or the new map
                served = dict(self._served[model.name])
                served[version] = loaded
                self._served[model.name] = served
                self._states[model.name][version] = _VersionState(State.AVAILABLE)
            logger.info("model %r: version %d AVAILABLE", model.name, version)
        # Availability preserving: unload versions that are no longer aspired only once an
        # aspired version is serving (or the old version's directory is gone).
        with self._lock:
            served = self._served[model.name]
            aspired_available = any(v in served for v in aspired)
            drop = [
                v for v in served
                if v not in aspired and (aspired_available or v not in on_disk)
            ]
            if drop:
                self._served[model.name] = {v: lv for v, lv in served.items() if v not in drop}
                for v in drop:
                    self._draining.append(served[v])
                    self._states[model.name][v] = _VersionState(State.UNLOADING)
        for v in drop:
            logger.info("model %r: unloading version %d", model.name, v)

    def _finish_draining(self) -> None:
        with self._lock:
            still = []
            for lv in self._draining:
                if lv.in_flight > 0:
                    still.append(lv)
                else:
                    self._states[lv.name][lv.version] = _VersionState(State.END)
            self._draining = still

    # -- queries
    def is_ready(self) -> bool:
        """True when every model has at least one AVAILABLE version."""
        with self._lock:
            return all(self._served[name] for name in self.models)

    def has_versions(self, name: str) -> bool:
        with self._lock:
            return bool(self._served.get(name))

    def _resolve(self, name: str, version: int | None, label: str) -> LoadedVersion:
        if not name:
            raise _invalid("model_spec.name is empty; name the model to query")
        if name not in self.models:
            raise _not_found(f"model {name!r} is not served; served models: {sorted(self.models)}")
        served = self._served[name]
        if label:
            labels = self.models[name].version_labels
            if label not in labels:
                raise _not_found(
                    f"model {name!r} has no version label {label!r}; labels: {sorted(labels) or 'none'} "
                    "(set version_labels in models.config, or ask for model_spec.version)"
                )
            version = labels[label]
        if version is None:
            if not served:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, f"model {name!r} has no version loaded yet; retry later"
                )
            return served[max(served)]
        if version not in served:
            state = self._states[name].get(version)
            extra = f" (state {State.Name(state.state)})" if state else ""
            raise _not_found(
                f"version {version} of model {name!r} is not available{extra}; "
                f"available versions: {sorted(served)}"
            )
        return served[version]

    @contextlib.contextmanager
    def acquire(self, name: str, version: int | None = None, label: str = "") -> Iterator[LoadedVersion]:
        """Hold a version for the duration of a request; it is never dropped while held."""
        with self._lock:
            loaded = self._resolve(name, version, label)
            loaded.acquire()
        try:
            yield loaded
        finally:
            loaded.release()
            if loaded.in_flight == 0 and any(d is loaded for d in self._draining):
                self._finish_draining()

    def version_states(self, name: str) -> dict[int, tuple[int, str]]:
        """``{version: (ModelVersionStatus.State, error message)}`` of everything seen so far."""
        if name not in self.models:
            raise _not_found(f"model {name!r} is not served; served models: {sorted(self.models)}")
        with self._lock:
            return {v: (s.state, s.error) for v, s in self._states[name].items()}


# --------------------------------------------------------------------------- request handling


def _proto_shape(proto: tensor_pb2.TensorProto, key: str) -> tuple[int, ...]:
    if proto.tensor_shape.unknown_rank:
        raise _invalid(f"inputs[{key!r}] has an unknown rank; set tensor_shape (use tf.make_tensor_proto)")
    dims = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in dims):
        raise _invalid(f"inputs[{key!r}] has a negative dimension in tensor_shape {list(dims)}")
    return dims


def _check_value_count(proto: tensor_pb2.TensorProto, key: str, dims: tuple[int, ...]) -> None:
    """The values a TensorProto holds must fill its shape (``make_ndarray`` would silently pad)."""
    n = int(np.prod(dims, dtype=np.int64))
    if proto.tensor_content:
        itemsize = tf.dtypes.as_dtype(proto.dtype).size
        if len(proto.tensor_content) != n * itemsize:
            raise _invalid(
                f"inputs[{key!r}] has {len(proto.tensor_content)} bytes of tensor_content but its shape "
                f"{list(dims)} needs {n * itemsize}; build it with tf.make_tensor_proto"
            )
        return
    count = 0
    for field, values in proto.ListFields():
        if field.name.endswith("_val") and field.name not in ("resource_handle_val", "variant_val"):
            count += len(values) // (2 if "complex" in field.name else 1)
    is_string = proto.dtype == types_pb2.DT_STRING
    if count == n or (count == 1 and n > 0) or (count == 0 and not is_string):
        return  # exact, a broadcast scalar, or all zeros (TensorFlow's own encodings)
    raise _invalid(
        f"inputs[{key!r}] holds {count} values but its shape {list(dims)} needs {n}; "
        "build it with tf.make_tensor_proto"
    )


def _check_image_bytes(key: str, values: np.ndarray) -> None:
    for i, data in enumerate(values.reshape(-1)):
        data = bytes(data)
        if not any(data.startswith(magic) for magic in IMAGE_MAGIC):
            raise _invalid(
                f"inputs[{key!r}][{i}] is not an encoded JPEG, PNG, GIF or BMP image "
                f"({len(data)} bytes starting {data[:8]!r}); send the encoded file bytes"
            )


def prepare_inputs(
    signature: SignatureInfo,
    inputs: Mapping[str, tensor_pb2.TensorProto],
    *,
    max_batch_size: int = 0,
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, tf.Tensor]:
    """Validate a Predict request's ``inputs`` against a signature; TensorProtos -> tensors.

    Generic checks (any signature): exact input names, dtype, rank and static dims,
    one consistent batch size ``B`` over the batched inputs, ``0 < B <= max_batch_size``.
    atl checks: a ``tf.string`` input named ``images`` must hold encoded images; a scalar
    integer input named ``k`` must be in ``[1, manifest["gallery_size"]]``.
    Raises ``RequestError`` (INVALID_ARGUMENT) naming what was wrong.
    """
    expected, given = set(signature.inputs), set(inputs)
    if expected != given:
        parts = []
        if expected - given:
            parts.append(f"missing inputs {sorted(expected - given)}")
        if given - expected:
            parts.append(f"unexpected inputs {sorted(given - expected)}")
        raise _invalid(
            f"signature {signature.name!r}: {' and '.join(parts)}; it takes exactly {sorted(expected)}"
        )
    batch_sizes: dict[str, int] = {}
    for key, spec in signature.inputs.items():
        proto = inputs[key]
        if proto.dtype != spec.dtype.as_datatype_enum:
            got = types_pb2.DataType.Name(proto.dtype) if proto.dtype in types_pb2.DataType.values() else proto.dtype
            raise _invalid(
                f"inputs[{key!r}] has dtype {got}, signature {signature.name!r} expects "
                f"{types_pb2.DataType.Name(spec.dtype.as_datatype_enum)} ({spec.dtype.name})"
            )
        dims = _proto_shape(proto, key)
        if spec.shape.rank is not None:
            if len(dims) != spec.shape.rank:
                raise _invalid(
                    f"inputs[{key!r}] has rank {len(dims)} (shape {list(dims)}), signature "
                    f"{signature.name!r} expects rank {spec.shape.rank} (shape {spec.shape})"
                )
            if not spec.shape.is_compatible_with(dims):
                raise _invalid(
                    f"inputs[{key!r}] has shape {list(dims)}, signature {signature.name!r} expects "
                    f"{spec.shape} (None = any size)"
                )
            if spec.shape.rank >= 1 and spec.shape[0] is None:
                batch_sizes[key] = dims[0]
        if int(np.prod(dims, dtype=np.int64)) > MAX_TENSOR_ELEMENTS:
            raise _invalid(f"inputs[{key!r}] with shape {list(dims)} is too large")
        _check_value_count(proto, key, dims)
    if len(set(batch_sizes.values())) > 1:
        raise _invalid(f"batched inputs disagree on the batch size: {batch_sizes}")
    if batch_sizes:
        batch = next(iter(batch_sizes.values()))
        if batch == 0:
            raise _invalid(f"empty batch: inputs {sorted(batch_sizes)} have batch size 0; send at least one example")
        if max_batch_size and batch > max_batch_size:
            raise _invalid(
                f"batch size {batch} exceeds --max_batch_size={max_batch_size}; split the request"
            )
    tensors: dict[str, tf.Tensor] = {}
    for key, spec in signature.inputs.items():
        try:
            array = tf.make_ndarray(inputs[key])
        except Exception as err:
            raise _invalid(f"inputs[{key!r}] is not a valid TensorProto: {err}") from err
        if key == "images" and spec.dtype == tf.string:
            _check_image_bytes(key, array)
        if key == "k" and spec.dtype.is_integer and spec.shape.rank == 0:
            k = int(array)
            gallery_size = (manifest or {}).get("gallery_size")
            if k <= 0 or (gallery_size is not None and k > int(gallery_size)):
                upper = f" and <= gallery_size {gallery_size}" if gallery_size is not None else ""
                raise _invalid(f"inputs['k'] = {k} is out of range; k must be >= 1{upper}")
        tensors[key] = tf.convert_to_tensor(array, dtype=spec.dtype)
    return tensors


def run_signature(signature: SignatureInfo, tensors: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Call a signature, mapping TensorFlow errors onto gRPC status codes."""
    try:
        return signature.function(**tensors)
    except tf.errors.OpError as err:
        code = grpc.StatusCode.INVALID_ARGUMENT
        for status in grpc.StatusCode:
            if status.value[0] == err.error_code:
                code = status
        lines = (err.message or str(err)).strip().splitlines()
        first_line = lines[0] if lines else ""
        raise RequestError(code, f"signature {signature.name!r} failed: {type(err).__name__}: {first_line}") from err


def _fail(context: grpc.ServicerContext, err: RequestError) -> None:
    context.abort(err.code, err.message)


def _rpc(method):
    """Count in-flight RPCs; turn RequestError / unexpected exceptions into gRPC statuses."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        self._server_state.enter()
        try:
            return method(self, request, context)
        except RequestError as err:
            logger.debug("%s rejected: %s", method.__name__, err.message)
            _fail(context, err)
        except Exception as err:
            if context.code() is not None:
                raise  # context.abort() already set the status
            logger.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {type(err).__name__}: {err}")
        finally:
            self._server_state.exit()

    return wrapper


class _ServerState:
    def __init__(self):
        self._lock = threading.Lock()
        self.in_flight = 0

    def enter(self):
        with self._lock:
            self.in_flight += 1

    def exit(self):
        with self._lock:
            self.in_flight -= 1


def _version_arg(model_spec) -> int | None:
    return int(model_spec.version.value) if model_spec.HasField("version") else None


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService`` over a :class:`ModelManager`."""

    def __init__(self, manager: ModelManager, max_batch_size: int, server_state: _ServerState):
        self._manager = manager
        self._max_batch_size = max_batch_size
        self._server_state = server_state

    @_rpc
    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        with self._manager.acquire(spec.name, _version_arg(spec), spec.version_label) as loaded:
            name = spec.signature_name or DEFAULT_SIGNATURE
            signature = loaded.signatures.get(name)
            if signature is None:  # TF Serving answers FAILED_PRECONDITION here, not NOT_FOUND
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model {loaded.name!r} version {loaded.version} has no signature {name!r}; "
                    f"signatures: {sorted(loaded.signatures)}"
                )
            unknown = set(request.output_filter) - set(signature.outputs)
            if unknown:
                raise _invalid(
                    f"output_filter names {sorted(unknown)} that signature {name!r} does not have; "
                    f"outputs: {sorted(signature.outputs)}"
                )
            tensors = prepare_inputs(
                signature, request.inputs, max_batch_size=self._max_batch_size, manifest=loaded.manifest
            )
            outputs = run_signature(signature, tensors)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = loaded.name
            response.model_spec.version.value = loaded.version
            response.model_spec.signature_name = name
            for key in request.output_filter or outputs:
                response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key].numpy()))
            return response

    @_rpc
    def GetModelMetadata(self, request, context) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if not fields:
            raise _invalid("metadata_field is empty; ask for metadata_field: 'signature_def'")
        unsupported = [f for f in fields if f != "signature_def"]
        if unsupported:
            raise _invalid(f"metadata_field {unsupported} not supported; only 'signature_def' is")
        spec = request.model_spec
        with self._manager.acquire(spec.name, _version_arg(spec), spec.version_label) as loaded:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = loaded.name
            response.model_spec.version.value = loaded.version
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for key, sig_def in loaded.signature_defs.items():
                sig_map.signature_def[key].CopyFrom(sig_def)
            response.metadata["signature_def"].Pack(sig_map)
            return response

    def _unimplemented(self, method: str, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not implemented by this server: atl models export Predict signatures "
            "(serving_default, embed_pixels, retrieve, retrieve_exact); call Predict",
        )

    def Classify(self, request, context):
        self._unimplemented("Classify", context)

    def Regress(self, request, context):
        self._unimplemented("Regress", context)

    def MultiInference(self, request, context):
        self._unimplemented("MultiInference", context)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: version status."""

    def __init__(self, manager: ModelManager, server_state: _ServerState):
        self._manager = manager
        self._server_state = server_state

    @_rpc
    def GetModelStatus(self, request, context) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        if not spec.name:
            raise _invalid("model_spec.name is empty; name the model to query")
        states = self._manager.version_states(spec.name)
        version = _version_arg(spec)
        if spec.version_label:
            labels = self._manager.models[spec.name].version_labels
            if spec.version_label not in labels:
                raise _not_found(f"model {spec.name!r} has no version label {spec.version_label!r}")
            version = labels[spec.version_label]
        if version is not None:
            if version not in states:
                raise _not_found(f"model {spec.name!r} has no version {version}; known: {sorted(states)}")
            states = {version: states[version]}
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in sorted(states, reverse=True):
            state, error = states[v]
            status = response.model_version_status.add(version=v, state=state)
            if error:
                status.status.error_code = grpc.StatusCode.UNKNOWN.value[0]
                status.status.error_message = error
        return response

    def HandleReloadConfigRequest(self, request, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "HandleReloadConfigRequest is not implemented; restart the server with a new "
            "--model_config_file (new versions of configured models are picked up automatically)",
        )


# --------------------------------------------------------------------------- the server


class ModelServer:
    """gRPC server hosting PredictionService, ModelService and Health over a ModelManager."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self._state = _ServerState()
        self.health = health.HealthServicer()
        self.manager = ModelManager(
            config.models, config.file_system_poll_wait_seconds, on_change=self._update_health
        )
        self._server: grpc.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when ``config.port == 0``)."""
        if self._port is None:
            raise RuntimeError("ModelServer.port is only known after start()")
        return self._port

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def in_flight(self) -> int:
        """RPCs currently being handled."""
        return self._state.in_flight

    def _update_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        ready = self.manager.is_ready()
        for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
            self.health.set(service, serving if ready else not_serving)
        for name in self.manager.models:
            self.health.set(name, serving if self.manager.has_versions(name) else not_serving)

    def start(self) -> "ModelServer":
        """Load the initial versions (blocking), bind, start serving and polling."""
        size = self.config.max_message_size
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
        options += list(self.config.channel_arguments)
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=self.config.grpc_max_threads, thread_name_prefix="grpc"
            ),
            options=options,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.manager, self.config.max_batch_size, self._state), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.manager, self._state), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = self.config.host
        address = f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"
        try:
            if self.config.tls is not None:
                tls = self.config.tls
                creds = grpc.ssl_server_credentials(
                    [(tls.server_key, tls.server_cert)],
                    root_certificates=tls.custom_ca,
                    require_client_auth=tls.client_verify,
                )
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"could not bind {address}: {err}; is the port in use?") from err
        if not port:
            raise OSError(f"could not bind {address}; is the port in use?")
        self._port = port
        self._update_health()
        self.manager.start()
        server.start()
        self._server = server
        logger.info("serving %s on %s (tls=%s)", sorted(self.manager.models), self.address, self.config.tls is not None)
        return self

    def stop(self, grace: float | None = 5.0) -> threading.Event:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, stop polling.

        Returns an event set once the server has fully stopped.
        """
        self.health.enter_graceful_shutdown()
        self.manager.stop()
        if self._server is None:
            done = threading.Event()
            done.set()
            return done
        return self._server.stop(grace)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True if it stopped."""
        if self._server is None:
            return True
        timed_out = self._server.wait_for_termination(timeout)
        return not timed_out

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0).wait()


# --------------------------------------------------------------------------- CLI


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="gRPC model server speaking TF Serving's PredictionService/ModelService API.",
    )
    p.add_argument("--port", type=int, default=8500, help="gRPC port (0 = pick a free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    p.add_argument("--model_name", default="default", help="name of the single model to serve")
    p.add_argument("--model_base_path", default="", help="dir holding <version>/ SavedModel dirs")
    p.add_argument("--model_config_file", default="", help="TF Serving models.config (text ModelServerConfig)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                   help="seconds between scans for new versions (0 = load once)")
    p.add_argument("--grpc_max_threads", type=int, default=16, help="gRPC worker threads")
    p.add_argument("--max_batch_size", type=int, default=256, help="largest batch per request (0 = no limit)")
    p.add_argument("--max_message_size", type=int, default=64 * 1024 * 1024,
                   help="largest gRPC message in bytes, both directions")
    p.add_argument("--grpc_channel_arguments", default="",
                   help="comma-separated key=value gRPC channel arguments")
    p.add_argument("--ssl_config_file", default="", help="TF Serving SSLConfig text file (PEM contents)")
    p.add_argument("--ssl_cert", default="", help="server certificate PEM file (alternative to --ssl_config_file)")
    p.add_argument("--ssl_key", default="", help="server private key PEM file")
    p.add_argument("--ssl_ca", default="", help="CA PEM file; with it, clients must present a certificate")
    p.add_argument("--shutdown_grace_seconds", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Flags -> ServerConfig; raises ValueError / FileNotFoundError on inconsistent flags."""
    if args.model_config_file and args.model_base_path:
        raise ValueError("use either --model_config_file or --model_base_path, not both")
    if args.model_config_file:
        models = load_model_config_file(args.model_config_file)
    elif args.model_base_path:
        models = [single_model(args.model_name, args.model_base_path)]
    else:
        raise ValueError("nothing to serve: pass --model_base_path (with --model_name) or --model_config_file")
    tls = None
    if args.ssl_config_file:
        tls = parse_ssl_config(pathlib.Path(args.ssl_config_file).read_text())
    elif args.ssl_cert or args.ssl_key:
        if not (args.ssl_cert and args.ssl_key):
            raise ValueError("TLS needs both --ssl_cert and --ssl_key")
        ca = pathlib.Path(args.ssl_ca).read_bytes() if args.ssl_ca else None
        tls = TLSConfig(
            pathlib.Path(args.ssl_key).read_bytes(), pathlib.Path(args.ssl_cert).read_bytes(),
            custom_ca=ca, client_verify=ca is not None,
        )
    return ServerConfig(
        models=models,
        host=args.host,
        port=args.port,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        grpc_max_threads=args.grpc_max_threads,
        max_batch_size=args.max_batch_size,
        max_message_size=args.max_message_size,
        channel_arguments=parse_channel_arguments(args.grpc_channel_arguments),
        tls=tls,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    server = ModelServer(config)
    stop = threading.Event()
    received: list[int] = []

    def _on_signal(signum, frame):
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server.start()
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"ModelServer listening on {server.address} models={sorted(server.manager.models)}", flush=True)
    while not stop.wait(0.5):
        pass
    name = signal.Signals(received[0]).name if received else "signal"
    logger.info("%s received: draining in-flight requests (grace %.1fs)", name, args.shutdown_grace_seconds)
    server.stop(args.shutdown_grace_seconds).wait(args.shutdown_grace_seconds + 5)
    logger.info("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

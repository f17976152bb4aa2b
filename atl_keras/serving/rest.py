"""TF Serving's REST API (``--rest_api_port``) on Tornado, over the same manager as gRPC.

    GET  /v1/models/NAME[/versions/N|/labels/L]              status (GetModelStatus)
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata     metadata (GetModelMetadata)
    POST /v1/models/NAME[/versions/N|/labels/L]:predict      Predict

Predict bodies take the row format ``{"instances": [...]}`` (answer ``{"predictions":
[...]}``) or the columnar format ``{"inputs": ...}`` (answer ``{"outputs": ...}``),
``"signature_name"`` optional; binary strings travel as ``{"b64": "..."}``; outputs whose
name ends in ``_bytes`` are written that way, other strings as UTF-8. Errors answer
``{"error": message}`` with TF Serving's HTTP status for the gRPC code (INVALID_ARGUMENT
and FAILED_PRECONDITION 400, NOT_FOUND 404, UNAVAILABLE 503, UNIMPLEMENTED 501, ...).
Validation and execution are shared with gRPC (:mod:`atl_keras.serving.requests`), so
both answer the same request the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import json
import logging
import threading
from typing import Any, Callable, Mapping

import grpc
import numpy as np
import tensorflow as tf
import tornado.httpserver
import tornado.netutil
import tornado.web
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from atl_keras.serving.errors import RequestError, invalid_argument
from atl_keras.serving.loader import LoadedVersion, SignatureInfo
from atl_keras.serving.manager import ModelManager
from atl_keras.serving.requests import DEFAULT_SIGNATURE, check_arrays, find_signature, run_signature

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State

#: TF Serving's mapping of status codes onto HTTP (model_servers/http_server.cc).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

RunFn = Callable[[LoadedVersion, SignatureInfo, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]

MODEL_PATH = r"/v1/models/([^/:]+)(?:/versions/([0-9]+)|/labels/([^/:]+))?"


# --------------------------------------------------------------------------- JSON <-> arrays


def _string_leaves(value: Any, flat: list[bytes], where: str) -> tuple[int, ...]:
    if isinstance(value, list):
        shapes = [_string_leaves(v, flat, where) for v in value]
        if any(s != shapes[0] for s in shapes):
            raise invalid_argument(f"{where} is a ragged list; every row must have the same shape")
        return (len(value),) + (shapes[0] if shapes else ())
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise invalid_argument(f'{where}: binary values are written {{"b64": "<base64>"}}, got {sorted(value)}')
        try:
            flat.append(base64.b64decode(value["b64"], validate=True))
        except (binascii.Error, ValueError) as err:
            raise invalid_argument(f"{where} holds invalid base64: {err}") from err
    elif isinstance(value, str):
        flat.append(value.encode("utf-8"))
    else:
        raise invalid_argument(f"{where} holds {type(value).__name__} {value!r} where a string is expected")
    return ()


def array_from_json(value: Any, dtype: tf.DType, where: str) -> np.ndarray:
    """A JSON tensor (nested lists; ``{"b64": ...}`` for binary strings) -> numpy array of ``dtype``."""
    if dtype == tf.string:
        flat: list[bytes] = []
        shape = _string_leaves(value, flat, where)
        if len(shape) > 64:
            raise invalid_argument(f"{where} nests lists {len(shape)} deep; a tensor has at most 64 dimensions")
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    if not dtype.is_numpy_compatible:
        raise invalid_argument(f"{where}: dtype {dtype.name} cannot be sent as JSON")
    _check_json_kind(value, dtype, where)
    try:
        return np.array(value, dtype=dtype.as_numpy_dtype)
    except (ValueError, TypeError, OverflowError) as err:
        raise invalid_argument(
            f"{where} is not a non-ragged list of numbers of dtype {dtype.name}: {err}"
        ) from err


#: JSON value kinds (numpy's inference) each tensor dtype accepts, as TF Serving's JSON parser
#: does: integers for integer tensors (not 5.7, "5" or true), numbers for floats, true/false for bools.
_JSON_KINDS = {"i": "iu", "u": "iu", "f": "iuf", "c": "iufc", "b": "b"}


def _check_json_kind(value: Any, dtype: tf.DType, where: str) -> None:
    target = np.dtype(dtype.as_numpy_dtype).kind
    try:
        inferred = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as err:
        raise invalid_argument(f"{where} is not a non-ragged list of numbers of dtype {dtype.name}: {err}") from err
    if inferred.size and inferred.dtype.kind not in _JSON_KINDS.get(target, target):
        given = {"f": "non-integer numbers", "b": "true/false", "U": "strings", "i": "integers"}.get(
            inferred.dtype.kind, "mixed or null values")
        needs = {"i": "integers", "u": "integers", "b": "true/false"}.get(target, "numbers")
        raise invalid_argument(f"{where} holds {given} where dtype {dtype.name} needs {needs}")


def _is_named(value: Any) -> bool:
    return isinstance(value, dict) and set(value) != {"b64"}


def arrays_from_json_request(signature: SignatureInfo, body: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
    """``{"instances": ...}`` or ``{"inputs": ...}`` -> (arrays by input name, row format?)."""
    has_rows, has_columns = "instances" in body, "inputs" in body
    if has_rows == has_columns:
        raise invalid_argument('the request body needs exactly one of "instances" (row format) or "inputs" (columnar)')
    specs = signature.inputs
    single = next(iter(specs)) if len(specs) == 1 else None
    if has_columns:
        inputs = body["inputs"]
        if _is_named(inputs):
            named = inputs
        elif single is not None:
            named = {single: inputs}
        else:
            raise invalid_argument(
                f'signature {signature.name!r} takes inputs {sorted(specs)}: send "inputs" as an object by name'
            )
        unknown = set(named) - set(specs)
        arrays = {k: array_from_json(v, specs[k].dtype, f"inputs[{k!r}]") for k, v in named.items() if k in specs}
        arrays.update({k: np.zeros(0) for k in unknown})  # reported by check_arrays
        return arrays, False
    instances = body["instances"]
    if not isinstance(instances, list):
        raise invalid_argument('"instances" must be a list (one entry per example)')
    if instances and all(_is_named(i) for i in instances):
        names = set(instances[0])
        for n, instance in enumerate(instances):
            if set(instance) != names:
                raise invalid_argument(
                    f"instances[{n}] has inputs {sorted(instance)}, instances[0] has {sorted(names)}; "
                    "every instance must name the same inputs (use the columnar \"inputs\" format otherwise)"
                )
        arrays = {
            k: array_from_json([i[k] for i in instances], specs[k].dtype, f"instances[*][{k!r}]")
            for k in names if k in specs
        }
        arrays.update({k: np.zeros(0) for k in names - set(specs)})
        return arrays, True
    if single is None:
        raise invalid_argument(
            f"signature {signature.name!r} takes inputs {sorted(specs)}: each instance must be an object by name"
        )
    return {single: array_from_json(instances, specs[single].dtype, "instances")}, True


def _json_leaves(value: Any, binary: bool) -> Any:
    if isinstance(value, list):
        return [_json_leaves(v, binary) for v in value]
    if isinstance(value, bytes):
        if binary:
            return {"b64": base64.b64encode(value).decode("ascii")}
        return value.decode("utf-8", errors="replace")
    return value


def json_value(name: str, array: np.ndarray) -> Any:
    """An output array as JSON: numbers, UTF-8 strings, ``{"b64": ...}`` for ``*_bytes`` outputs."""
    if array.dtype == object or array.dtype.kind == "S":
        return _json_leaves(array.tolist(), name.endswith("_bytes"))
    return array.tolist()


def json_response(outputs: Mapping[str, np.ndarray], rows: bool) -> dict[str, Any]:
    """Outputs as TF Serving writes them: ``predictions`` (row format) or ``outputs`` (columnar)."""
    if not rows:
        if len(outputs) == 1:
            ((name, value),) = outputs.items()
            return {"outputs": json_value(name, value)}
        return {"outputs": {k: json_value(k, v) for k, v in outputs.items()}}
    if len(outputs) == 1:
        ((name, value),) = outputs.items()
        return {"predictions": json_value(name, value)}
    sizes = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in outputs.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise invalid_argument(
            f"outputs have different batch sizes {sizes}; they cannot be written in the row format, "
            'send the columnar "inputs" format instead'
        )
    columns = {k: json_value(k, v) for k, v in outputs.items()}
    return {"predictions": [{k: columns[k][i] for k in columns} for i in range(next(iter(sizes.values())))]}


# --------------------------------------------------------------------------- the API


class RestApi:
    """The REST endpoints over a :class:`ModelManager`; blocking calls run in a thread pool."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        run: RunFn | None = None,
        max_batch_size: int = 0,
        max_image_pixels: int = 0,
        threads: int = 16,
    ):
        self.manager = manager
        self._run = run or (lambda loaded, signature, arrays: run_signature(signature, arrays))
        self._max_batch_size = max_batch_size
        self._max_image_pixels = max_image_pixels
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rest")

    @staticmethod
    def _version(version: str | None) -> int | None:
        return int(version) if version else None

    def status(self, name: str, version: str | None, label: str | None) -> dict[str, Any]:
        states = self.manager.status(name, self._version(version), label or "")
        return {
            "model_version_status": [
                {
                    "version": str(v),
                    "state": State.Name(states[v][0]),
                    "status": {"error_code": "UNKNOWN" if states[v][1] else "OK", "error_message": states[v][1]},
                }
                for v in sorted(states, reverse=True)
            ]
        }

    def metadata(self, name: str, version: str | None, label: str | None) -> dict[str, Any]:
        with self.manager.acquire(name, self._version(version), label or "") as loaded:
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for key, sig_def in loaded.signature_defs.items():
                sig_map.signature_def[key].CopyFrom(sig_def)
            return {
                "model_spec": {"name": loaded.name, "signature_name": "", "version": str(loaded.version)},
                "metadata": {"signature_def": json_format.MessageToDict(sig_map, preserving_proto_field_name=True)},
            }

    def predict(self, name: str, version: str | None, label: str | None, body: bytes) -> dict[str, Any]:
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise invalid_argument(f"the request body is not valid JSON: {err}") from err
        except RecursionError:
            raise invalid_argument("the request body nests JSON too deeply (a tensor has at most 64 dimensions)") from None
        if not isinstance(request, dict):
            raise invalid_argument('the request body must be a JSON object {"instances": ...} or {"inputs": ...}')
        signature_name = request.get("signature_name") or DEFAULT_SIGNATURE
        if not isinstance(signature_name, str):
            raise invalid_argument('"signature_name" must be a string')
        with self.manager.acquire(name, self._version(version), label or "") as loaded:
            signature = find_signature(loaded, signature_name)
            try:
                arrays, rows = arrays_from_json_request(signature, request)
            except RecursionError:
                raise invalid_argument("the request nests lists too deeply (a tensor has at most 64 dimensions)") from None
            arrays = check_arrays(
                signature, arrays, max_batch_size=self._max_batch_size,
                max_image_pixels=self._max_image_pixels, manifest=loaded.manifest,
            )
            outputs = self._run(loaded, signature, arrays)
        return json_response(outputs, rows)

    def application(self) -> tornado.web.Application:
        return tornado.web.Application(
            [
                (MODEL_PATH + r"/metadata", _MetadataHandler, {"api": self}),
                (MODEL_PATH + r":(predict|classify|regress)", _PredictHandler, {"api": self}),
                (MODEL_PATH, _StatusHandler, {"api": self}),
            ],
            default_handler_class=_NotFoundHandler,
            default_handler_args={"api": self},
        )


class _Handler(tornado.web.RequestHandler):
    def initialize(self, api: RestApi) -> None:
        self.api = api

    def _send(self, code: int, payload: Mapping[str, Any]) -> None:
        self.set_status(code)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))

    async def _answer(self, fn: Callable[..., dict], *args) -> None:
        loop = asyncio.get_running_loop()
        try:
            payload = await loop.run_in_executor(self.api.executor, fn, *args)
        except RequestError as err:
            self._send(HTTP_STATUS.get(err.code, 500), {"error": err.message})
            return
        except Exception as err:
            logger.exception("REST %s %s failed", self.request.method, self.request.path)
            self._send(500, {"error": f"{type(err).__name__}: {err}"})
            return
        self._send(200, payload)

    def write_error(self, status_code: int, **kwargs) -> None:  # tornado's own errors (405, ...)
        self._send(status_code, {"error": self._reason})


class _StatusHandler(_Handler):
    async def get(self, name, version, label) -> None:
        await self._answer(self.api.status, name, version, label)


class _MetadataHandler(_Handler):
    async def get(self, name, version, label) -> None:
        await self._answer(self.api.metadata, name, version, label)


class _PredictHandler(_Handler):
    async def post(self, name, version, label, verb) -> None:
        if verb != "predict":
            self._send(501, {"error": f"{verb} is not implemented by this server: atl models export Predict "
                                      "signatures; POST ...:predict"})
            return
        await self._answer(self.api.predict, name, version, label, self.request.body)


class _NotFoundHandler(_Handler):
    def prepare(self) -> None:
        self._send(404, {"error": f"Malformed request: {self.request.method} {self.request.path}; "
                                  "see /v1/models/NAME[/versions/N|/labels/L][/metadata|:predict]"})


class RestServer:
    """Runs a :class:`RestApi` on its own event-loop thread; binds in :meth:`start`."""

    def __init__(self, api: RestApi, host: str = "127.0.0.1", port: int = 0, max_body_size: int = 64 << 20):
        self.api = api
        self.host = host
        self._requested_port = port
        self._max_body_size = max_body_size
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> "RestServer":
        try:
            sockets = tornado.netutil.bind_sockets(self._requested_port, address=self.host, reuse_port=False)
        except OSError as err:
            raise OSError(f"could not bind the REST port {self.host}:{self._requested_port}: {err}") from err
        self.port = sockets[0].getsockname()[1]
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            server = tornado.httpserver.HTTPServer(
                self.api.application(), max_body_size=self._max_body_size, xheaders=False
            )
            server.add_sockets(sockets)
            ready.set()
            await self._stop.wait()
            server.stop()
            await server.close_all_connections()

        def run() -> None:
            try:
                asyncio.run(serve())
            except BaseException as err:  # surface start-up failures to start()
                failure.append(err)
                ready.set()

        self._thread = threading.Thread(target=run, name="rest-api", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise OSError(f"the REST server failed to start: {failure[0]}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self.api.executor.shutdown(wait=False, cancel_futures=True)

"""The gRPC servicers: ``tensorflow.serving.PredictionService`` and ``ModelService``.

Thin: resolve the version through the :class:`ModelManager`, validate and run through
:mod:`atl_keras.serving.requests`, build the response proto.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Callable, Mapping

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from atl_keras.serving.errors import RequestError, invalid_argument
from atl_keras.serving.loader import LoadedVersion, SignatureInfo
from atl_keras.serving.manager import ModelManager
from atl_keras.serving.requests import DEFAULT_SIGNATURE, find_signature, prepare_inputs, run_signature, tensor_proto

logger = logging.getLogger(__name__)

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


class ServerState:
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
    """``tensorflow.serving.PredictionService`` over a :class:`ModelManager`.

    ``run(loaded, signature, arrays) -> outputs`` executes a checked request (the
    batcher when batching is on, :func:`run_signature` otherwise).
    """

    def __init__(
        self,
        manager: ModelManager,
        server_state: ServerState,
        *,
        max_batch_size: int = 0,
        max_image_pixels: int = 0,
        run: Callable[[LoadedVersion, SignatureInfo, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None,
    ):
        self._manager = manager
        self._max_batch_size = max_batch_size
        self._max_image_pixels = max_image_pixels
        self._server_state = server_state
        self._run = run or (lambda loaded, signature, arrays: run_signature(signature, arrays))

    @_rpc
    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        with self._manager.acquire(spec.name, _version_arg(spec), spec.version_label) as loaded:
            name = spec.signature_name or DEFAULT_SIGNATURE
            signature = find_signature(loaded, name)
            unknown = set(request.output_filter) - set(signature.outputs)
            if unknown:
                raise invalid_argument(
                    f"output_filter names {sorted(unknown)} that signature {name!r} does not have; "
                    f"outputs: {sorted(signature.outputs)}"
                )
            arrays = prepare_inputs(
                signature, request.inputs, max_batch_size=self._max_batch_size,
                max_image_pixels=self._max_image_pixels, manifest=loaded.manifest,
            )
            outputs = self._run(loaded, signature, arrays)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = loaded.name
            response.model_spec.version.value = loaded.version
            response.model_spec.signature_name = name
            for key in request.output_filter or outputs:
                tensor_proto(outputs[key], response.outputs[key])
            return response

    @_rpc
    def GetModelMetadata(self, request, context) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if not fields:
            raise invalid_argument("metadata_field is empty; ask for metadata_field: 'signature_def'")
        unsupported = [f for f in fields if f != "signature_def"]
        if unsupported:
            raise invalid_argument(f"metadata_field {unsupported} not supported; only 'signature_def' is")
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

    def __init__(self, manager: ModelManager, server_state: ServerState):
        self._manager = manager
        self._server_state = server_state

    @_rpc
    def GetModelStatus(self, request, context) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        states = self._manager.status(spec.name, _version_arg(spec), spec.version_label)
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


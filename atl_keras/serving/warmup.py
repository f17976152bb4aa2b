"""Warm a loaded version before it is AVAILABLE (TF Serving's SavedModel warmup).

The first call of a signature pays for what is built lazily (kernels, the ScaNN
searcher, memory pools): without warmup the first request after a version becomes
AVAILABLE can take a second on a large index. Before a version is swapped in:

- the records of ``<version>/assets.extra/tf_serving_warmup_requests`` (a TFRecord file
  of ``tensorflow.serving.PredictionLog``, TF Serving's format) are replayed; any that
  fails fails the load, as in TF Serving;
- every signature without such a record gets one synthesized request (a blank JPEG and
  PNG for ``images``, zeros for numeric inputs, ``k = min(10, gallery_size)``); a signature whose
  inputs cannot be synthesized is skipped, and a failure only logs a warning.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from atl_keras.serving.loader import LoadedVersion, SignatureInfo
from atl_keras.serving.requests import DEFAULT_SIGNATURE, find_signature, prepare_inputs

logger = logging.getLogger(__name__)

WARMUP_FILE = pathlib.Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit

RunFn = Callable[[LoadedVersion, SignatureInfo, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def read_warmup_requests(path: str | pathlib.Path) -> list[predict_pb2.PredictRequest]:
    """The Predict requests of a ``tf_serving_warmup_requests`` TFRecord file."""
    requests = []
    for i, record in enumerate(tf.data.TFRecordDataset(str(path))):
        if i >= MAX_WARMUP_RECORDS:
            raise ValueError(f"{path} has more than {MAX_WARMUP_RECORDS} warmup records")
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        kind = log.WhichOneof("log_type")
        if kind != "predict_log":
            raise ValueError(f"{path} record {i} is a {kind}; only predict_log warmup records are served")
        requests.append(log.predict_log.request)
    return requests


def write_warmup_requests(path: str | pathlib.Path, requests: list[predict_pb2.PredictRequest]) -> None:
    """Write Predict requests as TF Serving's warmup file (for exporters and tests)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog()
            log.predict_log.request.CopyFrom(request)
            writer.write(log.SerializeToString())


def synthesized_inputs(signature: SignatureInfo, manifest: Mapping) -> dict[str, np.ndarray] | None:
    """One-row inputs for a signature (None if an input cannot be made up)."""
    h, w, c = (list(manifest.get("image_shape") or [32, 32, 3]) + [3])[:3]
    arrays: dict[str, np.ndarray] = {}
    for key, spec in signature.inputs.items():
        shape = [1 if d is None else d for d in (spec.shape.as_list() if spec.shape.rank is not None else [1])]
        if spec.dtype == tf.string:
            if key != "images":
                return None
            blank = tf.fill([int(h), int(w), 3 if c not in (1, 3) else int(c)], tf.constant(128, tf.uint8))
            encoded = [tf.io.encode_jpeg(blank).numpy(), tf.io.encode_png(blank).numpy()]  # warm both decoders
            if shape == [1]:
                shape = [len(encoded)]
            array = np.empty(int(np.prod(shape)), dtype=object)
            array[:] = [encoded[i % len(encoded)] for i in range(array.size)]
            arrays[key] = array.reshape(shape)
        elif key == "k" and spec.dtype.is_integer and spec.shape.rank == 0:
            arrays[key] = np.array(min(10, int(manifest.get("gallery_size") or 1)), dtype=spec.dtype.as_numpy_dtype)
        elif spec.dtype.is_numpy_compatible:
            arrays[key] = np.zeros(shape, dtype=spec.dtype.as_numpy_dtype)
        else:
            return None
    return arrays


def warm_up(loaded: LoadedVersion, run: RunFn) -> int:
    """Replay the version's warmup records, then warm the other signatures; returns calls made.

    Raises if a warmup record fails (the version must not become AVAILABLE).
    """
    calls = 0
    warmed: set[str] = set()
    record_file = loaded.path / WARMUP_FILE
    if record_file.is_file():
        for i, request in enumerate(read_warmup_requests(record_file)):
            name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            signature = find_signature(loaded, name)
            try:
                arrays = prepare_inputs(signature, request.inputs, manifest=loaded.manifest)
                run(loaded, signature, arrays)
            except Exception as err:
                raise ValueError(f"warmup record {i} ({name}) in {record_file} failed: {err}") from err
            warmed.add(name)
            calls += 1
    for name, signature in loaded.signatures.items():
        if name in warmed:
            continue
        arrays = synthesized_inputs(signature, loaded.manifest)
        if arrays is None:
            logger.info("model %r version %d: no warmup input for signature %r; skipped",
                        loaded.name, loaded.version, name)
            continue
        try:
            run(loaded, signature, arrays)
            calls += 1
        except Exception as err:
            logger.warning("model %r version %d: warmup of signature %r failed (%s); serving it anyway",
                           loaded.name, loaded.version, name, err)
    return calls

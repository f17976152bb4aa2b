"""One loaded SavedModel version (TF Serving's servable + SavedModel loader).

- :func:`read_signature_defs`: the ``SignatureDef`` map TF Serving reports in metadata.
- :class:`SignatureInfo`: a callable signature and its input/output ``tf.TensorSpec``.
- :class:`LoadedVersion`: the module, signatures, manifest and in-flight count of a version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import threading
from typing import Any, Mapping

import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

logger = logging.getLogger(__name__)



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


def import_custom_ops() -> None:
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
        self.identity: tuple = ()  # model_config.version_identity(path) when it was loaded
        self.replaced = False  # set when a reload of the same version number took over
        self.batching_parameters = None  # per-model BatchingParameters, when the server reads them
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



"""Client for atl models behind TF Serving's gRPC API (ours or the official server).

Built only on ``tensorflow_serving.apis`` stubs, so it works unchanged against
``tensorflow_model_server``.

    atl query --server localhost:8500 --model atl --image q.jpg --k 10
    atl query ... --signature retrieve_exact --grid out.png --gallery-dir catalog/

Library::

    from atl_keras.serving.client import connect, retrieve
    stub = connect("localhost:8500")
    for ids, scores in retrieve(stub, "atl", [open("q.jpg", "rb").read()], k=5):
        print(ids, scores)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Mapping, NamedTuple, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from atl_keras.cli.common import DefaultsHelpFormatter

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class _Pair(NamedTuple):
    ids: list[str]
    scores: list[float]


class Neighbors(_Pair):
    """Results of one query, best first: an ``(ids, scores)`` tuple (ids = the catalog's item ids).

    Catalog exports (`atl index`) also return, per result, ``image_ids`` (the catalog row's
    image id) and ``metadata`` (the row's metadata columns, a dict); other exports leave
    both empty. Exports with a calibrated match threshold return ``match`` (per result: its
    score reaches the threshold, i.e. the same product); else it is empty.
    """

    image_ids: list[str]
    metadata: list[dict]
    match: list[bool]

    def __new__(cls, ids, scores, image_ids=None, metadata=None, match=None):
        self = super().__new__(cls, ids, scores)
        self.image_ids = list(image_ids) if image_ids is not None else []
        self.metadata = list(metadata) if metadata is not None else []
        self.match = [bool(m) for m in match] if match is not None else []
        return self


def make_channel(
    server: str,
    *,
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> grpc.Channel:
    """A channel to ``host:port``.

    TLS when ``root_certificates`` (PEM CA) or a client certificate is given; mutual TLS
    when ``private_key`` and ``certificate_chain`` (PEM) are given (a server started
    with ``--ssl_ca`` requires them).
    """
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mutual TLS needs both the client private key and its certificate chain")
    options = [
        ("grpc.max_receive_message_length", max_message_size),
        ("grpc.max_send_message_length", max_message_size),
    ]
    if root_certificates is not None or private_key is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
        )
        return grpc.secure_channel(server, creds, options=options)
    return grpc.insecure_channel(server, options=options)


def connect(server: str, **kwargs) -> prediction_service_pb2_grpc.PredictionServiceStub:
    """``PredictionServiceStub`` for ``host:port`` (keyword arguments go to :func:`make_channel`)."""
    return prediction_service_pb2_grpc.PredictionServiceStub(make_channel(server, **kwargs))


def _stub(stub_or_channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    if isinstance(stub_or_channel, grpc.Channel):
        return prediction_service_pb2_grpc.PredictionServiceStub(stub_or_channel)
    if isinstance(stub_or_channel, str):
        return connect(stub_or_channel)
    return stub_or_channel


def _model_spec(spec, model: str, signature: str | None, version: int | None, version_label: str | None):
    spec.name = model
    if signature:
        spec.signature_name = signature
    if version is not None:
        spec.version.value = int(version)
    elif version_label:
        spec.version_label = version_label


def predict(
    stub_or_channel,
    model: str,
    inputs: Mapping[str, np.ndarray | Sequence],
    *,
    signature: str = "serving_default",
    version: int | None = None,
    version_label: str | None = None,
    output_filter: Sequence[str] = (),
    timeout: float = 30.0,
    dtypes: Mapping[str, tf.DType] | None = None,
    wait_for_ready: bool = False,
) -> dict[str, np.ndarray]:
    """Generic Predict: ``{name: array}`` in, ``{output: array}`` out.

    ``dtypes`` forces an input's TensorProto dtype (e.g. ``{"k": tf.int32}``).
    ``wait_for_ready=True`` waits (up to ``timeout``) for a server that is still starting.
    Raises ``grpc.RpcError`` with the server's status code and message.
    """
    request = predict_pb2.PredictRequest()
    _model_spec(request.model_spec, model, signature, version, version_label)
    for key, value in inputs.items():
        dtype = (dtypes or {}).get(key)
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    request.output_filter.extend(output_filter)
    response = _stub(stub_or_channel).Predict(request, timeout=timeout, wait_for_ready=wait_for_ready)
    return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}


def embed(
    stub_or_channel, model: str, images: Sequence[bytes], *, version: int | None = None, timeout: float = 30.0
) -> np.ndarray:
    """Encoded images (JPEG/PNG bytes) -> embeddings ``[B, D]`` via ``serving_default``."""
    out = predict(
        stub_or_channel, model, {"images": np.array(list(images), dtype=object)},
        version=version, timeout=timeout, dtypes={"images": tf.string},
    )
    return out["embeddings"]


def retrieve(
    stub_or_channel,
    model: str,
    images: Sequence[bytes],
    k: int = 10,
    *,
    signature: str = "retrieve",
    version: int | None = None,
    version_label: str | None = None,
    timeout: float = 30.0,
    wait_for_ready: bool = False,
) -> list[Neighbors]:
    """Top-``k`` gallery ids and scores for each encoded query image, best first.

    ``signature="retrieve_exact"`` uses the pure-TF brute-force search (the one stock
    TF Serving can run without ScaNN's ops). For a catalog export each `Neighbors` also
    carries ``image_ids`` and ``metadata`` (the signature's ``image_ids`` / ``metadata`` outputs).
    """
    if not images:
        raise ValueError("retrieve() needs at least one query image")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = predict(
        stub_or_channel, model,
        {"images": np.array(list(images), dtype=object), "k": np.int32(k)},
        signature=signature, version=version, version_label=version_label,
        timeout=timeout,  # no output_filter: every output, so catalog exports' image_ids/metadata come too
        dtypes={"images": tf.string, "k": tf.int32}, wait_for_ready=wait_for_ready,
    )
    image_ids = out.get("image_ids", [None] * len(out["ids"]))
    metadata = out.get("metadata", [None] * len(out["ids"]))
    match = out.get("match", [None] * len(out["ids"]))
    return [
        Neighbors(
            [i.decode("utf-8") for i in ids], [float(s) for s in scores],
            None if rows is None else [r.decode("utf-8") for r in rows],
            None if meta is None else [json.loads(m.decode("utf-8") or "{}") for m in meta],
            matched,
        )
        for ids, scores, rows, meta, matched in zip(out["ids"], out["scores"], image_ids, metadata, match)
    ]


def get_signature_defs(stub_or_channel, model: str, *, version: int | None = None, timeout: float = 30.0):
    """``{signature name: tensorflow.SignatureDef}`` from GetModelMetadata, plus the served version."""
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    _model_spec(request.model_spec, model, None, version, None)
    response = _stub(stub_or_channel).GetModelMetadata(request, timeout=timeout)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    return dict(sig_map.signature_def), int(response.model_spec.version.value)


def get_model_status(channel: grpc.Channel, model: str, *, version: int | None = None, timeout: float = 30.0):
    """``{version: state name}`` from ``ModelService.GetModelStatus``."""
    from tensorflow_serving.apis import model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    _model_spec(request.model_spec, model, None, version, None)
    response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=timeout)
    names = get_model_status_pb2.ModelVersionStatus.State
    return {int(s.version): names.Name(s.state) for s in response.model_version_status}


def format_table(queries: Sequence[str], results: Sequence[Neighbors]) -> str:
    """Plain-text table: query, rank, id, score (+ image_id, metadata for catalog exports)."""
    catalog = any(getattr(r, "image_ids", None) for r in results)
    flagged = any(getattr(r, "match", None) for r in results)
    rows = [("query", "rank", "id", "score") + (("match",) if flagged else ()) + (("image_id", "metadata") if catalog else ())]
    for query, result in zip(queries, results):
        ids, scores = result
        for rank, (item, score) in enumerate(zip(ids, scores), start=1):
            extra = ()
            if catalog:
                image_ids, metadata = getattr(result, "image_ids", []), getattr(result, "metadata", [])
                extra = (image_ids[rank - 1] if rank <= len(image_ids) else "",
                         json.dumps(metadata[rank - 1], ensure_ascii=False, sort_keys=True) if rank <= len(metadata) else "")
            flag = (("yes" if result.match[rank - 1] else "no",) if flagged else ())
            rows.append((query, str(rank), item, f"{score:.4f}") + flag + extra)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_grid(
    path: str | os.PathLike,
    query_images: Sequence[bytes],
    results: Sequence[Neighbors],
    gallery_dir: str | os.PathLike | None = None,
) -> None:
    """PNG grid: one row per query (query image, then its results with id and score).

    Result tiles show the returned ``image_ids`` (catalog exports: the row's image id or path,
    found as a file or under `gallery_dir`, with or without an image extension); exports
    without them fall back to the item id (`<gallery_dir>/<id>.png`). Drawn by
    `atl_keras.search.pictures.neighbour_grid`.
    """
    from atl_keras.search.pictures import neighbour_grid

    images = [r.image_ids if r.image_ids else r.ids for r in results]
    k = max(len(r.ids) for r in results)
    scores = np.array([list(r.scores) + [np.nan] * (k - len(r.scores)) for r in results])
    neighbour_grid(path, list(query_images), images, [r.ids for r in results], scores, image_root=gallery_dir)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atl query", description="Query an atl model over gRPC.",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--server", default="localhost:8500", help="host:port of the gRPC server")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--image", action="append", required=True, help="query image file (repeatable)")
    p.add_argument("--k", type=int, default=10, help="results per query")
    p.add_argument("--signature", default="retrieve", help="retrieve (ScaNN) or retrieve_exact (pure TF)")
    p.add_argument("--version", type=int, default=None, help="model version (default: latest)")
    p.add_argument("--version-label", default=None, help="model version label from models.config")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds")
    p.add_argument("--wait-for-ready", action="store_true",
                   help="wait up to --timeout for the server to come up instead of failing fast")
    p.add_argument("--tls-ca", default=None, help="CA certificate PEM: connect with TLS")
    p.add_argument("--tls-cert", default=None,
                   help="client certificate PEM for mutual TLS (a server started with --ssl_ca); needs --tls-key")
    p.add_argument("--tls-key", default=None, help="client private key PEM for mutual TLS; needs --tls-cert")
    p.add_argument("--grid", default=None, help="write a PNG grid of queries and results here")
    p.add_argument("--gallery-dir", default=None,
                   help="folder the results' image ids (or paths) are found in for --grid, e.g. the catalog's folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"argument --k: must be >= 1 (results per query), got {args.k}")
    if args.timeout <= 0:
        parser.error(f"argument --timeout: must be > 0 seconds, got {args.timeout:g}")
    try:
        images = [pathlib.Path(p).read_bytes() for p in args.image]
    except OSError as err:
        print(f"error: cannot read query image: {err}", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: mutual TLS needs both --tls-cert and --tls-key", file=sys.stderr)
        return 2
    try:
        root = pathlib.Path(args.tls_ca).read_bytes() if args.tls_ca else None
        cert = pathlib.Path(args.tls_cert).read_bytes() if args.tls_cert else None
        key = pathlib.Path(args.tls_key).read_bytes() if args.tls_key else None
    except OSError as err:
        print(f"error: cannot read a TLS file: {err}", file=sys.stderr)
        return 2
    channel = make_channel(args.server, root_certificates=root, private_key=key, certificate_chain=cert)
    try:
        results = retrieve(
            channel, args.model, images, args.k, signature=args.signature,
            version=args.version, version_label=args.version_label, timeout=args.timeout,
            wait_for_ready=args.wait_for_ready,
        )
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        channel.close()
    print(format_table([pathlib.Path(p).name for p in args.image], results))
    if args.grid:
        save_grid(args.grid, images, results, args.gallery_dir)
        print(f"grid written to {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

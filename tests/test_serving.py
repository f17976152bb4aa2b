"""The gRPC model server, its client and models.config, over real gRPC on 127.0.0.1.

A module-scoped server serves two models from a models.config:
- ``atl``: versions 1 and 2 (policy ``all``, label ``stable`` -> 1), for most tests;
- ``hot``: version 1, then version 2 is written while requests run (hot reload).
Every served output is compared with the numpy reference in ``serving_fixtures``.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import client
from serving.model_config import (
    ServedModel,
    VersionPolicy,
    list_version_dirs,
    parse_channel_arguments,
    parse_model_config,
    parse_ssl_config,
    to_model_server_config,
)
from serving.server import ModelServer, ServerConfig, SignatureInfo
from serving_fixtures import build_fixture_model, encode_png, random_pixels

REPO = pathlib.Path(__file__).resolve().parent.parent
MAX_BATCH = 8
GALLERY = 12
State = get_model_status_pb2.ModelVersionStatus.State

MODELS_CONFIG = """
model_config_list {
  config {
    name: "atl"
    base_path: "atl"
    model_platform: "tensorflow"
    model_version_policy { all {} }
    version_labels { key: "stable" value: 1 }
  }
  config {
    name: "hot"
    base_path: "hot"
    model_platform: "tensorflow"
  }
}
"""


# --------------------------------------------------------------------------- fixtures


class Served:
    """The running module server and what it serves."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.atl = {v: build_fixture_model(root / "atl", v, name="atl") for v in (1, 2)}
        self.hot = {1: build_fixture_model(root / "hot", 1, name="hot", seed=11)}
        models = parse_model_config(MODELS_CONFIG, relative_to=root)
        self.server = ModelServer(
            ServerConfig(models, port=0, file_system_poll_wait_seconds=0.2, max_batch_size=MAX_BATCH)
        ).start()
        self.target = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.pixels = random_pixels(3, seed=5)
        self.pngs = [encode_png(p) for p in self.pixels]
        self._start_cli_processes()

    def _start_cli_processes(self) -> None:
        """Start ``python -m serving.server`` and ``python -m serving.client`` now.

        Each spends ~7 s of CPU importing TensorFlow; started here, that overlaps with the
        in-process tests. ``test_cli_server_and_client_subprocesses`` checks the results.
        """
        queries = self.root / "queries"
        queries.mkdir()
        self.query_args = []
        for i, png in enumerate(self.pngs[:2]):
            (queries / f"q{i}.png").write_bytes(png)
            self.query_args += ["--image", str(queries / f"q{i}.png")]
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
        self.cli_port = _free_port()
        self.cli_server = subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--port", str(self.cli_port), "--model_name", "atl",
             "--model_base_path", str(self.root / "atl"), "--file_system_poll_wait_seconds", "0"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.cli_server_lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=_read_lines, args=(self.cli_server.stdout, self.cli_server_lines), daemon=True
        ).start()
        self.cli_client = subprocess.Popen(
            [sys.executable, "-m", "serving.client", "--server", f"127.0.0.1:{self.cli_port}",
             "--model", "atl", *self.query_args, "--k", "3", "--signature", "retrieve_exact",
             "--wait-for-ready", "--timeout", "150"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def close(self) -> None:
        for proc in (self.cli_client, self.cli_server):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self.channel.close()
        self.server.stop(grace=1).wait(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("saved_models"))
    yield s
    s.close()


def predict_request(model="atl", signature="", version=None, label="", **inputs) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    if signature:
        req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    if label:
        req.model_spec.version_label = label
    for key, value in inputs.items():
        req.inputs[key].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value))
    return req


def images_proto(pngs) -> tensor_pb2.TensorProto:
    return tf.make_tensor_proto(np.array(pngs, dtype=object), dtype=tf.string)


def retrieve_request(served, k=3, signature="retrieve", **kw):
    return predict_request(
        signature=signature, images=images_proto(served.pngs),
        k=tf.make_tensor_proto(k, dtype=tf.int32), **kw,
    )


def rpc_error(fn, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=30)
    return info.value


# --------------------------------------------------------------------------- models.config


def test_parse_models_config_two_models(tmp_path):
    models = parse_model_config(MODELS_CONFIG, relative_to=tmp_path)
    assert [m.name for m in models] == ["atl", "hot"]
    atl, hot = models
    assert atl.base_path == str(tmp_path / "atl")
    assert atl.version_policy == VersionPolicy("all")
    assert dict(atl.version_labels) == {"stable": 1}
    assert hot.version_policy == VersionPolicy("latest", num_versions=1)
    # round trip through the proto
    again = parse_model_config(
        __import__("google.protobuf.text_format").protobuf.text_format.MessageToString(
            to_model_server_config(models)
        )
    )
    assert again == models
    specific = parse_model_config(
        'model_config_list { config { name: "m" base_path: "/x" '
        "model_version_policy { specific { versions: 3 versions: 5 } } } }"
    )[0]
    assert specific.version_policy == VersionPolicy("specific", versions=(3, 5))


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_config_list { config { name: 'a' base_path: '/a' } config { name: 'a' base_path: '/b' } }", "twice"),
        ("model_config_list { config { name: 'a' base_path: '/a' model_platform: 'pytorch' } }", "model_platform"),
        ("model_config_list { config { base_path: '/a' } }", "needs a name"),
        ("model_config_list { config { name: 'a' base_path: '/a' bogus: 1 } }", "invalid models.config"),
        ("", "no model_config_list"),
    ],
)
def test_bad_models_config_raises(text, message):
    with pytest.raises(ValueError, match=message):
        parse_model_config(text)


def test_version_policy_select():
    on_disk = [3, 1, 10, 7]
    assert VersionPolicy().select(on_disk) == [10]
    assert VersionPolicy("latest", num_versions=2).select(on_disk) == [10, 7]
    assert VersionPolicy("all").select(on_disk) == [10, 7, 3, 1]
    assert VersionPolicy("specific", versions=(1, 4, 7)).select(on_disk) == [7, 1]
    with pytest.raises(ValueError, match="num_versions"):
        VersionPolicy("latest", num_versions=0)


def test_list_version_dirs_skips_temp_and_incomplete(tmp_path):
    for name in ("1", "12", ".tmp-13-abcd", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "12" / "saved_model.pb").write_bytes(b"")
    (tmp_path / ".tmp-13-abcd" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "5").mkdir()  # integer but no saved_model.pb yet
    assert sorted(list_version_dirs(tmp_path)) == [1, 12]
    assert list_version_dirs(tmp_path / "missing") == {}


def test_flag_parsers():
    assert parse_channel_arguments("grpc.max_connection_age_ms=6000, grpc.lb_policy_name=round_robin") == [
        ("grpc.max_connection_age_ms", 6000), ("grpc.lb_policy_name", "round_robin")
    ]
    with pytest.raises(ValueError, match="key=value"):
        parse_channel_arguments("oops")
    with pytest.raises(ValueError, match="not a valid PEM"):  # parsed, then the key pair is checked
        parse_ssl_config('server_key: "KEY" server_cert: "CERT"')
    with pytest.raises(ValueError, match="needs custom_ca"):
        parse_ssl_config('server_key: "KEY" server_cert: "CERT" client_verify: true')
    with pytest.raises(ValueError, match="server_cert"):
        parse_ssl_config('server_key: "KEY"')


# --------------------------------------------------------------------------- every RPC


def test_predict_serving_default_latest_version(served):
    resp = served.stub.Predict(predict_request(images=images_proto(served.pngs)), timeout=30)
    assert resp.model_spec.name == "atl"
    assert resp.model_spec.version.value == 2  # latest by default
    assert resp.model_spec.signature_name == "serving_default"
    emb = tf.make_ndarray(resp.outputs["embeddings"])
    np.testing.assert_allclose(emb, served.atl[2].embed(served.pixels), atol=1e-5)


def test_predict_embed_pixels(served):
    req = predict_request(signature="embed_pixels", pixels=served.pixels.astype(np.float32))
    emb = tf.make_ndarray(served.stub.Predict(req, timeout=30).outputs["embeddings"])
    np.testing.assert_allclose(emb, served.atl[2].embed(served.pixels), atol=1e-5)


@pytest.mark.parametrize("signature", ["retrieve", "retrieve_exact"])
def test_predict_retrieve_matches_brute_force(served, signature):
    for k in (1, 5, GALLERY):
        resp = served.stub.Predict(retrieve_request(served, k=k, signature=signature), timeout=30)
        ids, scores, indices = served.atl[2].retrieve(served.pixels, k)
        out = {key: tf.make_ndarray(v) for key, v in resp.outputs.items()}
        assert out["ids"].shape == (3, k)
        assert out["ids"].astype(str).tolist() == ids.astype(str).tolist()
        np.testing.assert_array_equal(out["indices"], indices)
        np.testing.assert_allclose(out["scores"], scores, atol=1e-5)


def test_client_retrieve_and_embed(served):
    results = client.retrieve(served.channel, "atl", served.pngs, k=4, signature="retrieve_exact")
    ids, scores, _ = served.atl[2].retrieve(served.pixels, 4)
    assert [r.ids for r in results] == ids.astype(str).tolist()
    np.testing.assert_allclose([r.scores for r in results], scores, atol=1e-5)
    first_ids, first_scores = results[0]  # a plain (ids, scores) tuple too
    assert first_ids == results[0].ids
    np.testing.assert_allclose(client.embed(served.stub, "atl", served.pngs, version=1), served.atl[1].embed(served.pixels), atol=1e-5)


def test_get_model_metadata(served):
    sig_defs, version = client.get_signature_defs(served.stub, "atl")
    assert version == 2
    assert {"serving_default", "embed_pixels", "retrieve", "retrieve_exact"} <= set(sig_defs)
    retrieve = sig_defs["retrieve"]
    assert set(retrieve.inputs) == {"images", "k"}
    assert set(retrieve.outputs) == {"ids", "scores", "indices"}
    assert retrieve.inputs["images"].dtype == tf.string.as_datatype_enum
    assert retrieve.inputs["k"].dtype == tf.int32.as_datatype_enum
    assert [d.size for d in sig_defs["embed_pixels"].inputs["pixels"].tensor_shape.dim] == [-1, 8, 8, 3]
    # the raw response packs a SignatureDefMap under metadata["signature_def"], as TF Serving does
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "atl"
    req.model_spec.version.value = 1
    resp = served.stub.GetModelMetadata(req, timeout=30)
    assert resp.model_spec.version.value == 1
    assert resp.metadata["signature_def"].Is(get_model_metadata_pb2.SignatureDefMap.DESCRIPTOR)


def test_get_model_status(served):
    assert client.get_model_status(served.channel, "atl") == {1: "AVAILABLE", 2: "AVAILABLE"}
    assert client.get_model_status(served.channel, "atl", version=1) == {1: "AVAILABLE"}
    err = rpc_error(served.models.GetModelStatus, get_model_status_pb2.GetModelStatusRequest(
        model_spec={"name": "atl", "version": {"value": 9}}))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "version 9" in err.details()
    err = rpc_error(served.models.GetModelStatus, get_model_status_pb2.GetModelStatusRequest(
        model_spec={"name": "nope"}))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in err.details()


def test_health_check(served):
    for service in ("", "tensorflow.serving.PredictionService", "atl", "hot"):
        resp = served.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    err = rpc_error(served.health.Check, health_pb2.HealthCheckRequest(service="nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "method, request_",
    [
        ("Classify", classification_pb2.ClassificationRequest()),
        ("Regress", regression_pb2.RegressionRequest()),
        ("MultiInference", inference_pb2.MultiInferenceRequest()),
        ("HandleReloadConfigRequest", model_management_pb2.ReloadConfigRequest()),
    ],
)
def test_unimplemented_rpcs(served, method, request_):
    stub = served.models if method == "HandleReloadConfigRequest" else served.stub
    err = rpc_error(getattr(stub, method), request_)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert method in err.details()


# --------------------------------------------------------------------------- versions


def test_named_versions_and_labels(served):
    for kw, version in [({"version": 1}, 1), ({"version": 2}, 2), ({"label": "stable"}, 1), ({}, 2)]:
        resp = served.stub.Predict(predict_request(images=images_proto(served.pngs), **kw), timeout=30)
        assert resp.model_spec.version.value == version
        np.testing.assert_allclose(
            tf.make_ndarray(resp.outputs["embeddings"]), served.atl[version].embed(served.pixels), atol=1e-5
        )


# --------------------------------------------------------------------------- bad requests


def _bad_requests(served):
    png = served.pngs[0]
    k3 = tf.make_tensor_proto(3, dtype=tf.int32)
    malformed = tf.make_tensor_proto(np.array([png, png], dtype=object), dtype=tf.string)
    malformed.tensor_shape.dim[0].size = 3  # claims 3 strings, holds 2
    truncated_png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20
    NF, IA = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    FP = grpc.StatusCode.FAILED_PRECONDITION
    cases = {
        "unknown model": (predict_request(model="nope", images=images_proto([png])), NF, "model 'nope'"),
        "empty model name": (predict_request(model="", images=images_proto([png])), IA, "model_spec.name"),
        "unknown version": (predict_request(version=7, images=images_proto([png])), NF, "version 7"),
        "unknown label": (predict_request(label="canary", images=images_proto([png])), NF, "label 'canary'"),
        "unknown signature": (predict_request(signature="nope", images=images_proto([png])), FP, "signature 'nope'"),
        "missing input": (predict_request(signature="retrieve", images=images_proto([png])), IA, "missing inputs ['k']"),
        "extra input": (predict_request(images=images_proto([png]), extra=np.ones(1, np.float32)), IA, "unexpected inputs ['extra']"),
        "wrong dtype": (predict_request(images=np.ones(2, np.float32)), IA, "DT_FLOAT"),
        "wrong k dtype": (predict_request(signature="retrieve", images=images_proto([png]), k=np.int64(3)), IA, "DT_INT64"),
        "wrong rank": (predict_request(images=tf.make_tensor_proto(np.array([[png]], dtype=object))), IA, "rank 2"),
        "wrong shape": (predict_request(signature="embed_pixels", pixels=np.zeros((1, 4, 4, 3), np.float32)), IA, "shape [1, 4, 4, 3]"),
        "empty batch": (predict_request(images=images_proto(np.array([], dtype=object))), IA, "empty batch"),
        "batch too large": (predict_request(images=images_proto([png] * (MAX_BATCH + 1))), IA, f"--max_batch_size={MAX_BATCH}"),
        "not an image": (predict_request(images=images_proto([png, b"not an image"])), IA, "inputs['images'][1] is not an encoded"),
        "truncated image": (predict_request(images=images_proto([truncated_png])), IA, "cannot be decoded as an image"),
        "k zero": (predict_request(signature="retrieve", images=images_proto([png]), k=tf.make_tensor_proto(0, dtype=tf.int32)), IA, "k must be >= 1"),
        "k over gallery": (predict_request(signature="retrieve_exact", images=images_proto([png]), k=tf.make_tensor_proto(GALLERY + 1, dtype=tf.int32)), IA, f"gallery_size {GALLERY}"),
        "malformed tensor": (predict_request(images=malformed), IA, "holds 2 values but its shape [3] needs 3"),
    }
    filtered = predict_request(images=images_proto([png]))
    filtered.output_filter.append("nope")
    cases["unknown output_filter"] = (filtered, IA, "output_filter")
    _ = k3
    return cases


BAD_CASES = [
    "unknown model", "empty model name", "unknown version", "unknown label", "unknown signature",
    "missing input", "extra input", "wrong dtype", "wrong k dtype", "wrong rank", "wrong shape",
    "empty batch", "batch too large", "not an image", "truncated image", "k zero", "k over gallery",
    "malformed tensor", "unknown output_filter",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_predict_request(served, case):
    request, code, message = _bad_requests(served)[case]
    err = rpc_error(served.stub.Predict, request)
    assert err.code() == code, (case, err.details())
    assert message in err.details(), (case, err.details())


def test_bad_metadata_requests(served):
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = "atl"
    err = rpc_error(served.stub.GetModelMetadata, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "metadata_field" in err.details()
    req.metadata_field.append("signature_def")
    req.model_spec.version.value = 5
    err = rpc_error(served.stub.GetModelMetadata, req)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "version 5" in err.details()


def test_server_still_answers_after_bad_requests(served):
    for case in BAD_CASES:
        with pytest.raises(grpc.RpcError):
            served.stub.Predict(_bad_requests(served)[case][0], timeout=30)
    test_predict_retrieve_matches_brute_force(served, "retrieve")
    assert served.server.in_flight == 0


# --------------------------------------------------------------------------- hot reload


def _hammer(stub, pngs, stop: threading.Event, results: list, failures: list) -> None:
    req = predict_request(model="hot", images=images_proto(pngs))
    while not stop.is_set():
        try:
            resp = stub.Predict(req, timeout=30)
            results.append((resp.model_spec.version.value, tf.make_ndarray(resp.outputs["embeddings"])))
        except Exception as err:  # any failure is a test failure
            failures.append(repr(err))


def _wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_hot_reload_under_load_has_zero_failures(served):
    stop = threading.Event()
    per_thread = [([], []) for _ in range(4)]
    threads = [
        threading.Thread(target=_hammer, args=(served.stub, served.pngs, stop, res, fail))
        for res, fail in per_thread
    ]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: all(len(res) >= 3 for res, _ in per_thread), what="requests on version 1")
        # Written as .tmp-2-xxxx inside the base path, then renamed to 2/ (atomic publish).
        served.hot[2] = build_fixture_model(served.root / "hot", 2, name="hot", seed=22)
        _wait_for(
            lambda: client.get_model_status(served.channel, "hot") == {2: "AVAILABLE", 1: "END"},
            what="version 2 AVAILABLE and version 1 END",
        )
        count = sum(len(res) for res, _ in per_thread)
        _wait_for(lambda: sum(len(res) for res, _ in per_thread) >= count + 8, what="requests on version 2")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert [f for _, fail in per_thread for f in fail] == []
    reference = {v: m.embed(served.pixels) for v, m in served.hot.items()}
    for res, _ in per_thread:
        versions = [v for v, _ in res]
        assert versions == sorted(versions), "a thread saw version 1 again after version 2"
        for version, emb in res:
            np.testing.assert_allclose(emb, reference[version], atol=1e-5)
    assert {v for res, _ in per_thread for v, _ in res} == {1, 2}
    assert client.get_signature_defs(served.stub, "hot")[1] == 2


def test_broken_version_is_skipped(served):
    broken = served.root / "hot" / "99"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    try:
        _wait_for(lambda: 99 in client.get_model_status(served.channel, "hot"), what="version 99 load attempt")
        req = get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "hot", "version": {"value": 99}})
        status = served.models.GetModelStatus(req, timeout=10).model_version_status[0]
        assert status.state == State.END
        assert "failed to load version 99" in status.status.error_message
        resp = served.stub.Predict(predict_request(model="hot", images=images_proto(served.pngs)), timeout=30)
        assert resp.model_spec.version.value == max(v for v in served.hot)  # still the last good version
    finally:
        shutil.rmtree(broken)


# --------------------------------------------------------------------------- shutdown


def test_stop_drains_in_flight_request(served):
    server = ModelServer(
        ServerConfig(parse_model_config(MODELS_CONFIG, relative_to=served.root)[:1], port=0,
                     file_system_poll_wait_seconds=0)
    ).start()
    entered, release = threading.Event(), threading.Event()
    with server.manager.acquire("atl") as loaded:
        original = loaded.signatures["serving_default"]

        def gated(**inputs):
            entered.set()
            release.wait(30)
            return original.function(**inputs)

        loaded.signatures["serving_default"] = SignatureInfo(
            original.name, gated, original.inputs, original.outputs
        )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        future = stub.Predict.future(predict_request(images=images_proto(served.pngs)), timeout=30)
        assert entered.wait(30), "request never reached the model"
        assert server.in_flight == 1
        stopped = server.stop(grace=30)
        # new RPCs are refused while the in-flight one drains
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(predict_request(images=images_proto(served.pngs)), timeout=10)
        # UNAVAILABLE, or CANCELLED when the RPC reached the server just as it stopped accepting
        refused = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert info.value.code() in refused, (info.value.code(), info.value.details())
        assert not stopped.is_set()
        release.set()
        resp = future.result(timeout=30)
        np.testing.assert_allclose(
            tf.make_ndarray(resp.outputs["embeddings"]), served.atl[2].embed(served.pixels), atol=1e-5
        )
        assert stopped.wait(30)
    finally:
        release.set()
        channel.close()
        server.stop(grace=0)


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_client_main_grid_and_errors(served, tmp_path, capsys):
    (tmp_path / "q.png").write_bytes(served.pngs[0])
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    top = served.atl[1].retrieve(served.pixels[:1], 2)[0][0]
    red = tf.io.encode_png(tf.constant(np.tile(np.array([255, 0, 0], np.uint8), (8, 8, 1)))).numpy()
    (gallery / f"{top[0]}.png").write_bytes(red)  # the other result has no image: a 'not found' tile
    argv = ["--server", served.target, "--model", "atl", "--image", str(tmp_path / "q.png")]
    grid = tmp_path / "grid.png"
    assert client.main([*argv, "--k", "2", "--version-label", "stable", "--grid", str(grid),
                        "--gallery-dir", str(gallery)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [row.split()[2] for row in table[2:4]] == top.tolist()
    pixels = tf.io.decode_png(grid.read_bytes(), channels=3).numpy()
    # the first result's tile shows its image (pure red), not an empty box with its id
    assert np.sum(np.all(pixels == [255, 0, 0], axis=-1)) > 50 * 50
    assert client.main([*argv, "--k", "999"]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "k must be" in err


# --------------------------------------------------------------------------- TLS


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_tls(served, tmp_path):
    from serving.model_config import TLSConfig

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    text = f"server_key: {key.read_text()!r} server_cert: {cert.read_text()!r} custom_ca: {cert.read_text()!r}"
    parsed = parse_ssl_config(text + " client_verify: true")
    assert (parsed.server_key, parsed.server_cert, parsed.custom_ca, parsed.client_verify) == (
        key.read_bytes(), cert.read_bytes(), cert.read_bytes(), True)
    config = ServerConfig(
        parse_model_config(MODELS_CONFIG, relative_to=served.root)[:1], port=0,
        file_system_poll_wait_seconds=0, tls=TLSConfig(key.read_bytes(), cert.read_bytes()),
    )
    with ModelServer(config) as server:
        secure = client.make_channel(f"127.0.0.1:{server.port}", root_certificates=cert.read_bytes())
        with secure:
            results = client.retrieve(secure, "atl", served.pngs[:1], k=2, signature="retrieve_exact")
        assert results[0].ids == served.atl[2].retrieve(served.pixels[:1], 2)[0][0].tolist()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:
            with pytest.raises(grpc.RpcError) as info:
                prediction_service_pb2_grpc.PredictionServiceStub(plain).Predict(
                    predict_request(images=images_proto(served.pngs[:1])), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------- the real exporter


def test_serves_atl_keras_export(served, tmp_path):
    export = pytest.importorskip("atl_keras.export")
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(4, kernel_initializer=keras.initializers.RandomNormal(seed=3))(x)
    model = keras.Model(inputs, keras.layers.UnitNormalization()(x))
    gallery_pixels = random_pixels(40, seed=9).astype(np.float32)
    ids = [f"g{i:02d}" for i in range(40)]
    result = export.export_model(model, gallery_pixels, ids, str(tmp_path / "exported"), version=1, k=5, min_recall=0.0)
    server = ModelServer(
        ServerConfig([ServedModel("exported", str(tmp_path / "exported"))], port=0, file_system_poll_wait_seconds=0)
    ).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            gallery_emb = model.predict(gallery_pixels, verbose=0)
            query_emb = model.predict(served.pixels.astype(np.float32), verbose=0)
            expected = [[ids[i] for i in np.argsort(-(gallery_emb @ q))[:5]] for q in query_emb]
            exact = client.retrieve(channel, "exported", served.pngs, k=5, signature="retrieve_exact")
            assert [r.ids for r in exact] == expected
            scann = client.retrieve(channel, "exported", served.pngs, k=5, signature="retrieve")
            assert [r.ids[0] for r in scann] == [e[0] for e in expected]
            assert client.get_model_status(channel, "exported") == {result.version: "AVAILABLE"}
    finally:
        server.stop(grace=0)


def test_repo_models_config_parses():
    models = parse_model_config((REPO / "serving" / "models.config").read_text())
    assert [(m.name, m.base_path, m.version_policy) for m in models] == [
        ("shop", "/models/shop-portable", VersionPolicy("latest", num_versions=1))
    ]


# --------------------------------------------------------------------------- CLI processes (last: they
# were started by the fixture and imported TensorFlow while the tests above ran)


def test_cli_server_and_client_subprocesses(served):
    """``python -m serving.server`` answers ``python -m serving.client``; SIGTERM -> exit 0.

    Both processes were started by the ``served`` fixture (the client waits for the
    server with --wait-for-ready); the fixture kills them if anything here fails.
    """
    try:
        stdout, stderr = served.cli_client.communicate(timeout=180)
    finally:
        seen = []
        while not served.cli_server_lines.empty():
            seen.append(served.cli_server_lines.get())
    assert served.cli_client.returncode == 0, stderr + "\nserver:\n" + "".join(seen)
    assert any(f"listening on 127.0.0.1:{served.cli_port}" in line for line in seen), "".join(seen)
    rows = [line.split() for line in stdout.splitlines()]
    assert rows[0] == ["query", "rank", "id", "score"]
    ids, scores, _ = served.atl[2].retrieve(served.pixels[:2], 3)  # --model_base_path: latest = 2
    expected = [[f"q{q}.png", str(r + 1), ids[q][r], f"{scores[q][r]:.4f}"] for q in range(2) for r in range(3)]
    assert rows[2:8] == expected
    served.cli_server.send_signal(signal.SIGTERM)
    assert served.cli_server.wait(timeout=60) == 0



@pytest.mark.parametrize("array", [
    np.array([[b"a", b"bc"], [b"", b"\xff"]], dtype=object), np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array(3, dtype=np.int32), np.array([], dtype=object), np.zeros((0, 3), np.float32),
    np.array([True, False]), np.arange(4, dtype=np.int64), np.ones((2, 2), np.float64),
])
def test_response_tensor_proto_matches_make_tensor_proto(array):
    from atl_keras.serving.requests import tensor_proto

    got, ref = tensor_proto(array), tf.make_tensor_proto(array)
    assert got.dtype == ref.dtype and got.tensor_shape == ref.tensor_shape
    np.testing.assert_array_equal(tf.make_ndarray(got), tf.make_ndarray(ref))

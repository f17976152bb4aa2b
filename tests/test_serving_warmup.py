"""Warm start: every version is warmed before it is AVAILABLE and before health says SERVING."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2
from tensorflow_serving.apis import predict_pb2

from atl_keras.serving.manager import ModelManager, State
from atl_keras.serving.model_config import ServedModel
from atl_keras.serving.requests import run_signature
from atl_keras.serving.server import ModelServer, ServerConfig
from atl_keras.serving.warmup import WARMUP_FILE, read_warmup_requests, synthesized_inputs, warm_up, write_warmup_requests
from serving_fixtures import build_fixture_model, encode_png, random_pixels


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, loaded, signature, arrays):
        self.calls.append((signature.name, dict(arrays)))
        return run_signature(signature, arrays)


def _retrieve_request(k: int, pngs) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "atl"
    req.model_spec.signature_name = "retrieve"
    req.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array(pngs, dtype=object), dtype=tf.string))
    req.inputs["k"].CopyFrom(tf.make_tensor_proto(k, dtype=tf.int32))
    return req


def test_every_signature_is_warmed_with_a_synthesized_request(tmp_path):
    model = build_fixture_model(tmp_path / "atl", 1)
    record = Recorder()
    manager = ModelManager([ServedModel("atl", str(tmp_path / "atl"))], poll_wait_seconds=0,
                           on_load=lambda loaded: warm_up(loaded, record))
    manager.start()
    assert sorted(name for name, _ in record.calls) == ["embed_pixels", "retrieve", "retrieve_exact", "serving_default"]
    calls = dict(record.calls)
    assert calls["retrieve"]["k"] == 10  # min(10, gallery_size=12)
    assert calls["embed_pixels"]["pixels"].shape == (1, *model.image_shape)
    assert [bytes(b)[:3] for b in calls["serving_default"]["images"]] == [b"\xff\xd8\xff", b"\x89PN"]
    with manager.acquire("atl") as loaded:
        arrays = synthesized_inputs(loaded.signatures["retrieve"], {"gallery_size": 3})
    assert int(arrays["k"]) == 3


def test_version_is_not_available_and_health_not_serving_while_warming(tmp_path):
    build_fixture_model(tmp_path / "atl", 1)
    seen = []
    server = ModelServer(ServerConfig([ServedModel("atl", str(tmp_path / "atl"))], port=0,
                                      file_system_poll_wait_seconds=0))
    original = server._prepare_version

    def observe(loaded):
        seen.append((server.manager.version_states("atl")[1][0], server.manager.is_ready(),
                     server.health._server_status[""]))
        original(loaded)

    server.manager._on_load = observe
    server.start()
    try:
        assert seen == [(State.LOADING, False, health_pb2.HealthCheckResponse.NOT_SERVING)]
        assert server.manager.version_states("atl")[1][0] == State.AVAILABLE
    finally:
        server.stop(grace=0)


def test_warmup_records_are_replayed(tmp_path):
    model = build_fixture_model(tmp_path / "atl", 1)
    pngs = [encode_png(p) for p in random_pixels(2, seed=6)]
    write_warmup_requests(model.path / WARMUP_FILE, [_retrieve_request(5, pngs), _retrieve_request(2, pngs[:1])])
    assert [int(tf.make_ndarray(r.inputs["k"])) for r in read_warmup_requests(model.path / WARMUP_FILE)] == [5, 2]
    record = Recorder()
    manager = ModelManager([ServedModel("atl", str(tmp_path / "atl"))], poll_wait_seconds=0,
                           on_load=lambda loaded: warm_up(loaded, record))
    manager.start()
    retrieve = [arrays for name, arrays in record.calls if name == "retrieve"]
    assert [int(a["k"]) for a in retrieve] == [5, 2]  # the records, and no synthesized retrieve
    assert sorted(name for name, _ in record.calls) == [
        "embed_pixels", "retrieve", "retrieve", "retrieve_exact", "serving_default"]


def test_a_failing_warmup_record_fails_the_load_and_an_older_version_serves(tmp_path):
    build_fixture_model(tmp_path / "atl", 1)
    bad = build_fixture_model(tmp_path / "atl", 2)
    write_warmup_requests(bad.path / WARMUP_FILE, [_retrieve_request(0, [encode_png(random_pixels(1)[0])])])
    server = ModelServer(ServerConfig([ServedModel("atl", str(tmp_path / "atl"))], port=0,
                                      file_system_poll_wait_seconds=0))
    server.start()
    try:
        states = server.manager.version_states("atl")
        assert states[2][0] == State.END and "warmup record 0 (retrieve)" in states[2][1]
        assert "k must be >= 1" in states[2][1]
        assert states[1][0] == State.AVAILABLE
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("warmup", [True, False])
def test_warmup_flag(tmp_path, warmup):
    build_fixture_model(tmp_path / "atl", 1)
    calls = []
    server = ModelServer(ServerConfig([ServedModel("atl", str(tmp_path / "atl"))], port=0,
                                      file_system_poll_wait_seconds=0, warmup=warmup))
    server._run_direct = lambda loaded, signature, arrays: calls.append(signature.name) or run_signature(signature, arrays)
    server.start()
    try:
        assert len(calls) == (4 if warmup else 0)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            from atl_keras.serving import client

            assert client.get_model_status(channel, "atl") == {1: "AVAILABLE"}
    finally:
        server.stop(grace=0)

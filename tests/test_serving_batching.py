"""Dynamic request batching (TF Serving's BatchingParameters semantics).

The scheduler is tested against a numpy signature (``y = 2 x + k`` row by row) whose
calls are recorded; the end-to-end test runs concurrent gRPC and REST requests through
a batching server and compares every answer with the fixture's numpy reference.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from atl_keras.serving.batching import (
    BatchingParameters,
    BatchScheduler,
    parse_batching_parameters,
)
from atl_keras.serving.errors import RequestError
from atl_keras.serving.loader import SignatureInfo
from atl_keras.serving.model_config import ServedModel
from atl_keras.serving.server import ModelServer, ServerConfig, build_arg_parser, config_from_args
from serving_fixtures import build_fixture_model, encode_png, random_pixels

SIGNATURE = SignatureInfo(
    "double",
    None,
    {"x": tf.TensorSpec([None, 2], tf.float32), "k": tf.TensorSpec([], tf.float32)},
    {"y": tf.TensorSpec([None, 2], tf.float32)},
)


class Loaded:
    name = "m"
    version = 1


class RecordingRun:
    """``y = 2 x + k``; records each call's batch size and k; can hold the first call."""

    def __init__(self, hold_first: bool = False):
        self.calls: list[tuple[int, float]] = []
        self.lock = threading.Lock()
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, signature, arrays):
        with self.lock:
            self.calls.append((len(arrays["x"]), float(arrays["k"])))
        self.entered.set()
        assert self.release.wait(30)
        if (arrays["x"] < 0).any():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "negative input")
        return {"y": 2 * arrays["x"] + arrays["k"]}


def _request(rows: int, seed: int, k: float = 0.0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).uniform(0, 1, (rows, 2)).astype(np.float32)
    return {"x": x, "k": np.float32(k)}


def test_parse_batching_parameters():
    params = parse_batching_parameters(
        """
        max_batch_size { value: 8 }
        batch_timeout_micros { value: 2000 }
        max_enqueued_batches { value: 3 }
        num_batch_threads { value: 2 }
        thread_pool_name { value: "batch_threads" }
        allowed_batch_sizes: 2
        allowed_batch_sizes: 4
        allowed_batch_sizes: 8
        """
    )
    assert params == BatchingParameters(8, 2000, 3, 2, (2, 4, 8))
    assert [params.padded_size(n) for n in (1, 2, 3, 5, 8)] == [2, 2, 4, 8, 8]
    assert parse_batching_parameters("").max_batch_size == 1000  # TF Serving's default
    with pytest.raises(ValueError, match="must equal max_batch_size"):
        parse_batching_parameters("max_batch_size { value: 8 } allowed_batch_sizes: 4")
    with pytest.raises(ValueError, match="strictly increasing"):
        parse_batching_parameters("max_batch_size { value: 8 } allowed_batch_sizes: 8 allowed_batch_sizes: 8")
    with pytest.raises(ValueError, match="enable_large_batch_splitting"):
        parse_batching_parameters("enable_large_batch_splitting { value: true }")
    with pytest.raises(ValueError, match="BatchingParameters text format"):
        parse_batching_parameters("max_batch_size: 8")  # must be { value: 8 }


def test_concurrent_requests_are_merged_split_back_and_padded():
    run = RecordingRun(hold_first=True)
    params = BatchingParameters(max_batch_size=8, batch_timeout_micros=0, num_batch_threads=1,
                                max_enqueued_batches=100, allowed_batch_sizes=(4, 8))
    scheduler = BatchScheduler(params, run)
    requests = [_request(1 + i % 3, seed=i, k=float(i % 2)) for i in range(12)]
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            first = pool.submit(scheduler.run, Loaded, SIGNATURE, requests[0])
            assert run.entered.wait(30)  # the only batch thread is busy: the rest queue up
            rest = [pool.submit(scheduler.run, Loaded, SIGNATURE, r) for r in requests[1:]]
            while sum(len(b) for q in scheduler._queues.values() for b in q.batches) < 11:
                threading.Event().wait(0.01)
            run.release.set()
            results = [first.result(30)] + [f.result(30) for f in rest]
    finally:
        scheduler.stop()
    for request, result in zip(requests, results):
        np.testing.assert_allclose(result["y"], 2 * request["x"] + request["k"], rtol=1e-6)
    # 1 + 11 requests, rows 1..3, two values of k -> far fewer calls than requests,
    # each call padded to an allowed size, never mixing values of k
    assert len(run.calls) < 12
    assert all(size in (1, 4, 8) for size, _ in run.calls), run.calls  # 1: the first, alone and exact
    rows_by_k = {k: sum(len(r["x"]) for r in requests if float(r["k"]) == k) for k in (0.0, 1.0)}
    assert sum(len(r["x"]) for r in requests) == sum(rows_by_k.values())


def test_full_queue_answers_unavailable_at_once():
    run = RecordingRun(hold_first=True)
    params = BatchingParameters(max_batch_size=2, num_batch_threads=1, max_enqueued_batches=1)
    scheduler = BatchScheduler(params, run)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            busy = pool.submit(scheduler.run, Loaded, SIGNATURE, _request(1, 0))
            assert run.entered.wait(30)
            queued = pool.submit(scheduler.run, Loaded, SIGNATURE, _request(2, 1))  # fills the one batch
            while not scheduler._queues:
                threading.Event().wait(0.01)
            with pytest.raises(RequestError) as info:
                scheduler.run(Loaded, SIGNATURE, _request(1, 2))  # would need a second batch
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "max_enqueued_batches" in info.value.message
            with pytest.raises(RequestError) as info:
                scheduler.run(Loaded, SIGNATURE, _request(3, 3))
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT  # larger than max_batch_size
            run.release.set()
            assert busy.result(30)["y"].shape == (1, 2)
            assert queued.result(30)["y"].shape == (2, 2)
    finally:
        scheduler.stop()


def test_a_bad_request_in_a_merged_batch_fails_alone():
    run = RecordingRun(hold_first=True)
    scheduler = BatchScheduler(BatchingParameters(max_batch_size=16, num_batch_threads=1), run)
    good = [_request(2, i) for i in range(3)]
    bad = {"x": -np.ones((1, 2), np.float32), "k": np.float32(0)}
    try:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            first = pool.submit(scheduler.run, Loaded, SIGNATURE, good[0])
            assert run.entered.wait(30)
            futures = [pool.submit(scheduler.run, Loaded, SIGNATURE, r) for r in (good[1], bad, good[2])]
            while sum(len(b) for q in scheduler._queues.values() for b in q.batches) < 3:
                threading.Event().wait(0.01)
            run.release.set()
            first.result(30)
            np.testing.assert_allclose(futures[0].result(30)["y"], 2 * good[1]["x"])
            np.testing.assert_allclose(futures[2].result(30)["y"], 2 * good[2]["x"])
            with pytest.raises(RequestError, match="negative input"):
                futures[1].result(30)
    finally:
        scheduler.stop()
    assert (5, 0.0) in run.calls  # the merged attempt, then each alone


def test_batching_flags(tmp_path):
    params_file = tmp_path / "batching.txt"
    params_file.write_text("max_batch_size { value: 16 } batch_timeout_micros { value: 500 } "
                           "num_batch_threads { value: 2 }")
    base = ["--model_base_path", str(tmp_path)]
    config = config_from_args(build_arg_parser().parse_args(
        [*base, "--enable_batching=true", "--batching_parameters_file", str(params_file)]))
    assert config.batching == BatchingParameters(16, 500, 10, 2)
    assert config_from_args(build_arg_parser().parse_args([*base, "--enable_batching"])).batching == BatchingParameters()
    assert config_from_args(build_arg_parser().parse_args(base)).batching is None
    with pytest.raises(ValueError, match="need --enable_batching"):
        config_from_args(build_arg_parser().parse_args([*base, "--batching_parameters_file", str(params_file)]))


def test_batching_server_grpc_and_rest_concurrently(tmp_path):
    model = build_fixture_model(tmp_path / "atl", 1)
    (model.path / "batching_params.pbtxt").write_text(
        "max_batch_size { value: 8 } batch_timeout_micros { value: 1000 } allowed_batch_sizes: 4 "
        "allowed_batch_sizes: 8"
    )
    config = ServerConfig(
        [ServedModel("atl", str(tmp_path / "atl"))], port=0, rest_api_port=0, file_system_poll_wait_seconds=0,
        batching=BatchingParameters(max_batch_size=4, num_batch_threads=1), per_model_batching=True,
    )
    pixels = random_pixels(24, seed=4)
    pngs = [encode_png(p) for p in pixels]
    with ModelServer(config) as server:
        with server.manager.acquire("atl") as loaded:
            assert loaded.batching_parameters.max_batch_size == 8  # the version's own file wins
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def via_grpc(i: int) -> np.ndarray:
            req = predict_pb2.PredictRequest()
            req.model_spec.name = "atl"
            req.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array(pngs[i:i + 2], dtype=object)))
            return tf.make_ndarray(stub.Predict(req, timeout=30).outputs["embeddings"])

        def via_rest(i: int) -> np.ndarray:
            body = json.dumps({"instances": [{"b64": base64.b64encode(p).decode()} for p in pngs[i:i + 2]]})
            req = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}/v1/models/atl:predict",
                                         data=body.encode(), method="POST")
            with urllib.request.urlopen(req, timeout=30) as resp:
                return np.array(json.loads(resp.read())["predictions"], dtype=np.float32)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = {(how, i): pool.submit(fn, i) for i in range(0, 24, 2)
                       for how, fn in (("grpc", via_grpc), ("rest", via_rest))}
            results = {key: f.result(60) for key, f in futures.items()}
        channel.close()
    for (how, i), emb in results.items():
        np.testing.assert_allclose(emb, model.embed(pixels[i:i + 2]), atol=1e-5, err_msg=how)
        np.testing.assert_allclose(emb, results[("grpc", i)], atol=1e-6)  # batches differ run to run


def test_worker_pool_lets_a_full_batch_form(tmp_path):
    """A request waiting for its batch holds a gRPC worker thread: with batching the pool has
    at least 2 * max_batch_size threads, so 4 concurrent clients fill a batch of 4 although
    --grpc_max_threads is 2 (before: 2 rows waited for the 10 s batch timeout)."""
    build_fixture_model(tmp_path / "atl", 1)
    config = ServerConfig(
        [ServedModel("atl", str(tmp_path / "atl"))], port=0, file_system_poll_wait_seconds=0, grpc_max_threads=2,
        batching=BatchingParameters(max_batch_size=4, num_batch_threads=1, batch_timeout_micros=10_000_000),
    )
    pngs = [encode_png(p) for p in random_pixels(4, seed=5)]
    with ModelServer(config) as server:
        assert server.worker_threads == 8
        sizes: list[int] = []
        run = server.batcher._run_signature

        def recording(signature, arrays):
            sizes.append(len(arrays["images"]))
            return run(signature, arrays)

        server.batcher._run_signature = recording
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def predict(png: bytes) -> None:
            req = predict_pb2.PredictRequest()
            req.model_spec.name = "atl"
            req.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array([png], dtype=object)))
            stub.Predict(req, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for future in [pool.submit(predict, png) for png in pngs]:
                future.result(60)
        channel.close()
    assert sizes == [4]

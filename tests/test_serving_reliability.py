"""Serving under hostile input and at start-up (issue 27): decoded-size bounds for every
accepted format, ports that open only once the models are AVAILABLE, REST's JSON types."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from atl_keras.serving import image_header
from atl_keras.serving.image_header import image_dimensions
from atl_keras.serving.model_config import ServedModel, TLSConfig
from atl_keras.serving.server import ModelServer, ServerConfig, main
from serving_fixtures import build_fixture_model, encode_png, random_pixels

BUDGET = 100_000


def gif(frames: int, size: int, screen: int | None = None) -> bytes:
    """An animated GIF of `frames` flat `size` x `size` frames; `screen` overwrites the logical screen."""
    images = [Image.fromarray(np.full((size, size, 3), 40 * i % 256, np.uint8)).convert("P") for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], optimize=False, disposal=1)
    data = bytearray(buf.getvalue())
    if screen is not None:
        data[6:10] = np.array([screen, screen], "<u2").tobytes()
    return bytes(data)


def jpeg(size: int, progressive: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(size).integers(0, 256, (size, size, 3), np.uint8)).save(
        buf, format="JPEG", progressive=progressive)
    return buf.getvalue()


def webp(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="WEBP")
    return buf.getvalue()


# --------------------------------------------------------------------------- decoded-size bounds (item 3)


def test_gif_bound_counts_every_frame_at_the_size_tensorflow_decodes():
    for data, frames, side in [(gif(1, 300, screen=1), 1, 300), (gif(6, 120), 6, 120), (gif(1, 50), 1, 50)]:
        pixels, description = image_header.decoded_pixels(data)
        decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
        assert tuple(decoded.shape[:2]) == (side, side)  # TensorFlow's output: the largest frame, not the screen
        assert pixels == side * side + frames * side * side // 3, description
        assert f"{side}x{side}" in description
    assert image_dimensions(gif(1, 300, screen=1)) == (1, 1)  # what the header alone says


def test_jpeg_bounds_progressive_and_extraneous_bytes():
    baseline, progressive = jpeg(64), jpeg(64, progressive=True)
    assert image_header.decoded_pixels(baseline) == (64 * 64, "a 64x64 image")
    assert image_header.decoded_pixels(progressive)[0] == 3 * 64 * 64  # libjpeg buffers every coefficient
    length = int.from_bytes(baseline[4:6], "big")  # APP0 segment; libjpeg skips stray bytes after it
    padded = baseline[:4 + length] + b"\x00\x13\x37" + baseline[4 + length:]
    assert image_header.decoded_pixels(padded)[0] == 64 * 64
    assert image_dimensions(padded) == (64, 64)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("bounds") / "atl"
    build_fixture_model(base, 1)
    server = ModelServer(ServerConfig([ServedModel("atl", str(base))], port=0, rest_api_port=0,
                                      file_system_poll_wait_seconds=0, max_image_pixels=BUDGET)).start()
    yield server
    server.stop(grace=0)


def grpc_predict(server: ModelServer, images: list[bytes]) -> tuple[grpc.StatusCode, str]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "atl"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array(images, dtype=object), dtype=tf.string))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        try:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        except grpc.RpcError as err:
            return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def rest_call(port: int, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def rest_predict(server: ModelServer, images: list[bytes], **extra) -> tuple[int, dict]:
    body = {"inputs": {"images": [{"b64": base64.b64encode(i).decode()} for i in images], **extra}}
    if not extra:
        body = {"instances": [{"b64": base64.b64encode(i).decode()} for i in images]}
    return rest_call(server.rest_port, "/v1/models/atl:predict", body)


@pytest.mark.parametrize("name, data, what", [
    ("1x1 screen, one 400x400 frame", lambda: gif(1, 400, screen=1), "a 400x400 GIF"),
    ("ten 200x200 frames", lambda: gif(10, 200), "a GIF of 10 frames up to 200x200"),
    ("progressive 200x200 JPEG", lambda: jpeg(200, progressive=True), "a 200x200 progressive JPEG"),
])
def test_images_whose_decode_exceeds_the_budget_are_refused_on_grpc_and_rest(server, name, data, what):
    data = data()
    small = encode_png(random_pixels(1)[0])
    code, details = grpc_predict(server, [small, data])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"inputs['images'][1] is {what}" in details, details
    assert "--max_image_pixels" in details
    status, body = rest_predict(server, [small, data])
    assert status == 400 and what in body["error"], body


def test_images_within_the_budget_and_other_formats(server):
    for ok in (gif(1, 200), gif(2, 100), jpeg(200), jpeg(100, progressive=True)):
        assert grpc_predict(server, [ok]) == (grpc.StatusCode.OK, "")
        assert rest_predict(server, [ok])[0] == 200
    code, details = grpc_predict(server, [webp(16)])  # refused before any decoder sees it
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not an encoded JPEG, PNG, GIF or BMP" in details


# --------------------------------------------------------------------------- REST JSON types (item 8)


@pytest.mark.parametrize("k", [5.7, "5", True, None])
def test_rest_refuses_a_non_integer_k_like_tf_serving(server, k):
    image = encode_png(random_pixels(1)[0])
    status, body = rest_call(server.rest_port, "/v1/models/atl:predict", {
        "signature_name": "retrieve_exact", "inputs": {"images": [{"b64": base64.b64encode(image).decode()}], "k": k}})
    assert status == 400 and "inputs['k']" in body["error"] and "integers" in body["error"], body
    status, body = rest_call(server.rest_port, "/v1/models/atl:predict", {
        "signature_name": "retrieve_exact", "inputs": {"images": [{"b64": base64.b64encode(image).decode()}], "k": 3}})
    assert status == 200 and len(body["outputs"]["ids"][0]) == 3


@pytest.mark.parametrize("depth", [100, 5_000, 200_000])
def test_rest_deeply_nested_json_is_400_not_500(server, depth, caplog):
    body = b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"
    with caplog.at_level(logging.ERROR, logger="atl_keras.serving.rest"):
        status, answer = rest_call(server.rest_port, "/v1/models/atl:predict", body)
    assert status == 400, answer
    assert not [r for r in caplog.records if r.exc_info]  # no traceback logged


def test_rest_api_port_error_says_zero_is_off(tmp_path, capsys):
    assert main(["--model_base_path", str(tmp_path), "--rest_api_port", "-1"]) == 2
    err = capsys.readouterr().err
    assert "0 for no REST API" in err and "free port" not in err, err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_plaintext_rest_beside_mutual_tls_grpc_warns_at_start(tmp_path, caplog):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True, timeout=60)
    build_fixture_model(tmp_path / "atl", 1)
    tls = TLSConfig(key.read_bytes(), cert.read_bytes(), custom_ca=cert.read_bytes(), client_verify=True)
    for rest_port, warned in ((0, True), (None, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="atl_keras.serving.server"):
            server = ModelServer(ServerConfig([ServedModel("atl", str(tmp_path / "atl"))], port=0, tls=tls,
                                              rest_api_port=rest_port, file_system_poll_wait_seconds=0)).start()
            server.stop(grace=0).wait(10)
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("plaintext" in m and "mutual TLS" in m for m in messages) == warned, messages


# --------------------------------------------------------------------------- readiness (item 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlowLoadingServer(ModelServer):
    """A real server whose initial load takes 2 s longer (a big model), and says when it ended."""

    loaded_at: float | None = None

    def _prepare_version(self, loaded) -> None:
        time.sleep(2.0)
        super()._prepare_version(loaded)
        self.loaded_at = time.monotonic()


def test_ports_open_only_once_the_initial_models_are_available(tmp_path):
    build_fixture_model(tmp_path / "atl", 1)
    grpc_port, rest_port = free_port(), free_port()
    server = SlowLoadingServer(ServerConfig([ServedModel("atl", str(tmp_path / "atl"))], host="127.0.0.1",
                                            port=grpc_port, rest_api_port=rest_port, file_system_poll_wait_seconds=0))
    first_accept: dict[int, float] = {}
    started = threading.Thread(target=server.start)
    started.start()
    try:
        deadline = time.monotonic() + 120
        while len(first_accept) < 2 and time.monotonic() < deadline:
            for port in (grpc_port, rest_port):
                if port in first_accept:
                    continue
                with socket.socket() as probe:  # a TCP readiness probe
                    probe.settimeout(0.5)
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        first_accept[port] = time.monotonic()
                        if port == rest_port:  # the first HTTP answer already says AVAILABLE
                            status, body = rest_call(rest_port, "/v1/models/atl")
                            assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE", body
                        else:
                            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                                health = health_pb2_grpc.HealthStub(channel).Check(
                                    health_pb2.HealthCheckRequest(service=""), timeout=10)
                            assert health.status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.05)
        started.join(timeout=120)
        assert set(first_accept) == {grpc_port, rest_port}
        assert server.loaded_at is not None
        assert all(t >= server.loaded_at for t in first_accept.values()), (first_accept, server.loaded_at)
    finally:
        started.join(timeout=120)
        server.stop(grace=0).wait(10)

"""Server faults found in production-like use (issue 13), each pinned by a test.

Every server here is small and private to its test; version polling is driven by
calling ``server.manager.poll()`` directly so nothing depends on timing.
"""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import subprocess

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from atl_keras.serving import client
from atl_keras.serving.image_header import image_dimensions
from atl_keras.serving.model_config import ServedModel, TLSConfig
from atl_keras.serving.server import ModelServer, ServerConfig, build_arg_parser, config_from_args, main
from serving_fixtures import build_fixture_model, encode_png, png_header, random_pixels, replace_version

PIXELS = random_pixels(2, seed=3)
PNGS = [encode_png(p) for p in PIXELS]


def _server(base: pathlib.Path, **kw) -> ModelServer:
    kw.setdefault("file_system_poll_wait_seconds", 0)
    return ModelServer(ServerConfig([ServedModel("atl", str(base))], port=0, **kw)).start()


def _embed(server: ModelServer, pngs=PNGS) -> tuple[int, np.ndarray]:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "atl"
    req.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array(pngs, dtype=object), dtype=tf.string))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        resp = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(req, timeout=30)
    return resp.model_spec.version.value, tf.make_ndarray(resp.outputs["embeddings"])


def _status(server: ModelServer) -> dict[int, str]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        return client.get_model_status(channel, "atl")


# --------------------------------------------------------------------------- versions on disk


def test_force_reexport_over_served_version_is_reloaded(tmp_path):
    base = tmp_path / "atl"
    old = build_fixture_model(base, 1, seed=1)
    server = _server(base)
    try:
        np.testing.assert_allclose(_embed(server)[1], old.embed(PIXELS), atol=1e-5)
        new = replace_version(base, 1, seed=7)  # same version number, new weights
        server.manager.poll()
        version, emb = _embed(server)
        assert version == 1
        np.testing.assert_allclose(emb, new.embed(PIXELS), atol=1e-5)
        assert _status(server) == {1: "AVAILABLE"}
        with server.manager.acquire("atl") as reloaded:
            pass
        server.manager.poll()  # unchanged since: no second reload
        with server.manager.acquire("atl") as again:
            assert again is reloaded
    finally:
        server.stop(grace=0)


def test_base_directory_briefly_missing_keeps_the_loaded_version(tmp_path):
    base = tmp_path / "atl"
    model = build_fixture_model(base, 1)
    server = _server(base)
    try:
        away = tmp_path / "atl.away"
        os.rename(base, away)
        for _ in range(3):
            server.manager.poll()
        version, emb = _embed(server)
        assert version == 1
        np.testing.assert_allclose(emb, model.embed(PIXELS), atol=1e-5)
        assert _status(server) == {1: "AVAILABLE"}
        base.mkdir()  # present but empty: the same
        server.manager.poll()
        assert _embed(server)[0] == 1
        base.rmdir()
        os.rename(away, base)
        server.manager.poll()
        assert _status(server) == {1: "AVAILABLE"}
    finally:
        server.stop(grace=0)


def test_broken_newest_version_at_start_falls_back_to_newest_loadable(tmp_path):
    base = tmp_path / "atl"
    good = build_fixture_model(base, 1)
    build_fixture_model(base, 2)
    (base / "3").mkdir()
    (base / "3" / "saved_model.pb").write_bytes(b"not a SavedModel")
    shutil.rmtree(base / "2" / "variables")  # 2 is broken too: 1 is the newest that loads
    server = _server(base)
    try:
        states = server.manager.version_states("atl")
        assert {v: s[1] != "" for v, s in states.items()} == {3: True, 2: True, 1: False}
        assert _status(server) == {3: "END", 2: "END", 1: "AVAILABLE"}
        version, emb = _embed(server)
        assert version == 1
        np.testing.assert_allclose(emb, good.embed(PIXELS), atol=1e-5)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="atl"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # version 3 is fixed on disk: it becomes the served version and 1 is unloaded
        shutil.rmtree(base / "3")
        fixed = build_fixture_model(base, 3)
        server.manager.poll()
        assert _status(server)[3] == "AVAILABLE" and _status(server)[1] == "END"
        np.testing.assert_allclose(_embed(server)[1], fixed.embed(PIXELS), atol=1e-5)
    finally:
        server.stop(grace=0)


# --------------------------------------------------------------------------- ports and TLS flags


def test_second_server_on_an_occupied_port_is_refused(tmp_path):
    build_fixture_model(tmp_path / "atl", 1)
    first = _server(tmp_path / "atl")
    try:
        second = ModelServer(ServerConfig([ServedModel("atl", str(tmp_path / "atl"))], port=first.port,
                                          file_system_poll_wait_seconds=0))
        with pytest.raises(OSError, match="in use"):
            second.start()
        assert _embed(first)[0] == 1  # the first server is untouched
    finally:
        first.stop(grace=0)


@pytest.mark.parametrize("port", [99999, 65536, -1])
def test_port_out_of_range_is_refused(tmp_path, port, capsys):
    with pytest.raises(ValueError, match="1..65535"):
        ServerConfig([ServedModel("atl", str(tmp_path))], port=port)
    assert main(["--port", str(port), "--model_base_path", str(tmp_path)]) == 2
    assert "1..65535" in capsys.readouterr().err


def test_ssl_ca_without_cert_and_key_is_refused(tmp_path, capsys):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    args = build_arg_parser().parse_args(["--model_base_path", str(tmp_path), "--ssl_ca", str(ca)])
    with pytest.raises(ValueError, match="--ssl_cert and --ssl_key"):
        config_from_args(args)
    assert main(["--model_base_path", str(tmp_path), "--ssl_ca", str(ca), "--port", "0"]) == 2
    assert "plaintext" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_query_with_client_certificate_mutual_tls(tmp_path, capsys):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    model = build_fixture_model(tmp_path / "atl", 1)
    (tmp_path / "q.png").write_bytes(PNGS[0])
    tls = TLSConfig(key.read_bytes(), cert.read_bytes(), custom_ca=cert.read_bytes(), client_verify=True)
    server = _server(tmp_path / "atl", tls=tls)
    try:
        argv = ["--server", f"127.0.0.1:{server.port}", "--model", "atl", "--image", str(tmp_path / "q.png"),
                "--k", "2", "--signature", "retrieve_exact", "--tls-ca", str(cert), "--timeout", "20"]
        assert client.main([*argv, "--tls-cert", str(cert), "--tls-key", str(key)]) == 0
        rows = capsys.readouterr().out.splitlines()[2:]
        assert [r.split()[2] for r in rows] == model.retrieve(PIXELS[:1], 2)[0][0].tolist()
        assert client.main(argv) == 1  # no client certificate: the handshake is refused
        assert client.main([*argv, "--tls-cert", str(cert)]) == 2
        assert "--tls-key" in capsys.readouterr().err
    finally:
        server.stop(grace=0)


# --------------------------------------------------------------------------- image pixel budget


def _encode(fmt: str, width: int, height: int) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    image.save(buf, format=fmt, **({"progressive": True} if fmt == "JPEG" and width % 2 else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (64, 33), (300, 17)])
def test_image_dimensions_match_the_decoder(fmt, size):
    data = _encode(fmt, *size)
    assert image_dimensions(data) == Image.open(io.BytesIO(data)).size == size


def test_image_dimensions_of_truncated_or_unknown_bytes():
    assert image_dimensions(b"\x89PNG\r\n\x1a\n") is None
    assert image_dimensions(b"\xff\xd8\xff\xe0\x00\x10JFIF") is None
    assert image_dimensions(b"RIFF....WEBP") is None
    assert image_dimensions(png_header(10000, 10000)) == (10000, 10000)


def test_images_over_the_pixel_budget_are_refused_before_decoding(tmp_path):
    build_fixture_model(tmp_path / "atl", 1)
    server = _server(tmp_path / "atl", max_image_pixels=100)  # the fixture's 8x8 images pass
    try:
        assert _embed(server)[0] == 1
        for big, what in [(png_header(10000, 10000), "10000x10000"), (_encode("JPEG", 16, 16), "16x16")]:
            with pytest.raises(grpc.RpcError) as info:
                _embed(server, [PNGS[0], big])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"inputs['images'][1] is a {what} image" in info.value.details()
            assert "--max_image_pixels" in info.value.details()
    finally:
        server.stop(grace=0)

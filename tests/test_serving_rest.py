"""TF Serving's REST API over real HTTP on 127.0.0.1 (stdlib ``urllib`` as the client).

Checked against TF Serving's documented examples (``half_plus_three``: status,
``{"instances": [1.0, 2.0, 5.0]}`` -> ``{"predictions": [3.5, 4.0, 5.5]}``, the 404 for
an unknown model) and against the gRPC side: the same request gives the same
embeddings, and a bad request the same message with the HTTP status of its gRPC code.
"""

from __future__ import annotations

import base64
import json
import pathlib
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from atl_keras.serving.model_config import parse_model_config
from atl_keras.serving.rest import HTTP_STATUS, array_from_json
from atl_keras.serving.server import ModelServer, ServerConfig
from serving_fixtures import build_fixture_model, encode_png, random_pixels

MODELS_CONFIG = """
model_config_list {
  config { name: "atl" base_path: "atl" model_platform: "tensorflow"
           model_version_policy { all {} } version_labels { key: "stable" value: 1 } }
  config { name: "saved_model_half_plus_three" base_path: "half_plus_three" model_platform: "tensorflow" }
}
"""


def _half_plus_three(base: pathlib.Path) -> None:
    """TF Serving's test model: ``y = 0.5 x + 3`` on float32 ``x [None]``, version 123."""
    module = tf.Module()
    module.fn = tf.function(lambda x: {"y": 0.5 * x + 3.0}, input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    tf.saved_model.save(module, str(base / "123"), signatures={"serving_default": module.fn.get_concrete_function()})


class Rest:
    def __init__(self, root: pathlib.Path):
        self.atl = {v: build_fixture_model(root / "atl", v) for v in (1, 2)}
        _half_plus_three(root / "half_plus_three")
        self.server = ModelServer(ServerConfig(
            parse_model_config(MODELS_CONFIG, relative_to=root), port=0, rest_api_port=0,
            file_system_poll_wait_seconds=0, max_batch_size=8,
        )).start()
        self.url = f"http://127.0.0.1:{self.server.rest_port}"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.pixels = random_pixels(3, seed=8)
        self.pngs = [encode_png(p) for p in self.pixels]
        self.b64 = [{"b64": base64.b64encode(p).decode()} for p in self.pngs]

    def call(self, path: str, body=None, method: str | None = None) -> tuple[int, dict]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"))
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert resp.headers["Content-Type"] == "application/json"
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            assert err.headers["Content-Type"] == "application/json"
            return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def rest(tmp_path_factory):
    r = Rest(tmp_path_factory.mktemp("rest"))
    yield r
    r.channel.close()
    r.server.stop(grace=0).wait(10)


# --------------------------------------------------------------------------- TF Serving's documented examples


def test_documented_status_example(rest):
    assert rest.call("/v1/models/saved_model_half_plus_three") == (200, {
        "model_version_status": [
            {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    })


def test_documented_predict_example(rest):
    code, body = rest.call("/v1/models/saved_model_half_plus_three:predict", {"instances": [1.0, 2.0, 5.0]})
    assert (code, body) == (200, {"predictions": [3.5, 4.0, 5.5]})
    code, body = rest.call("/v1/models/saved_model_half_plus_three/versions/123:predict", {"inputs": [1.0, 5.0]})
    assert (code, body) == (200, {"outputs": [3.5, 5.5]})


def test_documented_unknown_model_is_404(rest):
    code, body = rest.call("/v1/models/half:predict", {"instances": [1.0, 5.0]})
    assert code == 404 and "'half'" in body["error"]


# --------------------------------------------------------------------------- status, metadata, predict


def test_status_versions_and_labels(rest):
    code, body = rest.call("/v1/models/atl")
    assert code == 200
    assert [(s["version"], s["state"]) for s in body["model_version_status"]] == [("2", "AVAILABLE"), ("1", "AVAILABLE")]
    assert rest.call("/v1/models/atl/versions/1")[1]["model_version_status"][0]["version"] == "1"
    assert rest.call("/v1/models/atl/labels/stable")[1]["model_version_status"][0]["version"] == "1"
    assert rest.call("/v1/models/atl/versions/9")[0] == 404
    assert rest.call("/v1/models/atl/labels/canary")[0] == 404


def test_metadata(rest):
    code, body = rest.call("/v1/models/atl/metadata")
    assert code == 200
    assert body["model_spec"] == {"name": "atl", "signature_name": "", "version": "2"}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "embed_pixels", "retrieve", "retrieve_exact"} <= set(sigs)
    assert sigs["retrieve"]["inputs"]["k"]["dtype"] == "DT_INT32"
    assert [d["size"] for d in sigs["embed_pixels"]["inputs"]["pixels"]["tensor_shape"]["dim"]] == ["-1", "8", "8", "3"]
    assert rest.call("/v1/models/atl/versions/1/metadata")[1]["model_spec"]["version"] == "1"


def test_predict_row_format_equals_grpc_bit_for_bit(rest):
    from atl_keras.serving import client

    code, body = rest.call("/v1/models/atl:predict", {"instances": rest.b64})
    assert code == 200
    emb = np.array(body["predictions"], dtype=np.float32)
    np.testing.assert_allclose(emb, rest.atl[2].embed(rest.pixels), atol=1e-5)
    np.testing.assert_array_equal(emb, client.embed(rest.stub, "atl", rest.pngs))
    # named instances, a version label, another signature
    body = rest.call("/v1/models/atl/labels/stable:predict", {
        "signature_name": "embed_pixels", "instances": [{"pixels": p.tolist()} for p in rest.pixels.astype(float)],
    })[1]
    np.testing.assert_allclose(body["predictions"], rest.atl[1].embed(rest.pixels), atol=1e-5)


def test_predict_columnar_retrieve(rest):
    code, body = rest.call("/v1/models/atl:predict", {
        "signature_name": "retrieve_exact", "inputs": {"images": rest.b64, "k": 4},
    })
    assert code == 200
    ids, scores, indices = rest.atl[2].retrieve(rest.pixels, 4)
    out = body["outputs"]
    assert out["ids"] == ids.astype(str).tolist()
    assert out["indices"] == indices.tolist()
    np.testing.assert_allclose(out["scores"], scores, atol=1e-5)


def test_array_from_json():
    np.testing.assert_array_equal(array_from_json([[1, 2], [3, 4]], tf.float32, "x"), np.array([[1, 2], [3, 4]], np.float32))
    strings = array_from_json([{"b64": base64.b64encode(b"\x00\xff").decode()}, "text"], tf.string, "s")
    assert strings.tolist() == [b"\x00\xff", b"text"]
    assert array_from_json([], tf.string, "s").shape == (0,)
    for value, dtype, message in [
        ([[1, 2], [3]], tf.float32, "non-ragged"),
        ([["a"], ["b", "c"]], tf.string, "ragged"),
        ([1.0], tf.string, "where a string is expected"),
        ([{"b64": "***"}], tf.string, "invalid base64"),
        ([{"b64": "AA==", "x": 1}], tf.string, "binary values"),
        (["a"], tf.float32, "numbers"),
    ]:
        with pytest.raises(Exception, match=message):
            array_from_json(value, dtype, "x")


# --------------------------------------------------------------------------- errors: same as gRPC


def _grpc_error(rest, body: dict) -> tuple[grpc.StatusCode, str]:
    from atl_keras.serving import client

    signature = body.get("signature_name", "serving_default")
    inputs = body["inputs"]
    dtypes = {"images": tf.string, "k": tf.int32, "pixels": tf.float32}
    arrays = {}
    for key, value in inputs.items():
        if key == "images":
            value = np.array([base64.b64decode(v["b64"]) if isinstance(v, dict) else v.encode() for v in value], dtype=object)
        arrays[key] = value
    with pytest.raises(grpc.RpcError) as info:
        client.predict(rest.stub, "atl", arrays, signature=signature, dtypes={k: dtypes.get(k) for k in arrays})
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("case", ["unknown signature", "missing input", "extra input", "batch too large",
                                  "not an image", "truncated image", "k zero", "k over gallery", "wrong shape"])
def test_bad_requests_answer_like_grpc(rest, case):
    png = rest.b64[0]
    truncated = {"b64": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20).decode()}
    bodies = {
        "unknown signature": {"signature_name": "nope", "inputs": {"images": [png]}},
        "missing input": {"signature_name": "retrieve", "inputs": {"images": [png]}},
        "extra input": {"inputs": {"images": [png], "k": 3}},
        "batch too large": {"inputs": {"images": [png] * 9}},
        "not an image": {"inputs": {"images": [png, "not an image"]}},
        "truncated image": {"inputs": {"images": [truncated]}},
        "k zero": {"signature_name": "retrieve", "inputs": {"images": [png], "k": 0}},
        "k over gallery": {"signature_name": "retrieve_exact", "inputs": {"images": [png], "k": 13}},
        "wrong shape": {"signature_name": "embed_pixels", "inputs": {"pixels": np.zeros((1, 4, 4, 3)).tolist()}},
    }
    code, body = rest.call("/v1/models/atl:predict", bodies[case])
    grpc_code, grpc_message = _grpc_error(rest, bodies[case])
    assert code == HTTP_STATUS[grpc_code], (case, body)
    assert body == {"error": grpc_message}


def test_rest_only_errors(rest):
    for body, message in [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ({"instances": [1], "inputs": [1]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"signature_name": "retrieve", "instances": [{"images": rest.b64[0], "k": 3}]}, "inputs['k'] has rank 1"),
        ({"instances": [{"images": rest.b64[0]}, {"other": 1}]}, "must name the same inputs"),
        ({"inputs": [1.0]}, "where a string is expected"),
    ]:
        code, answer = rest.call("/v1/models/atl:predict", body)
        assert code == 400 and message in answer["error"], (body, answer)
    assert rest.call("/v1/models/atl:classify", {"examples": []})[0] == 501
    assert rest.call("/v1/models/atl:regress", {"examples": []})[0] == 501
    code, answer = rest.call("/v2/whatever")
    assert code == 404 and "Malformed request" in answer["error"]
    code, answer = rest.call("/v1/models/atl:predict", method="GET")
    assert code == 405 and "error" in answer

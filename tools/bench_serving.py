"""Benchmark serving: in-process vs served (gRPC and REST), with and without batching.

    .venv/bin/python tools/bench_serving.py                     # ~3 min on 2 cores
    .venv/bin/python tools/bench_serving.py --export-base saved_models/shop --model shop

One ``retrieve`` request = one JPEG query image, k=10. In one run, on 127.0.0.1 only:

1. An export (``atl_keras.export.export_model``: ATLModel small_cnn 64x64x3, ScaNN over
   ``--gallery`` items) is written to a temp dir, unless ``--export-base`` is given.
2. Two server processes (``python -m atl_keras.serving.server``, gRPC + REST): batching
   off, and ``--enable_batching`` with ``--batching_parameters_file``.
3. Contenders, interleaved and repeated ``--rounds`` times, each for ``--seconds`` per
   cell at concurrency 1, 8, 32: in-process (the same SavedModel's ``retrieve`` called in
   this process), gRPC (stock ``tensorflow_serving`` stubs), REST (``http.client``
   keep-alive, ``{"inputs": {"images": [{"b64": ...}], "k": 10}}``).
4. Cold start: a fresh server process, first request after health says SERVING vs the
   median warm request, with warmup on (default) and off.

Prints p50/p90/p99 latency (ms) and throughput (req/s) per cell, then the ratios the
serving issue asks for.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_export(base: pathlib.Path, gallery: int, size: int) -> None:
    import keras

    import atl_keras as atl
    from atl_keras.export import export_model

    keras.utils.set_random_seed(0)
    model = atl.ATLModel(backbone="small_cnn", input_shape=(size, size, 3), embedding_dim=64)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (gallery, size, size, 3), dtype=np.uint8).astype(np.float32)
    export_model(model, images, [f"item-{i:06d}" for i in range(gallery)], str(base), version=1, k=10,
                 min_recall=0.0)


class Server:
    """A server subprocess with gRPC and REST on free 127.0.0.1 ports."""

    def __init__(self, base: pathlib.Path, model: str, extra: list[str]):
        self.port, self.rest_port = free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atl_keras.serving.server", "--port", str(self.port),
             "--rest_api_port", str(self.rest_port), "--model_name", model, "--model_base_path", str(base),
             "--file_system_poll_wait_seconds", "0", "--log_level", "WARNING", *extra],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def wait_serving(self, timeout: float = 900) -> float:
        """Block until health says SERVING; returns the time it happened (perf_counter)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == 1:
                        return time.perf_counter()
                except grpc.RpcError:
                    pass
                time.sleep(0.02)
        raise TimeoutError("server did not become SERVING")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def grpc_caller(port: int, model: str, image: bytes, k: int):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=60)  # connected: no handshake in the first call
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "retrieve"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
    request.inputs["k"].CopyFrom(tf.make_tensor_proto(k, dtype=tf.int32))

    def call() -> None:
        stub.Predict(request, timeout=30)

    return call


def rest_caller(port: int, model: str, image: bytes, k: int):
    body = json.dumps({"signature_name": "retrieve",
                       "inputs": {"images": [{"b64": base64.b64encode(image).decode()}], "k": k}}).encode()
    local = threading.local()

    def call() -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", f"/v1/models/{model}:predict", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(data)

    return call


def inprocess_caller(base: pathlib.Path, image: bytes, k: int):
    import scann  # noqa: F401  (registers ScaNN's ops)
    import tensorflow as tf

    version = max(int(p.name) for p in base.iterdir() if p.name.isdigit())
    fn = tf.saved_model.load(str(base / str(version))).signatures["retrieve"]
    images, k_t = tf.constant([image]), tf.constant(k, tf.int32)

    def call() -> None:
        out = fn(images=images, k=k_t)
        out["ids"].numpy(), out["scores"].numpy()

    return call


def overhead_breakdown(base: pathlib.Path, port: int, model: str, image: bytes, k: int, n: int = 300) -> dict:
    """Where a served request's time goes beyond the model, measured interleaved in this process.

    transport: a no-op RPC (GetModelStatus) round trip to the server; validation:
    TensorProtos -> checked arrays; call: ``run_signature`` minus calling the signature on
    ready tensors; response: outputs -> PredictResponse bytes.
    """
    import grpc
    import scann  # noqa: F401
    import tensorflow as tf
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, predict_pb2

    from atl_keras.serving.loader import LoadedVersion
    from atl_keras.serving.requests import prepare_inputs, run_signature, tensor_proto

    version = max(int(p.name) for p in base.iterdir() if p.name.isdigit())
    loaded = LoadedVersion(model, version, base / str(version))
    signature = loaded.signatures["retrieve"]
    request = predict_pb2.PredictRequest()
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
    request.inputs["k"].CopyFrom(tf.make_tensor_proto(k, dtype=tf.int32))
    arrays = prepare_inputs(signature, request.inputs, manifest=loaded.manifest)
    tensors = {"images": tf.constant([image]), "k": tf.constant(k, tf.int32)}
    outputs = run_signature(signature, arrays)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    status = model_service_pb2_grpc.ModelServiceStub(channel)
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = model

    def respond() -> None:
        response = predict_pb2.PredictResponse()
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tensor_proto(value))
        response.SerializeToString()

    steps = {
        "transport (no-op RPC)": lambda: status.GetModelStatus(status_request, timeout=10),
        "validation": lambda: prepare_inputs(signature, request.inputs, manifest=loaded.manifest),
        "signature via run_signature": lambda: run_signature(signature, arrays),
        "signature on ready tensors": lambda: {k2: v.numpy() for k2, v in signature.function(**tensors).items()},
        "response": respond,
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    channel.close()
    return {name: float(np.median(v)) * 1e3 for name, v in times.items()}


def measure(call, concurrency: int, seconds: float) -> tuple[list[float], float]:
    """Run ``call`` from ``concurrency`` threads for ``seconds``; (latencies in s, req/s)."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker() -> None:
        mine = []
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            call()
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, len(latencies) / (time.perf_counter() - start)


def cold_start(base: pathlib.Path, model: str, image: bytes, k: int, warmup: bool) -> tuple[float, float]:
    server = Server(base, model, ["--enable_model_warmup", "true" if warmup else "false"])
    try:
        server.wait_serving()
        call = grpc_caller(server.port, model, image, k)
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        warm = []
        for _ in range(30):
            t0 = time.perf_counter()
            call()
            warm.append(time.perf_counter() - t0)
        return first, float(np.median(warm))
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-base", default=None, help="serve this export instead of building one")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--gallery", type=int, default=20000, help="items in the built export")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.5, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batching", default="max_batch_size { value: 32 } batch_timeout_micros { value: 0 } "
                        "num_batch_threads { value: 1 } max_enqueued_batches { value: 64 }",
                        help="BatchingParameters text for the batching server")
    args = parser.parse_args()

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-serving-"))
    if args.export_base:
        base = pathlib.Path(args.export_base).absolute()
    else:
        base = tmp / args.model
        t0 = time.perf_counter()
        build_export(base, args.gallery, args.image_size)
        print(f"export: {args.gallery} items, {args.image_size}x{args.image_size} in {time.perf_counter() - t0:.1f}s",
              flush=True)
    size = args.image_size
    image = jpeg(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))

    params = tmp / "batching.txt"
    params.write_text(args.batching)
    servers = {"off": Server(base, args.model, []),
               "on": Server(base, args.model, ["--enable_batching", "--batching_parameters_file", str(params)])}
    try:
        for s in servers.values():
            s.wait_serving()
        callers = {"in-process": inprocess_caller(base, image, args.k)}
        for batching, s in servers.items():
            callers[f"gRPC batching={batching}"] = grpc_caller(s.port, args.model, image, args.k)
            callers[f"REST batching={batching}"] = rest_caller(s.rest_port, args.model, image, args.k)
        for call in callers.values():  # connect and warm each path
            for _ in range(20):
                call()
        breakdown = overhead_breakdown(base, servers["off"].port, args.model, image, args.k)
        results: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
        for _ in range(args.rounds):
            for c in CONCURRENCY:
                for name, call in callers.items():
                    lat, rps = measure(call, c, args.seconds)
                    entry = results.setdefault((name, c), ([], []))
                    entry[0].extend(lat)
                    entry[1].append(rps)
    finally:
        for s in servers.values():
            s.close()

    def p(name: str, c: int, q: float) -> float:
        return float(np.percentile(results[(name, c)][0], q)) * 1e3

    def rps(name: str, c: int) -> float:
        return float(np.mean(results[(name, c)][1]))

    print(f"\n{'contender':24s} {'c':>3s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'req/s':>8s}")
    for c in CONCURRENCY:
        for name in callers:
            print(f"{name:24s} {c:3d} {p(name, c, 50):8.2f} {p(name, c, 90):8.2f} {p(name, c, 99):8.2f} {rps(name, c):8.1f}")
    print()
    base_p50 = p("in-process", 1, 50)
    for name in callers:
        if name != "in-process":
            print(f"c=1 p50 {name} / in-process: {p(name, 1, 50) / base_p50:.2f}  (target <= 1.2)")
    for how in ("gRPC", "REST"):
        name = f"{how} batching=on"
        print(f"{name}: c=32 / c=1 throughput {rps(name, 32) / rps(name, 1):.2f} (target >= 3), "
              f"c=32 p99 {p(name, 32, 99):.1f} ms (target <= 100)")

    print("\nwhere a served request's time goes (p50 ms, interleaved):")
    for name, ms in breakdown.items():
        print(f"  {name:30s} {ms:7.3f}")
    print(f"  => conversion around the signature call: "
          f"{breakdown['signature via run_signature'] - breakdown['signature on ready tensors']:.3f} ms")
    print()
    for warmup in (True, False):
        first, warm = cold_start(base, args.model, image, args.k, warmup)
        print(f"first request after SERVING, warmup={'on' if warmup else 'off'}: {first * 1e3:.1f} ms, "
              f"warm p50 {warm * 1e3:.2f} ms, ratio {first / warm:.2f}" + ("  (target <= 2)" if warmup else ""))


if __name__ == "__main__":
    main()

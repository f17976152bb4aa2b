"""The model server (TF Serving's ``main`` + ``server.cc``): flags, config, gRPC server.

A gRPC model server speaking TensorFlow Serving's API, for atl SavedModel exports.

    python -m atl_keras.serving.server --port 8500 --model_name atl --model_base_path saved_models/atl
    python -m atl_keras.serving.server --port 8500 --model_config_file serving/models.config

Services (official ``tensorflow_serving.apis`` protos, so any TF Serving client works):

- ``tensorflow.serving.PredictionService``: ``Predict``, ``GetModelMetadata``
  (``signature_def``); ``Classify``, ``Regress``, ``MultiInference`` -> UNIMPLEMENTED.
- ``tensorflow.serving.ModelService``: ``GetModelStatus``;
  ``HandleReloadConfigRequest`` -> UNIMPLEMENTED.
- ``grpc.health.v1.Health``: SERVING once every configured model has a version loaded.

Versions: ``<base_path>/<N>/`` integer directories holding a SavedModel. The base paths
are polled every ``--file_system_poll_wait_seconds``; new versions load in the background
and are swapped in atomically. A request holds a reference to the version it runs on, so
nothing in flight fails during a swap, and an old version is only dropped (UNLOADING ->
END) once it is no longer aspired, a newer one is AVAILABLE and its in-flight count is 0.

Library use::

    from atl_keras.serving import ModelServer, ServerConfig, single_model
    server = ModelServer(ServerConfig([single_model("atl", "saved_models/atl")], port=0)).start()
    print(server.port); ...; server.stop(grace=5).wait()
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import pathlib
import signal
import sys
import threading
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from atl_keras.serving.batching import (
    PER_MODEL_FILE,
    BatchingParameters,
    BatchScheduler,
    load_batching_parameters,
)
from atl_keras.serving.loader import LoadedVersion, SignatureInfo
from atl_keras.serving.manager import ModelManager
from atl_keras.serving.model_config import (
    ServedModel,
    TLSConfig,
    load_model_config_file,
    parse_channel_arguments,
    parse_ssl_config,
    single_model,
)
from atl_keras.serving.requests import run_signature
from atl_keras.serving.servicers import ModelServicer, PredictionServicer, ServerState
from atl_keras.serving.warmup import warm_up
from atl_keras.cli.common import DefaultsHelpFormatter

logger = logging.getLogger(__name__)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
#: 25 megapixels: a 24 MP camera photo passes; decoded RGB costs up to 75 MB (float: 300 MB).
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
#: With batching the worker pool grows to 2 * max_batch_size threads, at most this many.
MAX_BATCHING_WORKERS = 256


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs; the CLI flags map one-to-one onto these fields.

    ``port=0`` binds a free port (read it back from ``ModelServer.port``); a port another
    process is bound to is refused unless ``reuse_port`` (gRPC's SO_REUSEPORT).
    ``file_system_poll_wait_seconds=0`` loads once at start and never polls.
    ``max_batch_size=0`` disables the per-request batch-size limit.
    ``max_image_pixels``: encoded images whose header claims more pixels are refused
    before decoding (0 = no limit).
    ``rest_api_port``: None = no REST API, 0 = a free port (``ModelServer.rest_port``).
    ``batching``: dynamic batching with these parameters (None = off, ``--enable_batching``);
    ``per_model_batching``: a version's ``batching_params.pbtxt`` overrides them.
    ``warmup``: warm every version before it is AVAILABLE (:mod:`atl_keras.serving.warmup`).
    """

    models: Sequence[ServedModel]
    host: str = "127.0.0.1"
    port: int = 8500
    file_system_poll_wait_seconds: float = 1.0
    grpc_max_threads: int = 16
    max_batch_size: int = 256
    max_message_size: int = 64 * 1024 * 1024
    channel_arguments: Sequence[tuple[str, int | str]] = ()
    tls: TLSConfig | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    reuse_port: bool = False
    rest_api_port: int | None = None
    batching: BatchingParameters | None = None
    per_model_batching: bool = False
    warmup: bool = True

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("ServerConfig needs at least one model (--model_base_path or --model_config_file)")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.grpc_max_threads < 1:
            raise ValueError(f"grpc_max_threads must be >= 1, got {self.grpc_max_threads}")
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0 (0 = no limit), got {self.max_batch_size}")
        if self.file_system_poll_wait_seconds < 0:
            raise ValueError("file_system_poll_wait_seconds must be >= 0 (0 = load once, no polling)")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 1..65535, or 0 for a free port; got {self.port}")
        if self.max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be >= 0 (0 = no limit), got {self.max_image_pixels}")
        if self.rest_api_port is not None and not 0 <= self.rest_api_port <= 65535:
            raise ValueError(f"rest_api_port must be in 1..65535, or 0 for a free port; got {self.rest_api_port}")
        if self.per_model_batching and self.batching is None:
            raise ValueError("per-model batching parameters need batching on (--enable_batching)")



# --------------------------------------------------------------------------- the server


_REUSE_HINT = " (pick another --port, stop the other server, or pass --reuse_port to share it)"


class ModelServer:
    """gRPC server hosting PredictionService, ModelService and Health over a ModelManager."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self._state = ServerState()
        self.health = health.HealthServicer()
        self.manager = ModelManager(
            config.models, config.file_system_poll_wait_seconds,
            on_change=self._update_health, on_load=self._prepare_version,
        )
        self.batcher: BatchScheduler | None = None
        self.rest = None  # rest.RestServer when config.rest_api_port is set
        self._server: grpc.Server | None = None
        self._port: int | None = None

    @staticmethod
    def _run_direct(loaded: LoadedVersion, signature: SignatureInfo, arrays) -> dict:
        return run_signature(signature, arrays)

    def _run(self, loaded: LoadedVersion, signature: SignatureInfo, arrays) -> dict:
        """Execute a checked request: through the batcher when batching is on."""
        if self.batcher is not None:
            return self.batcher.run(loaded, signature, arrays)
        return run_signature(signature, arrays)

    def _batching_for(self, loaded: LoadedVersion) -> BatchingParameters:
        return loaded.batching_parameters or self.config.batching

    def _prepare_version(self, loaded: LoadedVersion) -> None:
        """Before a version is AVAILABLE: its batching parameters, then warmup (raises -> load fails)."""
        if self.config.per_model_batching:
            per_model = loaded.path / PER_MODEL_FILE
            loaded.batching_parameters = load_batching_parameters(per_model) if per_model.is_file() else None
        if self.config.warmup:
            warm_up(loaded, self._run_direct)

    @property
    def rest_port(self) -> int:
        """The bound REST port (``config.rest_api_port`` must be set)."""
        if self.rest is None or self.rest.port is None:
            raise RuntimeError("ModelServer.rest_port: the REST API is off (rest_api_port=None) or not started")
        return self.rest.port

    @property
    def port(self) -> int:
        """The bound port (the real one when ``config.port == 0``)."""
        if self._port is None:
            raise RuntimeError("ModelServer.port is only known after start()")
        return self._port

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def in_flight(self) -> int:
        """RPCs currently being handled."""
        return self._state.in_flight

    def _update_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        ready = self.manager.is_ready()
        for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
            self.health.set(service, serving if ready else not_serving)
        for name in self.manager.models:
            self.health.set(name, serving if self.manager.has_versions(name) else not_serving)

    @property
    def worker_threads(self) -> int:
        """Threads handling gRPC (and REST) requests.

        ``grpc_max_threads``; with batching at least ``2 * max_batch_size`` (up to
        ``MAX_BATCHING_WORKERS``): a request waiting for its batch holds a thread, so a
        smaller pool would cap the batch size below what concurrent clients send and
        queue requests in front of the batcher instead of in it.
        """
        threads = self.config.grpc_max_threads
        if self.config.batching is not None:
            threads = max(threads, min(2 * self.config.batching.max_batch_size, MAX_BATCHING_WORKERS))
        return threads

    def start(self) -> "ModelServer":
        """Load the initial versions (blocking), then bind, start serving and polling.

        As TF Serving does, neither port accepts a connection before the initial load is done
        (a TCP or HTTP readiness probe cannot pass while the models are still loading); a
        port that cannot be bound is reported after that load.
        """
        if self.config.batching is not None:
            self.batcher = BatchScheduler(self.config.batching, run_signature, params_for=self._batching_for)
        self._update_health()
        self.manager.start()  # the initial load; gRPC binds (and listens) only after it
        try:
            return self._open_ports()
        except BaseException:
            self.manager.stop()
            if self.batcher is not None:
                self.batcher.stop()
            raise

    def _open_ports(self) -> "ModelServer":
        size = self.config.max_message_size
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
        if not self.config.reuse_port:  # gRPC sets SO_REUSEPORT by default: two servers would share a port
            options.append(("grpc.so_reuseport", 0))
        options += list(self.config.channel_arguments)
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=self.worker_threads, thread_name_prefix="grpc"
            ),
            options=options,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(
                self.manager, self._state, max_batch_size=self.config.max_batch_size,
                max_image_pixels=self.config.max_image_pixels, run=self._run,
            ),
            server,
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.manager, self._state), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = self.config.host
        address = f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"
        try:
            if self.config.tls is not None:
                tls = self.config.tls
                creds = grpc.ssl_server_credentials(
                    [(tls.server_key, tls.server_cert)],
                    root_certificates=tls.custom_ca,
                    require_client_auth=tls.client_verify,
                )
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"could not bind {address}: {err}; is the port in use?{_REUSE_HINT}") from err
        if not port:
            raise OSError(f"could not bind {address}; is the port in use?{_REUSE_HINT}")
        self._port = port
        if self.config.rest_api_port is not None:
            from atl_keras.serving.rest import RestApi, RestServer  # tornado: only when REST is on

            api = RestApi(
                self.manager, run=self._run, max_batch_size=self.config.max_batch_size,
                max_image_pixels=self.config.max_image_pixels, threads=self.worker_threads,
            )
            self.rest = RestServer(
                api, self.config.host, self.config.rest_api_port, max_body_size=self.config.max_message_size
            )
            try:
                self.rest.start()
            except OSError:
                server.stop(0)
                self.rest = None
                raise
        server.start()
        self._server = server
        if self.rest is not None and self.config.tls is not None:
            logger.warning(
                "the REST API on port %d is plaintext HTTP%s while gRPC uses %sTLS: anyone who can reach it "
                "skips that protection; put it behind a TLS proxy or turn it off (--rest_api_port=0)",
                self.rest.port, " with no client authentication" if self.config.tls.client_verify else "",
                "mutual " if self.config.tls.client_verify else "",
            )
        logger.info(
            "serving %s on %s (tls=%s, rest=%s, batching=%s)", sorted(self.manager.models), self.address,
            self.config.tls is not None, self.rest.port if self.rest else "off", self.config.batching is not None,
        )
        return self

    def stop(self, grace: float | None = 5.0) -> threading.Event:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, stop polling.

        Returns an event set once the server has fully stopped.
        """
        self.health.enter_graceful_shutdown()
        self.manager.stop()
        grpc_done = self._server.stop(grace) if self._server is not None else None
        done = threading.Event()

        def finish() -> None:  # the batcher and REST keep serving in-flight requests until gRPC is done
            if grpc_done is not None:
                grpc_done.wait()
            if self.rest is not None:
                self.rest.stop()
            if self.batcher is not None:
                self.batcher.stop()
            done.set()

        if grpc_done is None:
            finish()
        else:
            threading.Thread(target=finish, name="server-stop", daemon=True).start()
        return done

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True if it stopped."""
        if self._server is None:
            return True
        timed_out = self._server.wait_for_termination(timeout)
        return not timed_out

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0).wait()


# --------------------------------------------------------------------------- CLI


def _flag_bool(text: str) -> bool:
    """TF Serving's boolean flags: ``--enable_batching``, ``--enable_batching=true|false``."""
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atl serve",
        description="gRPC model server speaking TF Serving's PredictionService/ModelService API "
        "(flags in TF Serving's snake_case, as tensorflow_model_server's: see serving/README.md).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--port", type=int, default=8500, help="gRPC port (0 = pick a free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    p.add_argument("--model_name", default="default", help="name of the single model to serve")
    p.add_argument("--model_base_path", default="", help="dir holding <version>/ SavedModel dirs")
    p.add_argument("--model_config_file", default="", help="TF Serving models.config (text ModelServerConfig)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                   help="seconds between scans for new versions (0 = load once)")
    p.add_argument("--grpc_max_threads", type=int, default=16,
                   help="gRPC worker threads (with batching at least 2 * max_batch_size, up to 256)")
    p.add_argument("--max_batch_size", type=int, default=256, help="largest batch per request (0 = no limit)")
    p.add_argument("--max_message_size", type=int, default=64 * 1024 * 1024,
                   help="largest gRPC message in bytes, both directions")
    p.add_argument("--grpc_channel_arguments", default="",
                   help="comma-separated key=value gRPC channel arguments")
    p.add_argument("--ssl_config_file", default="", help="TF Serving SSLConfig text file (PEM contents)")
    p.add_argument("--ssl_cert", default="", help="server certificate PEM file (alternative to --ssl_config_file)")
    p.add_argument("--ssl_key", default="", help="server private key PEM file")
    p.add_argument("--ssl_ca", default="",
                   help="CA PEM file; with it (and --ssl_cert/--ssl_key), clients must present a certificate")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="refuse encoded images whose header claims more pixels, before decoding (0 = no limit)")
    p.add_argument("--reuse_port", type=_flag_bool, nargs="?", const=True, default=False,
                   help="allow binding a port another server already uses (SO_REUSEPORT); off by default")
    p.add_argument("--rest_api_port", type=int, default=0,
                   help="port of TF Serving's REST API on --host (0 = no REST API)")
    p.add_argument("--enable_batching", type=_flag_bool, nargs="?", const=True, default=False,
                   help="merge concurrent requests into one signature call (dynamic batching)")
    p.add_argument("--batching_parameters_file", default="",
                   help="text-format BatchingParameters (max_batch_size, batch_timeout_micros, "
                        "num_batch_threads, max_enqueued_batches, allowed_batch_sizes)")
    p.add_argument("--enable_per_model_batching_parameters", type=_flag_bool, nargs="?", const=True, default=False,
                   help="a version directory's batching_params.pbtxt overrides --batching_parameters_file")
    p.add_argument("--enable_model_warmup", type=_flag_bool, nargs="?", const=True, default=True,
                   help="warm each version (assets.extra/tf_serving_warmup_requests, else one request per "
                        "signature) before it is AVAILABLE; default true")
    p.add_argument("--shutdown_grace_seconds", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Flags -> ServerConfig; raises ValueError / FileNotFoundError on inconsistent flags."""
    if args.model_config_file and args.model_base_path:
        raise ValueError("use either --model_config_file or --model_base_path, not both")
    if args.model_config_file:
        models = load_model_config_file(args.model_config_file)
    elif args.model_base_path:
        models = [single_model(args.model_name, args.model_base_path)]
    else:
        raise ValueError("nothing to serve: pass --model_base_path (with --model_name) or --model_config_file")
    tls = None
    if args.ssl_config_file:
        tls = parse_ssl_config(pathlib.Path(args.ssl_config_file).read_text())
    elif args.ssl_cert or args.ssl_key or args.ssl_ca:
        if not (args.ssl_cert and args.ssl_key):
            given = [f"--{n}" for n in ("ssl_cert", "ssl_key", "ssl_ca") if getattr(args, n)]
            raise ValueError(
                f"TLS needs both --ssl_cert and --ssl_key (got only {' and '.join(given)}); "
                "refusing to serve plaintext when TLS was asked for"
            )
        ca = pathlib.Path(args.ssl_ca).read_bytes() if args.ssl_ca else None
        tls = TLSConfig(
            pathlib.Path(args.ssl_key).read_bytes(), pathlib.Path(args.ssl_cert).read_bytes(),
            custom_ca=ca, client_verify=ca is not None,
        )
    if not 0 <= args.rest_api_port <= 65535:  # ServerConfig's 0 = a free port; on the command line 0 = off
        raise ValueError(f"--rest_api_port must be in 1..65535, or 0 for no REST API; got {args.rest_api_port}")
    batching = None
    if args.enable_batching:
        batching = (
            load_batching_parameters(args.batching_parameters_file)
            if args.batching_parameters_file else BatchingParameters()
        )
    elif args.batching_parameters_file or args.enable_per_model_batching_parameters:
        raise ValueError("--batching_parameters_file / --enable_per_model_batching_parameters need --enable_batching")
    return ServerConfig(
        models=models,
        host=args.host,
        port=args.port,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        grpc_max_threads=args.grpc_max_threads,
        max_batch_size=args.max_batch_size,
        max_message_size=args.max_message_size,
        channel_arguments=parse_channel_arguments(args.grpc_channel_arguments),
        tls=tls,
        max_image_pixels=args.max_image_pixels,
        reuse_port=args.reuse_port,
        rest_api_port=args.rest_api_port or None,
        batching=batching,
        per_model_batching=args.enable_per_model_batching_parameters,
        warmup=args.enable_model_warmup,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    server = ModelServer(config)
    stop = threading.Event()
    received: list[int] = []

    def _on_signal(signum, frame):
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server.start()
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"ModelServer listening on {server.address} models={sorted(server.manager.models)}", flush=True)
    if server.rest is not None:
        print(f"REST API on http://{server.config.host}:{server.rest_port}/v1/models/", flush=True)
    while not stop.wait(0.5):
        pass
    name = signal.Signals(received[0]).name if received else "signal"
    logger.info("%s received: draining in-flight requests (grace %.1fs)", name, args.shutdown_grace_seconds)
    server.stop(args.shutdown_grace_seconds).wait(args.shutdown_grace_seconds + 5)
    logger.info("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

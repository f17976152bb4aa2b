"""The model manager (TF Serving's AspiredVersionsManager + file-system source).

Polls each model's base path, loads aspired versions in the background, swaps them in
atomically and unloads old ones once nothing runs on them (availability preserving).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import threading
from typing import Callable, Iterator, Sequence

import grpc
from tensorflow_serving.apis import get_model_status_pb2

from atl_keras.serving.errors import RequestError, invalid_argument, not_found
from atl_keras.serving.loader import LoadedVersion, import_custom_ops
from atl_keras.serving.model_config import ServedModel, dir_fingerprint, list_version_dirs, version_identity

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State


@dataclasses.dataclass
class _VersionState:
    state: int
    error: str = ""


class ModelManager:
    """Loads, swaps and unloads versions of the configured models; thread-safe.

    ``poll()`` syncs every model with its base path once; ``start()`` polls once
    synchronously, then every ``poll_wait_seconds`` in a daemon thread.
    ``on_load(loaded)`` runs on each loaded version before it becomes AVAILABLE (warmup);
    if it raises, the load fails. ``on_change()`` runs after every poll (health).
    """

    def __init__(
        self,
        models: Sequence[ServedModel],
        poll_wait_seconds: float = 1.0,
        on_change: Callable[[], None] | None = None,
        on_load: Callable[[LoadedVersion], None] | None = None,
    ):
        self.models = {m.name: m for m in models}
        self.poll_wait_seconds = poll_wait_seconds
        self._on_change = on_change
        self._on_load = on_load
        self._lock = threading.Lock()
        self._served: dict[str, dict[int, LoadedVersion]] = {m.name: {} for m in models}
        self._draining: list[LoadedVersion] = []
        self._states: dict[str, dict[int, _VersionState]] = {m.name: {} for m in models}
        self._failed: dict[tuple[str, int], tuple] = {}
        self._warned_missing: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()

    # -- lifecycle
    def start(self) -> "ModelManager":
        import_custom_ops()
        self.poll()
        if self.poll_wait_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll()
            except Exception:  # never let the poller die
                logger.exception("model poll failed; retrying in %ss", self.poll_wait_seconds)

    # -- syncing with disk
    def poll(self) -> None:
        with self._poll_lock:
            for model in self.models.values():
                if self._stop.is_set():
                    return
                self._sync(model)
            self._finish_draining()
        if self._on_change is not None:
            self._on_change()

    def _set_state(self, name: str, version: int, state: int, error: str = "") -> None:
        with self._lock:
            self._states[name][version] = _VersionState(state, error)

    def _sync(self, model: ServedModel) -> None:
        on_disk = list_version_dirs(model.base_path)
        if not on_disk:
            # A base path that is briefly missing or empty (a redeploy, an NFS hiccup, a
            # directory being swapped) must not take the model down: keep what is loaded,
            # as TF Serving's file-system source does, until versions reappear.
            if model.name not in self._warned_missing:
                self._warned_missing.add(model.name)
                loaded = sorted(self._served[model.name])
                logger.warning(
                    "model %r: no version directories <int>/ with a saved_model.pb under %s%s",
                    model.name, model.base_path,
                    f"; still serving loaded versions {loaded}" if loaded else " yet",
                )
            return
        self._warned_missing.discard(model.name)
        aspired = self._load_aspired(model, on_disk)
        if self._stop.is_set():
            return
        # Availability preserving: unload versions that are no longer aspired only once an
        # aspired version is serving (or the old version's directory is gone).
        with self._lock:
            served = self._served[model.name]
            aspired_available = any(v in served for v in aspired)
            drop = [
                v for v in served
                if v not in aspired and (aspired_available or v not in on_disk)
            ]
            if drop:
                self._served[model.name] = {v: lv for v, lv in served.items() if v not in drop}
                for v in drop:
                    self._draining.append(served[v])
                    self._states[model.name][v] = _VersionState(State.UNLOADING)
        for v in drop:
            logger.info("model %r: unloading version %d", model.name, v)

    def _load_aspired(self, model: ServedModel, on_disk: dict[int, pathlib.Path]) -> list[int]:
        """Load (or reload, when its directory was replaced) the versions to serve; returns them.

        ``latest {num_versions: n}`` serves the n newest versions *that load*: a broken
        newest version falls back to the next older loadable one.
        """
        policy = model.version_policy
        if policy.kind == "latest":
            candidates, wanted = sorted(on_disk, reverse=True), policy.num_versions
        else:
            candidates = policy.select(on_disk)
            wanted = len(candidates)
        aspired: list[int] = []
        for version in candidates:  # highest first: the newest version becomes available first
            if len(aspired) >= wanted or self._stop.is_set():
                break
            path = on_disk[version]
            current = self._served[model.name].get(version)
            if current is not None and current.identity == version_identity(path):
                aspired.append(version)
            elif self._load(model, version, path, replacing=current) or current is not None:
                aspired.append(version)  # loaded, or a failed reload: keep the copy in memory
        return aspired

    def _load(
        self, model: ServedModel, version: int, path: pathlib.Path, replacing: LoadedVersion | None
    ) -> bool:
        """Load one version and swap it in; False if it failed (remembered until its files change)."""
        key = (model.name, version)
        fingerprint = dir_fingerprint(path)
        if self._failed.get(key) == fingerprint:
            return False  # failed before and unchanged since: skip until it changes
        identity = version_identity(path)
        if replacing is None:
            self._set_state(model.name, version, State.LOADING)
            logger.info("model %r: loading version %d from %s", model.name, version, path)
        else:
            logger.info("model %r: version %d was replaced on disk; reloading %s", model.name, version, path)
        try:
            loaded = LoadedVersion(model.name, version, path)
            loaded.identity = identity
            if self._on_load is not None:
                self._on_load(loaded)
        except Exception as err:
            self._failed[key] = fingerprint
            message = f"failed to load version {version} from {path}: {type(err).__name__}: {err}"
            if replacing is None:
                logger.error("model %r: %s", model.name, message)
                self._set_state(model.name, version, State.END, message)
            else:
                logger.error("model %r: %s; still serving the copy loaded before", model.name, message)
            return False
        self._failed.pop(key, None)
        with self._lock:  # copy-on-write swap: readers see either the old or the new map
            served = dict(self._served[model.name])
            served[version] = loaded
            self._served[model.name] = served
            self._states[model.name][version] = _VersionState(State.AVAILABLE)
            if replacing is not None:
                replacing.replaced = True
                self._draining.append(replacing)
        logger.info("model %r: version %d AVAILABLE", model.name, version)
        return True

    def _finish_draining(self) -> None:
        with self._lock:
            still = []
            for lv in self._draining:
                if lv.in_flight > 0:
                    still.append(lv)
                elif not lv.replaced:  # a replaced copy's version number lives on
                    self._states[lv.name][lv.version] = _VersionState(State.END)
            self._draining = still

    # -- queries
    def is_ready(self) -> bool:
        """True when every model has at least one AVAILABLE version."""
        with self._lock:
            return all(self._served[name] for name in self.models)

    def has_versions(self, name: str) -> bool:
        with self._lock:
            return bool(self._served.get(name))

    def _resolve(self, name: str, version: int | None, label: str) -> LoadedVersion:
        if not name:
            raise invalid_argument("model_spec.name is empty; name the model to query")
        if name not in self.models:
            raise not_found(f"model {name!r} is not served; served models: {sorted(self.models)}")
        served = self._served[name]
        if label:
            labels = self.models[name].version_labels
            if label not in labels:
                raise not_found(
                    f"model {name!r} has no version label {label!r}; labels: {sorted(labels) or 'none'} "
                    "(set version_labels in models.config, or ask for model_spec.version)"
                )
            version = labels[label]
        if version is None:
            if not served:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, f"model {name!r} has no version loaded yet; retry later"
                )
            return served[max(served)]
        if version not in served:
            state = self._states[name].get(version)
            extra = f" (state {State.Name(state.state)})" if state else ""
            raise not_found(
                f"version {version} of model {name!r} is not available{extra}; "
                f"available versions: {sorted(served)}"
            )
        return served[version]

    @contextlib.contextmanager
    def acquire(self, name: str, version: int | None = None, label: str = "") -> Iterator[LoadedVersion]:
        """Hold a version for the duration of a request; it is never dropped while held."""
        with self._lock:
            loaded = self._resolve(name, version, label)
            loaded.acquire()
        try:
            yield loaded
        finally:
            loaded.release()
            if loaded.in_flight == 0 and any(d is loaded for d in self._draining):
                self._finish_draining()

    def version_states(self, name: str) -> dict[int, tuple[int, str]]:
        """``{version: (ModelVersionStatus.State, error message)}`` of everything seen so far."""
        if name not in self.models:
            raise not_found(f"model {name!r} is not served; served models: {sorted(self.models)}")
        with self._lock:
            return {v: (s.state, s.error) for v, s in self._states[name].items()}


    def status(self, name: str, version: int | None = None, label: str = "") -> dict[int, tuple[int, str]]:
        """``GetModelStatus``: the states of all versions, or of the one ``version`` / ``label`` names."""
        if not name:
            raise invalid_argument("model_spec.name is empty; name the model to query")
        states = self.version_states(name)
        if label:
            labels = self.models[name].version_labels
            if label not in labels:
                raise not_found(f"model {name!r} has no version label {label!r}")
            version = labels[label]
        if version is not None:
            if version not in states:
                raise not_found(f"model {name!r} has no version {version}; known: {sorted(states)}")
            states = {version: states[version]}
        return states

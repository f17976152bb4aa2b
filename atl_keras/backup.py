"""Crash-safe training backups: a run killed at any moment (or stopped by a full disk) resumes.

`keras.callbacks.BackupAndRestore` writes ``latest.weights.h5`` in place (a kill during the
write leaves a file no rerun can open), writes ``training_metadata.json`` in place (an empty
file fails every rerun), and deletes the backup when ``fit`` returns, before the caller has
written its final files. Here instead:

- every backup is a new file ``state-<epoch>-<batch>.weights.h5``, serialised in memory and
  written as ``.tmp`` + fsync + rename; ``training_metadata.json`` is then replaced atomically
  and names the new file and the previous one, which is kept until the next backup is
  complete (so there are at most two state files);
- a full disk ends with `BackupWriteError` (an `OSError`), the partial file removed and the
  previous backup intact; HDF5 never writes to the disk, so it cannot crash on a full one;
- `restore_backup` loads the newest state that loads (metadata, else the state files by name,
  else Keras' own ``latest.weights.h5``), and when none does warns (`warnings.warn`), leaves the
  model as it was and discards the backup, so a rerun starts over instead of failing for ever;
- the callback never deletes the backup: call `remove_backup` once the final files are written.

    restored = restore_backup(model, "runs/x/backup")          # BackupState or None
    model.fit(..., initial_epoch=restored.epoch if restored else 0,
              callbacks=[TrainingBackup("runs/x/backup", save_freq=100)])
    ...write the final files...
    remove_backup("runs/x/backup")
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

__all__ = [
    "BackupMismatchError",
    "BackupState",
    "BackupWriteError",
    "METADATA_FILE",
    "TrainingBackup",
    "read_backup_state",
    "remove_backup",
    "restore_backup",
    "write_backup",
]

METADATA_FILE = "training_metadata.json"
_STATE_RE = re.compile(r"^state-(\d+)-(\d+)\.weights\.h5$")
_KERAS_WEIGHTS = "latest.weights.h5"  # what keras.callbacks.BackupAndRestore writes


class BackupWriteError(OSError):
    """A backup (or a final file) could not be written; the previous complete backup is kept."""


class BackupMismatchError(ValueError):
    """The backup belongs to a run with other settings (or another model); it was kept."""


@dataclass(frozen=True)
class BackupState:
    """One complete backup: ``epoch`` = epochs finished, ``batch`` = last batch of the
    interrupted epoch (Keras restarts that epoch), ``weights`` = file name in the backup dir."""

    epoch: int
    batch: int
    weights: str


def _state_name(epoch: int, batch: int) -> str:
    return f"state-{epoch:05d}-{batch:06d}.weights.h5"


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomically(data: bytes, path: str, mode: int = 0o666) -> None:
    """Write `data` to ``path`` via ``path.tmp`` + fsync + rename; the tmp file goes on failure.

    The file gets ``mode`` minus the umask (like `open`), not `tempfile`'s 0600.
    """
    tmp_path = f"{path}.tmp"
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.remove(tmp_path)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def weights_bytes(model: keras.Model) -> bytes:
    """The ``.weights.h5`` bytes `model.save_weights` would write (weights + optimizer state),
    built in memory so that a full disk fails in Python (clean `OSError`), not inside HDF5."""
    from keras.src.saving import saving_lib

    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    try:
        saving_lib._save_state(  # noqa: SLF001 - what save_weights_only does, minus the file
            model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set()
        )
    finally:
        store.close()
    return buffer.getvalue()


def _storage_error(exc: OSError, what: str, backup_dir: str, previous: BackupState | None) -> BackupWriteError:
    kept = (
        f"the previous backup (epoch {previous.epoch}) in {backup_dir} is intact"
        if previous is not None else "no earlier backup exists"
    )
    cause = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    error = BackupWriteError(
        f"Could not write {what}: {cause}; {kept}. Free space (or fix the output directory) and "
        "rerun the same command to resume."
    )
    error.errno = exc.errno
    return error


def read_backup_state(backup_dir: str) -> BackupState | None:
    """The backup `training_metadata.json` names (None: none, or unreadable).

    Reads Keras' own layout too (``latest.weights.h5`` + metadata without ``weights``).
    """
    candidates = _candidates(backup_dir)
    return candidates[0] if candidates else None


def _read_metadata(backup_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(backup_dir, METADATA_FILE), encoding="utf-8") as f:
            metadata = json.load(f)
        return metadata if isinstance(metadata, dict) else None
    except (OSError, ValueError):
        return None


def _as_state(entry: Any) -> BackupState | None:
    try:
        return BackupState(int(entry["epoch"]), int(entry.get("batch", 0)), str(entry["weights"]))
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def _candidates(backup_dir: str) -> list[BackupState]:
    """Backups to try, newest first: the metadata's current and previous state, then any
    state file by name (epoch, batch parsed from it), then Keras' ``latest.weights.h5``."""
    if not os.path.isdir(backup_dir):
        return []
    found: list[BackupState] = []
    metadata = _read_metadata(backup_dir)
    if metadata is not None:
        for entry in (metadata, metadata.get("previous")):
            state = _as_state(entry) if entry else None
            if state is not None:
                found.append(state)
        if "weights" not in metadata and "epoch" in metadata:  # keras.callbacks.BackupAndRestore
            state = _as_state({**metadata, "weights": _KERAS_WEIGHTS})
            if state is not None:
                found.append(state)
    by_name = []
    for name in os.listdir(backup_dir):
        match = _STATE_RE.match(name)
        if match:
            by_name.append(BackupState(int(match.group(1)), int(match.group(2)), name))
    found.extend(sorted(by_name, key=lambda s: (s.epoch, s.batch), reverse=True))
    unique: list[BackupState] = []
    for state in found:
        if state.weights not in {s.weights for s in unique} and os.path.isfile(
            os.path.join(backup_dir, state.weights)
        ):
            unique.append(state)
    return unique


def write_backup(
    model: keras.Model, backup_dir: str, epoch: int, batch: int = 0, settings: dict[str, Any] | None = None
) -> BackupState:
    """Write a complete backup of `model` (weights + optimizer) at (`epoch`, `batch`).

    `settings` (JSON-able) are recorded beside it: `restore_backup` refuses a backup whose
    settings differ from the ones it is given.

    Raises:
        BackupWriteError: the disk is full or not writable; the previous backup is intact.
    """
    previous = read_backup_state(backup_dir)
    state = BackupState(int(epoch), int(batch), _state_name(epoch, batch))
    data = weights_bytes(model)
    try:
        os.makedirs(backup_dir, exist_ok=True)
        write_bytes_atomically(data, os.path.join(backup_dir, state.weights))
        metadata: dict[str, Any] = {"epoch": state.epoch, "batch": state.batch, "weights": state.weights}
        if settings is not None:
            metadata["settings"] = settings
        if previous is not None and previous.weights != state.weights:
            metadata["previous"] = {"epoch": previous.epoch, "batch": previous.batch,
                                    "weights": previous.weights}
        write_bytes_atomically(json.dumps(metadata).encode(), os.path.join(backup_dir, METADATA_FILE))
    except OSError as exc:
        raise _storage_error(exc, f"the training backup in {backup_dir}", backup_dir, previous) from exc
    keep = {state.weights, metadata.get("previous", {}).get("weights")}
    for name in os.listdir(backup_dir):  # older states, Keras' files, tmp files of a killed write
        if name != METADATA_FILE and name not in keep:
            try:
                os.remove(os.path.join(backup_dir, name))
            except OSError:
                pass
    return state


def _variables(model: keras.Model) -> list[Any]:
    optimizer_variables = list(model.optimizer.variables) if model.optimizer is not None else []
    return list(model.weights) + optimizer_variables


def _settings_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as recorded
    return [f"{key} {recorded.get(key)!r} (backup) vs {wanted.get(key)!r} (now)"
            for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key)]


def _is_whole_hdf5(path: str) -> bool:
    """True when every dataset of the HDF5 file reads (a complete file, not a torn one)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, item: item[()] if isinstance(item, h5py.Dataset) else None)
        return True
    except Exception:  # noqa: BLE001 - torn files fail in h5py in many ways
        return False


def _mismatch(backup_dir: str, state: BackupState, reasons: str) -> BackupMismatchError:
    return BackupMismatchError(
        f"The backup in {backup_dir} ({state.epoch} epochs done) is of a run with other settings: "
        f"{reasons}. It was kept: rerun with its settings to resume it, or start over with --fresh "
        "(TrainConfig(fresh=True); deletes it) or another --output."
    )


def restore_backup(model: keras.Model, backup_dir: str, settings: dict[str, Any] | None = None) -> BackupState | None:
    """Load the newest backup in `backup_dir` that loads into the (built, compiled) `model`.

    Falls back to the previous backup when the newest is torn (with a warning); when no
    backup loads, warns, leaves `model` as it was, removes the backup and returns None (start over).

    Raises:
        BackupMismatchError: the backup was written with other `settings` (see `write_backup`),
            or it is complete but does not fit `model`; the backup is kept.
    """
    candidates = _candidates(backup_dir)
    recorded = (_read_metadata(backup_dir) or {}).get("settings")
    if candidates and settings is not None and isinstance(recorded, dict):
        differences = _settings_differences(recorded, settings)
        if differences:
            raise _mismatch(backup_dir, candidates[0], "; ".join(differences))
    if not candidates:
        if os.path.isdir(backup_dir) and os.listdir(backup_dir):
            warnings.warn(f"The backup in {backup_dir} holds no complete state "
                          f"({', '.join(sorted(os.listdir(backup_dir)))}); starting over from epoch 1.",
                          stacklevel=2)
            remove_backup(backup_dir)
        return None
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # optimizer slots must exist to load
    variables = _variables(model)
    initial = [np.array(v.numpy()) for v in variables]
    failures = []
    for state in candidates:
        try:
            model.load_weights(os.path.join(backup_dir, state.weights))
        except Exception as exc:  # noqa: BLE001 - a torn file fails in h5py in many ways
            failures.append(f"{state.weights}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        if failures:
            warnings.warn(f"Backup {candidates[0].weights} is unreadable ({'; '.join(failures)}); "
                          f"resuming from the previous backup ({state.epoch} epochs done).", stacklevel=2)
        return state
    for variable, value in zip(variables, initial):
        variable.assign(value)
    if _is_whole_hdf5(os.path.join(backup_dir, candidates[0].weights)):  # complete, but another model's
        raise _mismatch(backup_dir, candidates[0], f"its weights do not fit this model ({failures[0]})")
    warnings.warn(f"No backup in {backup_dir} could be read ({'; '.join(failures)}); "
                  "starting over from epoch 1.", stacklevel=2)
    remove_backup(backup_dir)
    return None


def remove_backup(backup_dir: str) -> None:
    """Delete the backup: the metadata first (the commit point), then the state files."""
    try:
        os.remove(os.path.join(backup_dir, METADATA_FILE))
    except FileNotFoundError:
        pass
    shutil.rmtree(backup_dir, ignore_errors=True)


class TrainingBackup(keras.callbacks.Callback):
    """Back up the training state at the end of every epoch and every `save_freq` batches.

    Never deletes the backup (see `remove_backup`). Restore with `restore_backup` before `fit`
    and pass ``initial_epoch``; like Keras' `BackupAndRestore`, a state saved inside an epoch
    restarts that epoch with the saved weights.

    Args:
        backup_dir: directory of this run's backups (nothing else may write there).
        save_freq: ``"epoch"`` or a number of batches.
        settings: the run's settings, recorded with every backup (see `restore_backup`).
    """

    def __init__(self, backup_dir: str, save_freq: int | str = "epoch", settings: dict[str, Any] | None = None) -> None:
        super().__init__()
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int)
                                     or save_freq < 1):
            raise ValueError(f"save_freq must be 'epoch' or a number of batches >= 1, got {save_freq!r}.")
        self.backup_dir = backup_dir
        self.save_freq = save_freq
        self.settings = settings
        self._epoch = 0
        self._since_save = 0
        self.last_state: BackupState | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._since_save = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.save_freq == "epoch":
            return
        self._since_save += 1
        if self._since_save >= self.save_freq:
            self._since_save = 0
            self.last_state = write_backup(self.model, self.backup_dir, self._epoch, batch, self.settings)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.last_state = write_backup(self.model, self.backup_dir, epoch + 1, 0, self.settings)

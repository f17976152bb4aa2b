"""Fault injection: kills at named phases, torn backups, full disks, Ctrl-C, and a table of bad
input. Every case asserts the exit code (or exception), the message, and what is left on disk."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from atl_keras import cli
from atl_keras.backup import BackupWriteError, read_backup_state, write_backup
from atl_keras.train import PHASES, TrainConfig, run_training
from tests.conftest import REPO_ROOT

TINY = dict(
    dataset="synthetic-shop", synthetic_items=40, image_size=16, text_encoder="hashing",
    p=4, k=2, epochs=2, steps_per_epoch=4, ks=(1, 5), embedding_dim=8, projector_size=10,
)
TINY_FLAGS = [
    "--dataset", "synthetic-shop", "--synthetic-items", "40", "--image-size", "16",
    "--text-encoder", "hashing", "--p", "4", "--k", "2", "--epochs", "2", "--steps-per-epoch", "4",
    "--ks", "1,5", "--embedding-dim", "8", "--projector-size", "10", "--quiet",
]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO_ROOT)}

#: Runs `run_training(TrainConfig(**json))` and, at phase NAME, either kills itself (SIGKILL) or
#: fills the disk under the output directory (`fill:NAME`). Optional third argument, JSON
#: {phase: directory}: at each of those earlier phases the output directory is copied there
#: while the process waits, i.e. exactly what a SIGKILL at that phase would leave on disk (one
#: training process gives the states of several kills).
SCRIPT = """
import json, os, shutil, signal, sys
from atl_keras.train import TrainConfig, run_training
config, action = json.loads(sys.argv[1]), sys.argv[2]
snapshots = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
mode, _, at = action.rpartition(":")
def on_phase(name):
    if name in snapshots:
        shutil.copytree(config["output_dir"], snapshots[name])
    if name != at:
        return
    if mode == "fill":
        with open(os.path.join(config["output_dir"], "filler"), "wb") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
            except OSError:
                pass
    else:
        os.kill(os.getpid(), signal.SIGKILL)
try:
    run_training(TrainConfig(**config), verbose=0, on_phase=on_phase)
except OSError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
"""


def _config(tmp_path, name="run", **overrides) -> dict:
    return {**TINY, "output_dir": str(tmp_path / name), "text_cache_dir": str(tmp_path / "cache"), **overrides}


def _run_script(config: dict, action: str, snapshots: dict | None = None) -> subprocess.CompletedProcess:
    extra = [json.dumps(snapshots)] if snapshots else []
    return subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(config), action, *extra], cwd=REPO_ROOT,
                          env=ENV, capture_output=True, text=True, timeout=1200)


def _leftovers(directory) -> list[str]:
    """Half-written files: tmp files anywhere under `directory`."""
    out = []
    for root, _, files in os.walk(directory):
        out += [os.path.join(root, f) for f in files if f.endswith(".tmp") or (f.startswith("tmp") and f.endswith(".keras"))]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: what every resumed run must reproduce (`.phases`: the phases it
    reported, in order)."""
    tmp = tmp_path_factory.mktemp("reference")
    phases = []
    result = run_training(TrainConfig(**_config(tmp)), verbose=0, on_phase=phases.append)
    result.phases = tuple(phases)
    return result


# ---------------------------------------------------------------------- kills, final phase
FINAL_PHASES = ("trained", "projector", "model")


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """{phase: output directory a kill at that phase leaves}: one training subprocess, SIGKILLed
    at the last of FINAL_PHASES, its output directory copied at the earlier ones."""
    tmp = tmp_path_factory.mktemp("killed")
    config = _config(tmp)
    snapshots = {phase: str(tmp / f"at-{phase}") for phase in FINAL_PHASES[:-1]}
    proc = _run_script(config, f"kill:{FINAL_PHASES[-1]}", snapshots)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return {**snapshots, FINAL_PHASES[-1]: config["output_dir"]}


@pytest.mark.parametrize("phase", FINAL_PHASES)
def test_kill_in_the_final_phase_resumes_and_matches_an_uninterrupted_run(tmp_path, reference, killed, phase):
    """Keras' BackupAndRestore deleted backup/ when fit returned: a kill during evaluation /
    export / model save made the rerun start from epoch 1. Now the backup stays until the
    final files are written, and the rerun only evaluates and writes them."""
    config = _config(tmp_path)
    shutil.copytree(killed[phase], tmp_path / "run")
    out = tmp_path / "run"
    assert read_backup_state(str(out / "backup")).epoch == 2
    assert not (out / "metrics.json").exists()

    messages = []
    result = run_training(TrainConfig(**config), verbose=0, progress=messages.append)
    assert any("All 2 epochs were done" in m for m in messages), messages
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed"] and metrics["initial_epoch"] == 2 and metrics["epochs_run"] == []
    assert result.test_metrics == reference.test_metrics  # bit-identical to the uninterrupted run
    assert not (out / "backup").exists() and _leftovers(out) == []
    rows = (out / "training_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"]


# -------------------------------------------------------------------------- torn backups
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The output directory of a run stopped (exception) at phase "trained", its backup left
    behind; built once, copied by `_interrupted_run`."""
    tmp = tmp_path_factory.mktemp("interrupted")

    def stop(name):
        if name == "trained":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(TrainConfig(**_config(tmp)), verbose=0, on_phase=stop)
    return tmp / "run"


def _interrupted_run(tmp_path, interrupted) -> dict:
    """A copy of the `interrupted` run under `tmp_path`; returns its config."""
    shutil.copytree(interrupted, tmp_path / "run")
    return _config(tmp_path)


def test_torn_newest_backup_falls_back_to_the_previous_one(tmp_path, reference, interrupted):
    config = _interrupted_run(tmp_path, interrupted)
    backup = tmp_path / "run" / "backup"
    newest = read_backup_state(str(backup))
    assert newest.epoch == 2
    path = backup / newest.weights
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # a SIGKILL mid-write
    messages = []
    with pytest.warns(UserWarning, match="unreadable.*resuming from the previous backup \\(1 epochs done\\)"):
        result = run_training(TrainConfig(**config), verbose=0, progress=messages.append)
    assert result.initial_epoch == 1
    assert any(m.startswith("Resuming from epoch 2 of 2 (1 done") for m in messages), messages
    assert result.test_metrics == reference.test_metrics


def test_empty_metadata_still_finds_the_backup_by_name(tmp_path, reference, interrupted):
    config = _interrupted_run(tmp_path, interrupted)
    (tmp_path / "run" / "backup" / "training_metadata.json").write_text("")
    result = run_training(TrainConfig(**config), verbose=0)
    assert result.initial_epoch == 2
    assert result.test_metrics == reference.test_metrics


def test_a_backup_of_other_settings_is_kept_and_refused_naming_them(tmp_path, reference, interrupted):
    """Rerunning into a run's folder with another setting deleted its backup ("No backup could
    be read ... starting over"), and the original command then started from epoch 1."""
    from atl_keras.backup import METADATA_FILE, BackupMismatchError

    config = _interrupted_run(tmp_path, interrupted)
    backup = tmp_path / "run" / "backup"
    kept = sorted(os.listdir(backup))
    for changed in ({"embedding_dim": 16}, {"loss": "triplet", "margin": 0.3}):
        with pytest.raises(BackupMismatchError) as info:
            run_training(TrainConfig(**{**config, **changed}), verbose=0)
        for name in changed:
            assert f"{name} " in str(info.value), str(info.value)
        assert "--fresh" in str(info.value) and "--output" in str(info.value)
        assert sorted(os.listdir(backup)) == kept
    metadata = json.loads((backup / METADATA_FILE).read_text())  # a backup without recorded settings:
    metadata.pop("settings")                                     # complete weights that do not fit
    (backup / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(BackupMismatchError, match="do not fit this model"):
        run_training(TrainConfig(**{**config, "embedding_dim": 16}), verbose=0)
    assert sorted(os.listdir(backup)) == kept
    result = run_training(TrainConfig(**config), verbose=0)  # the original command still resumes
    assert result.initial_epoch == 2 and result.test_metrics == reference.test_metrics


def test_fresh_discards_a_backup_and_starts_over(tmp_path, interrupted):
    config = _interrupted_run(tmp_path, interrupted)
    result = run_training(TrainConfig(**{**config, "embedding_dim": 16, "epochs": 1, "fresh": True}), verbose=0)
    assert result.initial_epoch == 0 and not (tmp_path / "run" / "backup").exists()


@pytest.mark.parametrize("torn", ["weights", "metadata"])
def test_torn_keras_backup_starts_over_with_a_warning(tmp_path, reference, torn):
    """Keras' own layout (latest.weights.h5 written in place): a torn weights file gave
    `OSError: Unable to synchronously open file` and an empty metadata file
    `Expecting value` on every rerun, for ever."""
    config = _config(tmp_path)
    backup = tmp_path / "run" / "backup"
    backup.mkdir(parents=True)
    (backup / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100 if torn == "weights" else b"")
    (backup / "training_metadata.json").write_text('{"epoch": 1, "batch": 0}' if torn == "weights" else "")
    with pytest.warns(UserWarning, match="starting over from epoch 1"):
        result = run_training(TrainConfig(**config), verbose=0)
    assert result.initial_epoch == 0
    assert result.test_metrics == reference.test_metrics
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["resumed"] is False


# ------------------------------------------------------------------------ tmp files, modes
def test_stale_tmp_files_are_removed_and_model_keras_is_0644(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tmpab12cd_3.keras").write_bytes(b"")  # what a killed tempfile.mkstemp write left
    (out / "metrics.json.tmp").write_text("{")
    previous = os.umask(0o022)
    try:
        run_training(TrainConfig(**_config(tmp_path, epochs=1)), verbose=0)
    finally:
        os.umask(previous)
    assert sorted(os.listdir(out)) == ["config.json", "logs", "metrics.json", "model.keras", "training_log.csv"]
    modes = {name: oct((out / name).stat().st_mode & 0o777) for name in ("model.keras", "metrics.json", "config.json")}
    assert set(modes.values()) == {"0o644"}, modes


# ----------------------------------------------------------------------------- disk full
@contextlib.contextmanager
def tiny_disk(path, size: str):
    """A tmpfs of `size` at `path` (root only; the test is skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_at_the_first_backup_is_a_clean_error_and_resumable(tmp_path):
    """Before: HDF5 wrote the backup into a 1 MB disk and the process died (segfault, rc 139),
    leaving a torn latest.weights.h5."""
    with tiny_disk(tmp_path / "disk", "1m") as disk:
        command = [sys.executable, "-m", "atl_keras.cli", "train", *TINY_FLAGS,
                   "--text-cache-dir", str(tmp_path / "cache"), "--output", str(disk / "run")]
        full = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
        assert full.returncode == 1, (full.returncode, full.stderr[-3000:])
        assert "no space left on device" in full.stderr and "Traceback" not in full.stderr
        assert "rerun the same command" in full.stderr
        assert _leftovers(disk) == []
        backup = disk / "run" / "backup"
        assert not backup.exists() or not [f for f in os.listdir(backup) if f.endswith(".h5")]

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rerun = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert (disk / "run" / "model.keras").exists() and not backup.exists()


def test_disk_full_at_the_final_model_write_keeps_the_backup(tmp_path, reference):
    """Before: `OSError: [Errno 28]` traceback, and the backup already deleted."""
    with tiny_disk(tmp_path / "disk", "32m") as disk:
        config = _config(tmp_path, output_dir=str(disk / "run"))
        full = _run_script(config, "fill:projector")  # the disk fills up before model.keras
        assert full.returncode == 1, full.stderr[-3000:]
        assert "Writing the final files" in full.stderr and "no space left on device" in full.stderr
        assert "training is finished and its backup (2 epochs)" in full.stderr
        assert not (disk / "run" / "model.keras").exists() and _leftovers(disk) == []
        assert read_backup_state(str(disk / "run" / "backup")).epoch == 2

        os.remove(disk / "run" / "filler")
        result = run_training(TrainConfig(**config), verbose=0)
        assert result.initial_epoch == 2 and result.test_metrics == reference.test_metrics
        assert not (disk / "run" / "backup").exists()


def test_backup_write_error_keeps_the_previous_backup(tmp_path, monkeypatch, reference):
    import atl_keras.backup as backup_module

    model = reference.model
    backup = str(tmp_path / "b")
    write_backup(model, backup, epoch=1)

    def no_space(data, path, mode=0o666):
        with open(f"{path}.tmp", "wb") as f:
            f.write(data[:10])
        os.remove(f"{path}.tmp")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup_module, "write_bytes_atomically", no_space)
    with pytest.raises(BackupWriteError, match="no space left on device; the previous backup \\(epoch 1\\)"):
        write_backup(model, backup, epoch=2)
    assert read_backup_state(backup).epoch == 1
    assert sorted(os.listdir(backup)) == ["state-00001-000000.weights.h5", "training_metadata.json"]


# -------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_prints_one_line_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    flags = list(TINY_FLAGS)
    flags[flags.index("--epochs") + 1] = "3"
    flags[flags.index("--steps-per-epoch") + 1] = "40"
    command = [sys.executable, "-m", "atl_keras.cli", "train", *flags,
               "--text-cache-dir", str(tmp_path / "cache"), "--output", str(out)]
    # Ctrl-C reaches a foreground command with SIGINT at its default; a suite started in the
    # background of a script (`make test &`) inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: the run would ignore the signal and finish (exit 0).
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            state = read_backup_state(str(out / "backup"))
            if state is not None and state.epoch >= 1:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("atl train: interrupted; the backup in") and "rerun the same command" in lines[0]
    assert read_backup_state(str(out / "backup")) is not None

    rerun = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "atl train: Resuming from epoch" in rerun.stdout and "of 3" in rerun.stdout


# ------------------------------------------------------------------------ bad input table
def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _garbage_model(tmp_path) -> str:
    directory = tmp_path / "garbage_encoder"
    (directory / "variables").mkdir(parents=True)
    (directory / "saved_model.pb").write_bytes(b"not a protobuf \xff\xfe")
    (directory / "variables" / "variables.index").write_bytes(b"x")
    return str(directory)


BAD_INPUT = [
    # (name, argv builder(tmp_path) -> extra flags, expected message)
    ("yaml-epochs-word", lambda t: ["--config", _write(t / "a.yaml", "epochs: five\n")],
     "a.yaml: epochs must be an integer, got 'five'"),
    ("yaml-epochs-float", lambda t: ["--config", _write(t / "a.yaml", "epochs: 2.5\n")],
     "a.yaml: epochs must be an integer, got 2.5"),
    ("yaml-p-list", lambda t: ["--config", _write(t / "a.yaml", "p: [1, 2]\n")],
     "a.yaml: p must be an integer (or null), got [1, 2]"),
    ("yaml-syntax", lambda t: ["--config", _write(t / "a.yaml", "epochs: 3\n  mining: [x\n")],
     "a.yaml is not valid YAML: mapping values are not allowed here at line 2"),
    ("yaml-bool-string", lambda t: ["--config", _write(t / "a.yaml", "augment: maybe\n")],
     "augment must be true or false, got 'maybe'"),
    ("image-size-0", lambda t: ["--image-size", "0"], "image_size must be >= 8, got 0"),
    ("learning-rate-0", lambda t: ["--learning-rate", "0"], "learning_rate must be > 0"),
    ("margins-crossed", lambda t: ["--min-margin", "0.5", "--max-margin", "0.1"], "must be >= min_margin"),
    ("output-is-a-file", lambda t: ["--output", _write(t / "file.txt", "x")], "is an existing file, not a directory"),
    ("output-under-a-file", lambda t: ["--output", os.path.join(_write(t / "f", "x"), "run")], "is inside the file"),
    ("too-small-for-ks", lambda t: ["--synthetic-items", "20", "--ks", "1,10,20"],
     "recall_at_20 needs at least 20 gallery images in the test set"),
    ("garbage-encoder", lambda t: ["--text-encoder", _garbage_model(t)], "holds a saved_model.pb TensorFlow cannot load"),
]


@pytest.mark.parametrize("name, extra, message", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_exits_2_with_one_clear_line_and_writes_nothing(tmp_path, capsys, name, extra, message):
    out = tmp_path / "out" / "run"
    flags = [*TINY_FLAGS, "--text-cache-dir", str(tmp_path / "cache"), "--output", str(out)]
    extra = extra(tmp_path)
    overridden = [f for f in extra if f.startswith("--")]
    if "--config" in extra:  # a flag would override the YAML value under test
        text = open(extra[extra.index("--config") + 1]).read()
        overridden += ["--" + key.replace("_", "-") for key in re.findall(r"(?m)^(\w+):", text)]
    for flag in overridden:
        if flag in flags:
            j = flags.index(flag)
            del flags[j : j + 2]
    code = cli.main(["train", *flags, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and len([l for l in err.splitlines() if "error:" in l]) == 1
    assert not out.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--ks", "0"), ("--ks", "1,x"), ("--save-freq", "often"),
                                         ("--epochs", "five")])
def test_bad_flag_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_evaluate_limit_0_is_a_clean_error(tmp_path, capsys, reference):
    code = cli.main(["evaluate", "--model", reference.model_path, "--limit", "0"])
    assert code == 2 and "limit must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------- small catalogs
def _tiny_catalog(tmp_path, train_items: int, test_items: int, per_item: int = 3) -> str:
    rng = np.random.default_rng(0)
    rows = ["image,item_id,description,split"]
    for split, count in (("train", train_items), ("test", test_items)):
        for item in range(count):
            for view in range(per_item):
                path = tmp_path / "img" / f"{split}{item}_{view}.png"
                path.parent.mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
                rows.append(f"{path},{split}-{item},a {split} item number {item},{split}")
    return _write(tmp_path / "catalog.csv", "\n".join(rows) + "\n")


def test_catalog_too_small_for_a_validation_carve_trains_without_validation(tmp_path, capsys):
    """Before: `No rows in split 'val'` after decoding the catalog."""
    catalog = _tiny_catalog(tmp_path, train_items=4, test_items=3)
    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", f"catalog:{catalog}", "--image-size", "16", "--text-encoder", "hashing",
                     "--text-cache-dir", str(tmp_path / "cache"), "--p", "2", "--k", "2", "--epochs", "1",
                     "--steps-per-epoch", "2", "--ks", "1,5", "--embedding-dim", "8", "--projector-size", "0",
                     "--quiet", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: catalog:" in captured.err and "too few to carve a validation split" in captured.err
    assert "needs at least 5" in captured.err
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert not any(key.startswith("val_") for key in history)


def test_tiny_deepfashion_layout_loads_without_validation(tmp_path):
    """Before: `No rows in split 'val'` on a tiny official-layout catalog."""
    from atl_keras.data.datasets import load_retrieval_data
    from tests.test_deepfashion import make_inshop

    make_inshop(tmp_path)
    with pytest.warns(UserWarning, match="too few to carve a validation split"):
        data = load_retrieval_data(f"deepfashion-inshop:{tmp_path}", image_size=16)
    assert data.validation is None and data.test.protocol == "query->gallery"


def test_validation_set_too_small_for_a_k_validates_at_the_ks_that_fit(tmp_path):
    """Issue 28 item 3: a k the validation gallery cannot fill is dropped with a warning; the
    ks that fit are still validated (before: no validation at all)."""
    with pytest.warns(UserWarning, match="recall_at_20 needs at least 20 gallery images in the validation set"):
        result = run_training(TrainConfig(**_config(tmp_path, synthetic_items=60, ks=(1, 20), epochs=1)),
                              verbose=0)
    assert "val_recall_at_1" in result.history and "val_recall_at_20" not in result.history
    assert "recall_at_20" in result.test_metrics


# ----------------------------------------------------------------------- text encoders
def test_text_encoder_url_that_never_answers_times_out(monkeypatch):
    """Before: only the TCP connect was checked, then tensorflow_hub's urlopen waited for ever."""
    from atl_keras.text import TextEncoder

    for key in list(os.environ):
        if "proxy" in key.lower():
            monkeypatch.delenv(key)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(8)], daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/encoder-{uuid.uuid4().hex}"
    try:
        with pytest.raises(ConnectionError, match="accepted the connection but sent nothing for 0.5 s"):
            TextEncoder(url, read_timeout=0.5)
    finally:
        server.close()
    assert accepted  # the server did accept: the connect check alone could not catch it


def test_garbage_saved_model_is_a_clear_value_error(tmp_path):
    from atl_keras.text import TextEncoder

    with pytest.raises(ValueError, match="holds a saved_model.pb TensorFlow cannot load.*Re-export it"):
        TextEncoder(_garbage_model(tmp_path))


def test_every_phase_is_reported_in_order(reference):
    assert reference.phases == PHASES


# ------------------------------------------------------------------------- serving, query
def test_query_k_0_is_an_argparse_error(tmp_path, capsys):
    image = tmp_path / "q.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["query", "--model", "m", "--image", str(image), "--k", "0", "--server", "127.0.0.1:1"])
    assert exit_info.value.code == 2
    assert "argument --k: must be >= 1" in capsys.readouterr().err


def test_query_missing_tls_ca_file_is_one_error_line(tmp_path, capsys):
    image = tmp_path / "q.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    code = cli.main(["query", "--model", "m", "--image", str(image), "--tls-ca", str(tmp_path / "missing.pem"),
                     "--server", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read a TLS file" in err and "missing.pem" in err and "Traceback" not in err


def _certificate(tmp_path, name: str) -> tuple[str, str]:
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"], capture_output=True)
    if made.returncode:
        pytest.skip("needs the openssl CLI to make a test certificate")
    return str(key), str(cert)


def test_serve_with_a_key_that_does_not_match_the_certificate(tmp_path, capsys):
    """Before: reported at bind time as 'could not bind ...; is the port in use?'."""
    key_a, cert_a = _certificate(tmp_path, "a")
    key_b, _ = _certificate(tmp_path, "b")
    (tmp_path / "base").mkdir()
    code = cli.main(["serve", "--model_name", "m", "--model_base_path", str(tmp_path / "base"), "--port", "0",
                     "--ssl_cert", cert_a, "--ssl_key", key_b])
    err = capsys.readouterr().err
    assert code == 2 and "private key does not match the certificate" in err and "port in use" not in err


def test_serve_ssl_config_client_verify_without_ca(tmp_path, capsys):
    """Before: a gRPC traceback from ssl_server_credentials(require_client_auth=True, no roots)."""
    key, cert = _certificate(tmp_path, "a")
    config = tmp_path / "ssl.txt"
    config.write_text(f"server_key: {json.dumps(open(key).read())}\nserver_cert: {json.dumps(open(cert).read())}\n"
                      "client_verify: true\n")
    (tmp_path / "base").mkdir()
    code = cli.main(["serve", "--model_name", "m", "--model_base_path", str(tmp_path / "base"), "--port", "0",
                     "--ssl_config_file", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "client_verify: true needs custom_ca" in err and "Traceback" not in err


def test_undecodable_image_keeps_its_cause():
    """Before: the status message was only 'InvalidArgumentError: Graph execution error:'."""
    import io

    import grpc
    import tensorflow as tf

    from atl_keras.serving.errors import RequestError
    from atl_keras.serving.loader import SignatureInfo
    from atl_keras.serving.requests import run_signature

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, "JPEG")
    good = buffer.getvalue()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode(images):
        pixels = tf.map_fn(lambda b: tf.cast(tf.io.decode_jpeg(b, channels=3), tf.float32), images,
                           fn_output_signature=tf.TensorSpec([None, None, 3], tf.float32))
        return {"mean": tf.reduce_mean(pixels, axis=[1, 2, 3])}

    signature = SignatureInfo("retrieve", decode, {"images": tf.TensorSpec([None], tf.string)}, {})
    with pytest.raises(RequestError) as error:
        run_signature(signature, {"images": np.array([good, good[: len(good) // 2]], dtype=object)})
    message = error.value.message
    assert "inputs['images'][1] cannot be decoded as an image" in message
    assert "Invalid JPEG data" in message and "Graph execution error" not in message
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT

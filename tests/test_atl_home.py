"""Text encoders and description caches live in the ATL home ($ATL_HOME, else
~/.cache/atl-keras), never in the current directory: `atl` and `atl.load_text_encoder`
run from a user's directory outside the checkout write nothing there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atl_keras.home import atl_home, text_cache_dir, text_encoder_dir
from conftest import REPO_ROOT

ATL = [sys.executable, "-m", "atl_keras.cli"]


def environment(home: Path, atl_home_dir: Path | None) -> dict[str, str]:
    """A user's environment: this checkout's code, HOME in a temporary directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATL_HOME", "XDG_CACHE_HOME", "TF_CPP_MIN_LOG_LEVEL")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["HOME"] = str(home)
    if atl_home_dir is not None:
        env["ATL_HOME"] = str(atl_home_dir)
    return env


def test_atl_home_is_the_variable_else_the_user_cache(tmp_path):
    assert atl_home({"ATL_HOME": str(tmp_path)}) == (str(tmp_path), "$ATL_HOME")
    assert atl_home({"XDG_CACHE_HOME": str(tmp_path)})[0] == str(tmp_path / "atl-keras")
    home = os.path.expanduser("~")
    assert atl_home({})[0] == os.path.join(home, ".cache", "atl-keras")
    assert text_cache_dir(str(tmp_path)) == str(tmp_path / "text_encoders" / "cache")
    assert text_encoder_dir(str(tmp_path)) == str(tmp_path / "text_encoders")


def test_load_text_encoder_outside_the_checkout_reuses_atl_home(tmp_path):
    """`atl.load_text_encoder("use-m3")` finds the build in $ATL_HOME (here the checkout's, so
    nothing is built) and writes nothing into the current directory."""
    work = tmp_path / "work"
    work.mkdir()
    script = "import atl_keras as atl; print(atl.load_text_encoder('use-m3').handle)"
    result = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True,
                            env=environment(tmp_path / "home", REPO_ROOT / "saved_models"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    handle = Path(result.stdout.strip().splitlines()[-1])
    assert handle.resolve() == (REPO_ROOT / "saved_models" / "text_encoders" / "use-m3").resolve()
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("set_atl_home", [False, True])
def test_atl_outside_a_checkout_keeps_caches_in_atl_home(tmp_path, set_atl_home):
    """A directory that holds a stray ``saved_models/text_encoders/use-m3`` (from an earlier
    version) is not mistaken for a checkout: the cache goes to $ATL_HOME or ~/.cache/atl-keras."""
    work = tmp_path / "work"
    stray = work / "saved_models" / "text_encoders" / "use-m3"
    stray.mkdir(parents=True)
    (stray / "saved_model.pb").write_bytes(b"")
    home = tmp_path / "home"
    expected = tmp_path / "atl-home" if set_atl_home else home / ".cache" / "atl-keras"
    result = subprocess.run(
        [*ATL, "inspect-margins", "--dataset", "synthetic-shop", "--synthetic-items", "12",
         "--text-encoder", "hashing", "--output", "margins"],
        cwd=work, capture_output=True, text=True, timeout=600,
        env=environment(home, expected if set_atl_home else None),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"text encoders and caches in {expected} " in result.stdout
    assert "this checkout's" not in result.stdout
    assert sorted(p.name for p in work.iterdir()) == ["margins", "saved_models"]
    assert [p.name for p in (work / "saved_models" / "text_encoders").iterdir()] == ["use-m3"]  # untouched
    assert list((expected / "text_encoders" / "cache").glob("*.npz"))


def test_atl_replicate_keeps_its_caches_in_atl_home(tmp_path, monkeypatch, capsys):
    """`atl replicate` resolves its text cache under $ATL_HOME too (it defaulted to
    saved_models/text_encoders/cache in the current directory)."""
    from atl_keras.cli import main

    monkeypatch.setenv("ATL_HOME", str(tmp_path / "atl-home"))
    monkeypatch.chdir(tmp_path)
    assert main(["replicate", "--quick", "--from-records", str(tmp_path / "none.json")]) == 2
    out = capsys.readouterr().out
    assert f"atl replicate: text encoders and caches in {tmp_path / 'atl-home'} ($ATL_HOME)" in out
    assert not (tmp_path / "saved_models").exists()

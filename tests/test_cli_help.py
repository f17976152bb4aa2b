"""`-h` says the defaults: TrainConfig's for `atl train` / `atl inspect-margins` (read from
the source, so help imports no TensorFlow), argparse's for the commands with their own parser."""

from __future__ import annotations

import dataclasses
import re

import pytest

from atl_keras.cli import main
from atl_keras.cli.common import train_config_defaults
from atl_keras.cli.progress import progress_reporter


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "-h"])
    assert exit_info.value.code == 0
    return re.sub(r"\s+", " ", capsys.readouterr().out.split("options:", 1)[1])


def test_train_config_defaults_are_read_from_the_class_source():
    from atl_keras.train import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)
              if f.default is not dataclasses.MISSING}
    assert train_config_defaults() == fields


def test_train_help_shows_defaults(capsys):
    text = help_text(capsys, "train")
    for piece in ["--epochs EPOCHS (default: 3)", "--steps-per-epoch STEPS_PER_EPOCH (default: 150)",
                  "(default 1,10,20)", "labels (items) per batch (default: 16;",
                  "images per label per batch (default: 4;", "--embedding-dim EMBEDDING_DIM (default: 64)"]:
        assert piece in text, piece
    assert "(default: 64 for image files" in text
    assert "resnet50, mobilenetv3-small" in text and "(default: small_cnn)" in text
    assert "$ATL_HOME/text_encoders/cache" in text


@pytest.mark.parametrize("command, expected", [
    ("serve", ["(default: 8500)", "(default: 127.0.0.1)"]),
    ("query", ["(default: localhost:8500)", "(default: 10)"]),
    ("index", ["(default: 128)", "(default: 0.95)"]),
    ("export", ["(default: 0.95)"]),
    ("replicate", ["(default: shop)"]),
])
def test_other_commands_help_shows_defaults(capsys, command, expected):
    text = help_text(capsys, command)
    for piece in expected:
        assert piece in text, (command, piece)
    assert "(default: None)" not in text and "(default: )" not in text


def test_progress_lines_off_a_terminal(capsys):
    import sys

    show = progress_reporter("embedding", unit="img", stream=sys.stderr)
    for done in range(0, 101, 5):
        show(done, 100)
    lines = capsys.readouterr().err.splitlines()
    assert 10 <= len(lines) <= 12 and "\r" not in "".join(lines)
    assert lines[-1].startswith("embedding 100/100 (") and "took" in lines[-1]
    assert "ETA" in lines[1]

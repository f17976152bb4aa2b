"""The command line end to end on a tiny synthetic shop: train, evaluate, export, margins."""

from __future__ import annotations

import importlib.util
import json
import os

import keras
import numpy as np
import pytest

from atl_keras import cli
from conftest import REPO_ROOT

DATA = ["--dataset", "synthetic-shop", "--synthetic-items", "80", "--image-size", "24", "--seed", "3"]
TINY = [*DATA, "--text-encoder", "hashing", "--embedding-dim", "16", "--p", "6", "--k", "4"]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    cache = tmp_path_factory.mktemp("text-cache")
    code = cli.main(["train", *TINY, "--epochs", "1", "--steps-per-epoch", "3", "--quiet", "--augment",
                     "--text-cache-dir", str(cache), "--output", str(out)])
    assert code == 0
    return out, cache


def test_train_writes_model_metrics_config_and_logs(trained, capsys):
    out, _ = trained
    for name in ("model.keras", "metrics.json", "config.json"):
        assert (out / name).exists(), name
    assert any((out / "logs").rglob("*tfevents*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_protocol"] == "street->catalog"
    for key in ("recall_at_1", "recall_at_10", "recall_at_20", "map_at_r"):
        assert 0.0 <= metrics["test"][key] <= 1.0
    assert "val_recall_at_1" in metrics["history"]
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "synthetic-shop" and config["synthetic_items"] == 80 and config["augment"]


def test_evaluate_reproduces_the_training_metrics(trained, capsys):
    out, cache = trained
    code = cli.main(["evaluate", "--model", str(out / "model.keras"), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())["test"]
    assert printed["protocol"] == "street->catalog"
    for key in ("recall_at_1", "map_at_r", "r_precision"):
        assert printed[key] == pytest.approx(saved[key], abs=1e-6)


def test_export_tool_reads_the_training_config(trained, tmp_path, capsys):
    out, _ = trained
    export = load_tool("export")
    base = tmp_path / "saved" / "shop"
    code = export.main(["--model", str(out / "model.keras"), "--output-base", str(base),
                        "--min-recall", "0", "--portable-output-base", str(tmp_path / "saved" / "shop-portable")])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((base / "1" / "assets" / "manifest.json").read_text())
    assert manifest["dataset"] == "synthetic-shop" and manifest["protocol"] == "street->catalog"
    ids = (base / "1" / "assets" / "gallery_ids.txt").read_text().split()
    assert len(ids) == manifest["gallery_size"] and all("#" in i for i in ids)
    assert (tmp_path / "saved" / "shop-portable" / "1" / "saved_model.pb").exists()
    # A second export without --force never overwrites version 1: it writes version 2.
    assert export.main(["--model", str(out / "model.keras"), "--output-base", str(base),
                        "--min-recall", "0", "--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_inspect_margins_prints_quantiles_and_writes_a_plot(tmp_path, capsys):
    code = cli.main(["inspect-margins", *DATA, "--text-encoder", "hashing", "--output", str(tmp_path),
                     "--text-cache-dir", str(tmp_path / "cache"), "--semantic-threshold", "0.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "description distance quantiles" in printed and "nearest descriptions" in printed
    assert "not treated as negatives" in printed
    assert (tmp_path / "margins.png").stat().st_size > 1000


def test_yaml_config_and_flag_precedence(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("dataset: synthetic-shop\nepochs: 7\nmining: semi_hard\nks: [1, 5]\n")
    config = cli._train_config({"config_file": str(config_file), "epochs": 2})
    assert (config.epochs, config.mining, config.ks) == (2, "semi_hard", (1, 5))
    config_file.write_text("epocks: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        cli._train_config({"config_file": str(config_file)})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "imagenet"], "Unknown dataset"),
        (["train", "--dataset", "catalog:/nonexistent/shop.csv"], "shop.csv"),
        (["train", "--dataset", "synthetic-shop", "--k", "1"], "k must be >= 2"),
        (["evaluate", "--model", "/nonexistent/model.keras", "--dataset", "synthetic-shop",
          "--synthetic-items", "20"], "No model"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_export_serve_query_are_atl_subcommands(capsys):
    assert cli.main(["export", "--model", "/nonexistent/model.keras", "--output-base", "x"]) == 2
    assert "No model" in capsys.readouterr().err
    for command, usage in (("serve", "--model_base_path"), ("query", "--server")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert usage in capsys.readouterr().out


def test_export_onto_a_full_disk_is_one_line_and_publishes_nothing(trained, tmp_path, capsys):
    """Before: a raw ResourceExhaustedError traceback ([Op:SaveV2]) from a full disk."""
    from test_faults import tiny_disk

    out, _ = trained
    export = load_tool("export")
    with tiny_disk(tmp_path / "disk", "200k") as disk:
        code = export.main(["--model", str(out / "model.keras"), "--output-base", str(disk / "shop"),
                            "--min-recall", "0"])
        err = capsys.readouterr().err
        assert code == 1, err
        assert "nothing was published" in err and "Traceback" not in err
        left = sorted(p.name for p in (disk / "shop").iterdir()) if (disk / "shop").exists() else []
        assert not [name for name in left if name.isdigit() or name.startswith(".tmp-")], left


def test_export_output_base_that_is_a_file_fails_before_any_work(trained, tmp_path, capsys):
    out, _ = trained
    export = load_tool("export")
    base = tmp_path / "shop"
    base.write_text("not a directory")
    for flag in ("--output-base", "--portable-output-base"):
        argv = ["--model", str(out / "model.keras"), "--output-base", str(tmp_path / "ok"), "--min-recall", "0"]
        argv[argv.index("--output-base") + 1 if flag == "--output-base" else len(argv):] = (
            [str(base), "--min-recall", "0"] if flag == "--output-base" else [flag, str(base)])
        assert export.main(argv) == 2
        err = capsys.readouterr().err
        assert "is not a directory" in err and "Traceback" not in err
        assert base.read_text() == "not a directory"
        assert not (tmp_path / "ok").exists() or not any((tmp_path / "ok").iterdir())

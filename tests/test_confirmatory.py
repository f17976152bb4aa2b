"""Specification of the confirmatory Block C: its design, seed blocks that resume across hosts,
and a report that gives verdicts only for the complete pre-registered design (never the result)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atl_keras.experiments import CONFIRMATORY_SEEDS, ReplicationConfig, ReplicationResult, RunRecord
from atl_keras.experiments import confirmatory as conf
from atl_keras.experiments.runs import settings_key


def _config(tmp_path=None, seeds=CONFIRMATORY_SEEDS, schedule="converged"):
    return ReplicationConfig(experiment="weak_label_confirmatory", protocols=("variant_shop",), seeds=tuple(seeds),
                             schedule=schedule, work_dir=str(tmp_path or "runs/unused"))


def _record(config, method, seed, r1, host="host-a"):
    protocol = config.protocol("variant_shop")
    metrics = {"recall_at_1": r1, "variant_recall_at_1": r1 + 0.1, "attribute_agreement_at_10": 0.3 + r1 / 10,
               "attribute_agreement_chance": 0.1}
    return RunRecord("variant_shop", method.name, seed, {"variant_shop": metrics}, {}, {}, 120.0, host=host,
                     code_version="abc", settings_key=settings_key(protocol, method, seed, config))


def _records(config, seeds, oracle=0.05, text=0.03, spread=0.04, host="host-a"):
    rng = np.random.default_rng(0)
    out = []
    for seed in seeds:
        base = 0.6 + 0.01 * (seed % 7)
        for m in config.methods("variant_shop"):
            bonus = {"fixed": 0.0, "random": spread, "permuted": spread, "text": spread + text,
                     "oracle": spread + oracle}[m.margin_source]
            out.append(_record(config, m, seed, base + bonus + rng.normal(0, 0.005), host=host))
    return out


def test_block_c_design():
    config = _config()
    names = [m.name for m in config.methods("variant_shop")]
    assert names == [f"{s}_{m}" for m in ("bh", "sh") for s in ("fixed", "random", "permuted", "text", "oracle")]
    assert {m.margin_mapping for m in config.methods("variant_shop")} == {"catalog"}
    assert config.schedule_obj.epochs * config.schedule_obj.steps_per_epoch == 1800
    plan = config.plan()
    assert len(plan) == 100 and [s for _, _, s in plan] == sorted(s for _, _, s in plan)  # seed-major blocks


def test_report_on_partial_data_says_incomplete_and_gives_no_verdict():
    config = _config()
    records = _records(config, CONFIRMATORY_SEEDS[:4])
    report = conf.render_confirmatory_report(ReplicationResult(config, records, 1.0, "cmd", {}))
    assert "incomplete: 4 of 10 seeds" in report and "**No verdicts**" in report
    assert "YES" not in report and "HOLDS" not in report and "holds (> 0)" not in report
    assert "Not yet run: seeds 104, 105, 106, 107, 108, 109." in report
    assert sum(line.startswith("| `") for line in report.split("## Every run")[1].splitlines()) == 40


def test_complete_report_gates_the_text_verdict_on_the_positive_control():
    config = _config()
    report = conf.render_confirmatory_report(ReplicationResult(config, _records(config, CONFIRMATORY_SEEDS), 1.0))
    assert "complete (10 of 10 seeds)" in report
    assert "**Positive control** (oracle - permuted > 0, batch-hard): **HOLDS**" in report
    assert "**Text is used** (text - permuted > 0 under both miners): **YES**" in report
    assert "**Margin spread helps** (random - fixed > 0, batch-hard): **YES**" in report
    for name in ("R@1", "variant R@1", "attr. agreement@10"):
        assert name in report
    no_oracle = _records(config, CONFIRMATORY_SEEDS, oracle=0.0, spread=0.0)
    report = conf.render_confirmatory_report(ReplicationResult(config, no_oracle, 1.0))
    assert "**NOT SHOWN**" in report and "**Text is used**: **NOT INTERPRETABLE**" in report
    # not the pre-registered seeds: no verdicts even when complete
    other = _config(seeds=range(10))
    report = conf.render_confirmatory_report(ReplicationResult(other, _records(other, range(10)), 1.0))
    assert "Not the pre-registered design" in report and "YES" not in report


def _write(path, records):
    path.write_text(json.dumps({"records": [r.to_json() for r in records]}), encoding="utf-8")


def test_load_blocks_keeps_complete_single_host_blocks_with_matching_settings(tmp_path):
    config = _config(tmp_path)
    records = _records(config, [100])  # complete, one host
    mixed = _records(config, [101])
    mixed[3].host = "host-b"  # a block finished on two hosts is not a block
    short = _records(config, [102])[:-1]  # one run missing
    stale = _records(config, [103])
    stale[0].settings_key = "other-settings"
    other_host = _records(config, [104], host="host-b")  # complete on another host: kept
    _write(tmp_path / conf.RECORDS, records + mixed + short + stale + other_host)
    blocks = conf.load_blocks(str(tmp_path / conf.RECORDS), config)
    assert sorted(blocks) == [100, 104]
    assert all(r.reused for r in blocks[100]) and {r.host for r in blocks[104]} == {"host-b"}


def test_run_confirmatory_trains_only_missing_blocks_and_writes_after_each(tmp_path, monkeypatch):
    config = _config(tmp_path / "work", seeds=(100, 101, 102))
    _write_dir = tmp_path / "out"
    _write_dir.mkdir()
    _write(_write_dir / conf.RECORDS, _records(config, [100], host="host-b"))
    trained, blocks = [], []

    def fake_run_one(protocol, method, seed, cfg):  # the training itself is tested in test_replication
        trained.append((method.name, seed))
        return _record(cfg, method, seed, 0.5, host="host-a")

    monkeypatch.setattr(conf, "run_one", fake_run_one)
    result = conf.run_confirmatory(config, str(_write_dir), on_block=lambda seed, paths: blocks.append(seed))
    assert {s for _, s in trained} == {101, 102} and len(trained) == 20
    assert blocks == [101, 102]
    assert len(result.records) == 30
    report = (_write_dir / conf.REPORT).read_text(encoding="utf-8")
    assert "| 100 | host-b |" in report and "| 101 | host-a |" in report
    stored = json.loads((_write_dir / conf.RECORDS).read_text(encoding="utf-8"))["records"]
    assert len(stored) == 30
    with pytest.raises(ValueError, match="weak_label_confirmatory"):
        conf.run_confirmatory(ReplicationConfig(experiment="weak_label", protocols=("variant_shop",)), str(tmp_path))

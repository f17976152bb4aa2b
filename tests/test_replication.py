"""Specification of `atl replicate`: the helpers against small references, and the report's
STRUCTURE after a `--quick` run (never the result we hope for)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from atl_keras.experiments import (
    BASELINES,
    EVALUATIONS,
    MAIN_METHODS,
    PROTOCOLS,
    RunRecord,
    ShuffledTextEncoder,
    ablation_methods,
    aggregate,
    compare,
    derangement,
    paired_t_p_value,
    query_gallery_split,
    street_style,
    student_t_two_sided_p,
)
from atl_keras.text import HashingTextEncoder

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUMBER = r"-?\d+\.\d+"


# ------------------------------------------------------------------ pure helpers
def test_query_gallery_split_is_disjoint_stratified_and_covers_all_rows():
    labels = np.repeat(np.arange(4), [5, 6, 7, 8])
    q, g = query_gallery_split(labels, seed=3)
    assert set(q).isdisjoint(g)
    assert sorted(np.concatenate([q, g]).tolist()) == list(range(len(labels)))
    for c, n in zip(range(4), [5, 6, 7, 8]):
        assert np.sum(labels[q] == c) == (n + 1) // 2
        assert np.sum(labels[g] == c) == n // 2
    q2, g2 = query_gallery_split(labels, seed=3)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(g, g2)


def test_query_gallery_split_limit_caps_each_half():
    labels = np.repeat(np.arange(4), 50)
    q, g = query_gallery_split(labels, seed=0, limit=40)
    assert len(q) == len(g) == 40
    assert set(q).isdisjoint(g)
    assert np.bincount(labels[q]).tolist() == [10, 10, 10, 10]


def test_street_style_is_deterministic_per_image_and_changes_the_image():
    rng = np.random.default_rng(0)
    images = np.zeros((3, 28, 28, 1), np.uint8)
    images[:, 8:20, 10:18] = rng.integers(120, 255, size=(3, 12, 8, 1), dtype=np.uint8)
    out = street_style(images, seed=7)
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, street_style(images, seed=7))
    # image i only depends on (seed, i): transforming a prefix gives the same rows
    np.testing.assert_array_equal(out[:2], street_style(images[:2], seed=7))
    assert np.mean(np.abs(out.astype(int) - images.astype(int))) > 5  # clutter/warp/noise happened
    assert not np.array_equal(out, street_style(images, seed=8))
    with pytest.raises(ValueError, match="uint8"):
        street_style(images.astype(np.float32))


def test_chance_recall_matches_enumeration_of_all_rankings():
    import itertools

    from atl_keras.experiments import chance_recall

    gallery = np.array([0, 0, 1, 2, 2, 2])
    queries = np.array([0, 1, 2, 3])  # label 3 has no match: left out, like retrieval_metrics
    for k in (1, 2, 4, 6):
        want = []
        for q in queries[:3]:
            hits = [np.any(gallery[list(order[:k])] == q) for order in itertools.permutations(range(len(gallery)))]
            want.append(np.mean(hits))
        assert chance_recall(queries, gallery, k) == pytest.approx(np.mean(want))


def test_derangement_has_no_fixed_points_and_is_a_permutation():
    for n in (2, 3, 10, 57):
        for seed in range(5):
            p = derangement(n, seed)
            assert sorted(p.tolist()) == list(range(n))
            assert not np.any(p == np.arange(n))
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_shuffled_encoder_gives_each_text_another_texts_embedding():
    texts = ["red tee", "blue coat", "black boot", "white bag", None, ""]
    base = HashingTextEncoder(dim=64)
    shuffled = ShuffledTextEncoder(base, texts, seed=1)
    real = [t for t in texts if t]
    got = shuffled.encode(real)
    want = base.encode(real)
    for i, text in enumerate(real):
        partner = shuffled.mapping[text]
        assert partner != text
        np.testing.assert_allclose(got[i], want[real.index(partner)])
    assert sorted(shuffled.mapping.values()) == sorted(real)  # a permutation of the catalog's texts
    assert shuffled.identity != base.identity
    with pytest.raises(ValueError, match="not in the shuffled catalog"):
        shuffled.encode(["green dress"])


def _record(method: str, seed: int, r1: float, mapr: float) -> RunRecord:
    return RunRecord("shop", method, seed,
                     {"shop": {"recall_at_1": r1, "recall_at_10": r1, "recall_at_20": r1, "map_at_r": mapr}},
                     {"shop": [r1, r1]}, {}, 1.0)


def test_aggregate_and_compare_match_numpy_reference():
    atl = [0.30, 0.34, 0.32]
    base = [0.20, 0.21, 0.26]
    records = [_record("atl_use", s, v, v / 2) for s, v in enumerate(atl)]
    records += [_record("triplet_batch_hard", s, v, v / 2) for s, v in enumerate(base)]
    stats = aggregate(records)
    mean, std = stats[("shop", "atl_use")]["recall_at_1"]
    assert mean == pytest.approx(np.mean(atl)) and std == pytest.approx(np.std(atl, ddof=1))
    c = compare(records, "shop", "recall_at_1", "atl_use", "triplet_batch_hard")
    diff = np.subtract(atl, base)
    assert c.paired_diff == pytest.approx(diff.mean())
    assert c.paired_std == pytest.approx(np.std(diff, ddof=1))
    assert c.relative_gain == pytest.approx((np.mean(atl) - np.mean(base)) / np.mean(base))
    assert c.wins == 3 and c.verdict == "better"
    # the reverse comparison is "worse"; a within-noise difference is not a claim
    assert compare(records, "shop", "recall_at_1", "triplet_batch_hard", "atl_use").verdict == "worse"
    noisy = [_record("atl_use", s, v, v) for s, v in enumerate([0.30, 0.20, 0.40])]
    noisy += [_record("triplet_batch_hard", s, v, v) for s, v in enumerate([0.28, 0.25, 0.33])]
    assert compare(noisy, "shop", "recall_at_1", "atl_use", "triplet_batch_hard").verdict == "no clear difference"
    single = [_record("atl_use", 0, 0.5, 0.5), _record("triplet_batch_hard", 0, 0.1, 0.1)]
    assert compare(single, "shop", "recall_at_1", "atl_use", "triplet_batch_hard").verdict == "no verdict (n = 1 < 3)"


@pytest.mark.parametrize("t, df, p", [
    (12.706204736, 1, 0.05), (4.302652730, 2, 0.05), (3.182446305, 3, 0.05), (2.776445105, 4, 0.05),
    (2.570581836, 5, 0.05), (9.924843201, 2, 0.01), (4.604094871, 4, 0.01), (1.0, 1, 0.5),
    (0.0, 3, 1.0), (-2.776445105, 4, 0.05), (2.228138852, 10, 0.05),
])
def test_student_t_p_value_matches_t_tables(t, df, p):
    assert student_t_two_sided_p(t, df) == pytest.approx(p, abs=1e-6)


def test_paired_t_p_value_against_a_hand_computed_test():
    diff = [0.07, 0.10, 0.307]  # mean 0.159, sd 0.1292 -> t = 2.1318, df = 2
    t = np.mean(diff) / (np.std(diff, ddof=1) / np.sqrt(3))
    assert paired_t_p_value(diff) == pytest.approx(student_t_two_sided_p(t, 2))
    assert 0.16 < paired_t_p_value(diff) < 0.17
    assert math.isnan(paired_t_p_value([0.1]))
    c = compare([_record("atl_use", s, v, v) for s, v in enumerate([0.3, 0.4, 0.5])]
                + [_record("triplet_batch_hard", s, v, v) for s, v in enumerate([0.2, 0.2, 0.2])],
                "shop", "recall_at_1", "atl_use", "triplet_batch_hard")
    assert c.p_value == pytest.approx(paired_t_p_value([0.1, 0.2, 0.3]))


def test_paired_t_matches_scipy_and_student_t_quantiles():
    from scipy import stats

    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.3, 0.6, 10), rng.uniform(0.3, 0.6, 10)
    assert paired_t_p_value(a - b) == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    from atl_keras.experiments.statistics import t_critical

    assert t_critical(0.95, 9) == pytest.approx(2.262157, abs=1e-6)
    assert student_t_two_sided_p(t_critical(0.99, 4), 4) == pytest.approx(0.01, rel=1e-9)


def test_two_seeds_or_zero_variance_never_give_a_p_value_or_a_verdict():
    """Failed before issue 26: identical differences gave p = 0 and two seeds a verdict."""
    assert math.isnan(paired_t_p_value([0.1, 0.1]))  # was 0.0
    assert math.isnan(paired_t_p_value([0.1, 0.1, 0.1, 0.1]))  # zero variance: was 0.0
    assert math.isnan(paired_t_p_value([0.0, 0.0, 0.0]))
    assert math.isnan(paired_t_p_value([0.1, 0.3]))  # n = 2
    two = [_record("atl_use", s, v, v) for s, v in enumerate([0.5, 0.6])]
    two += [_record("triplet_batch_hard", s, v, v) for s, v in enumerate([0.1, 0.1])]
    assert compare(two, "shop", "recall_at_1", "atl_use", "triplet_batch_hard").verdict == "no verdict (n = 2 < 3)"
    same = [_record("atl_use", s, 0.3 + 0.1 * s, 0.3) for s in range(4)]
    same += [_record("triplet_batch_hard", s, 0.2 + 0.1 * s, 0.2) for s in range(4)]
    c = compare(same, "shop", "recall_at_1", "atl_use", "triplet_batch_hard")
    assert c.verdict == "no verdict (zero variance)" and math.isnan(c.p_value)


def test_the_quick_schedule_never_gives_a_verdict():
    from atl_keras import experiments as rep

    records = [_record("atl_use", s, 0.5 + 0.01 * s, 0.5) for s in range(5)]
    records += [_record(m, s, 0.1 + 0.02 * s * s, 0.1) for m in rep.BASELINES for s in range(5)]
    c = compare(records, "shop", "recall_at_1", "atl_use", "triplet_batch_hard", pipeline_check=True)
    assert c.verdict.startswith("no verdict (the quick schedule")
    config = rep.ReplicationConfig(protocols=("shop",), seeds=tuple(range(5)), schedule="quick")
    report = rep.render_report(rep.ReplicationResult(config, records, wall_seconds=1.0))
    assert "checks the pipeline only" in report
    assert "| better |" not in report and "ATL is better" not in report


def test_methods_share_everything_but_the_loss():
    names = [m.name for m in MAIN_METHODS]
    assert set(BASELINES) <= set(names) and "atl_use" in names
    assert {m.loss for m in MAIN_METHODS} == {"atl", "triplet"}
    groups = {m.ablation for m in ablation_methods()}
    assert groups == {"margin range", "semantic threshold", "text encoder", "control"}
    assert any(m.shuffle_descriptions for m in ablation_methods())
    mean_margin = [m for m in ablation_methods() if m.margin_from_text_mean]
    assert [(m.loss, m.mining, m.ablation) for m in mean_margin] == [("triplet", "batch_hard", "control")]


# ------------------------------------------------------------ the --quick report
@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicate")
    out, work = tmp / "results", tmp / "work"
    cmd = [sys.executable, "tools/replicate.py", "--quick", "--output", str(out), "--work-dir", str(work),
           "--text-cache-dir", str(tmp / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, (out / "replication.md").read_text(encoding="utf-8"), proc.stdout


def _rows(report: str, section: str) -> list[list[str]]:
    """Table rows (cells) between `section` heading and the next heading of the same or higher level."""
    start = report.index(section)
    level = section.split(" ")[0]
    rest = report[start + len(section):]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)
    body = rest[: end.start()] if end else rest
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in body.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]


@pytest.mark.slow
def test_quick_report_has_every_section_method_and_protocol(quick_report):
    out, report, stdout = quick_report
    for heading in ("# Replication", "## Setup", "## Results", "## ATL's gain over each baseline",
                    "## What the data say", "## Ablations", "## Per-run records"):
        assert re.search(rf"^{re.escape(heading)}", report, flags=re.M), heading
    for fact in ("Command: `python tools/replicate.py --quick", "CPU cores", "Wall time: 6 runs", "Seeds: 0 ",
                 "Chance level (random ranking"):
        assert fact in report, fact
    evaluations = [e for name in ("shop", "fmnist") for e in PROTOCOLS[name].evaluations]  # what --quick runs
    for evaluation in evaluations:
        rows = _rows(report, f"### {EVALUATIONS[evaluation]}\n")
        assert [r[0] for r in rows] == [m.name for m in MAIN_METHODS], (evaluation, rows)
        for row in rows:
            assert row[1] == "1"  # one seed in quick mode
            for cell in row[2:]:
                mean, std = (s.strip() for s in cell.split("±"))
                assert 0.0 <= float(mean) <= 1.0
                assert std == "n/a"  # a single seed has no spread; the report must not invent one
    gains = _rows(report, "## ATL's gain over each baseline")
    assert {(r[0], r[1], r[2]) for r in gains} == {
        (e, b, m) for e in evaluations for b in BASELINES for m in ("R@1", "MAP@R")}
    for row in gains:
        float(row[3]), float(row[4])
        assert re.fullmatch(r"[+-]\d+\.\d%|n/a", row[5])
        assert row[8] == "n/a"  # no p-value from one seed
        assert row[9].startswith("no verdict (the quick schedule checks the pipeline only)")
    records = _rows(report, "## Per-run records")
    assert len(records) == len(MAIN_METHODS) * len(evaluations)
    for row in records:
        assert all(re.fullmatch(NUMBER, cell) for cell in row[3:7])
    for evaluation in evaluations:
        for name in (f"replication_recall_{evaluation}.png", f"replication_grid_{evaluation}.png"):
            path = out / name
            assert path.exists(), name
            assert path.read_bytes()[:8] == PNG_MAGIC
            assert f"]({name})" in report
    assert "wrote" in stdout


def test_run_one_reuses_a_record_with_the_same_settings_and_retrains_on_change(tmp_path, monkeypatch):
    import json

    from atl_keras import experiments as rep
    from atl_keras.experiments import runs

    config = rep.ReplicationConfig(protocols=("shop",), seeds=(0,), schedule="quick", text_encoder="hashing",
                                   work_dir=str(tmp_path))
    protocol, method = rep.PROTOCOLS["shop"], rep.MAIN_METHODS[0]
    key = runs._run_key(runs.train_config(protocol, method, 0, config.schedule_obj, config), method, config)
    stored = _record(method.name, 0, 0.25, 0.125)
    stored.key = key
    path = runs._record_path(config, "shop", method.name, 0)
    (tmp_path / "records").mkdir()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stored.to_json(), f)

    def no_training(*args, **kwargs):
        raise AssertionError("run_one retrained although a matching record exists")

    monkeypatch.setattr("atl_keras.train.run_training", no_training)
    got = rep.run_one(protocol, method, 0, config)
    assert got.reused and dataclasses.replace(got, reused=False) == stored
    with pytest.raises(AssertionError, match="retrained"):  # other settings -> other key -> trains
        rep.run_one(protocol, dataclasses.replace(method, margin=0.3), 0, config)


def test_report_with_ablations_has_a_row_per_variant_and_the_control_reading():
    from atl_keras import experiments as rep

    config = rep.ReplicationConfig(protocols=("shop",), seeds=(0, 1, 2), schedule="quick", ablations=True)
    rng = np.random.default_rng(0)
    records = []
    for m in rep.MAIN_METHODS + rep.ablation_methods():
        for s in config.seeds:
            r = _record(m.name, s, float(rng.uniform(0.1, 0.5)), float(rng.uniform(0.1, 0.5)))
            r.semantic_threshold = 0.3 if m.threshold_quantile is not None else None
            if m.margin_from_text_mean:
                r.train_config = {"margin": 0.15 + 0.01 * s}
            records.append(r)
    result = rep.ReplicationResult(config, records, wall_seconds=60.0, command="python tools/replicate.py --ablations")
    report = rep.render_report(result)
    rows = _rows(report, "## Ablations")
    assert [r[1] for r in rows] == ["atl_use"] + [m.name for m in rep.ablation_methods()]
    for row in rows:
        assert row[2] == "3"
        for cell in row[3:5]:
            mean, std = (float(x) for x in cell.split("±"))
            assert 0 <= mean <= 1 and std >= 0
    assert "Reading:" in report and "real minus shuffled" in report
    assert "Semantic thresholds" in report
    assert "m = 0.150, 0.160, 0.170 (per seed)" in report
    assert "ATL minus `triplet_mean_margin`" in report


def test_load_result_round_trips_records_and_names_a_missing_run(tmp_path):
    import json

    from atl_keras import experiments as rep

    config = rep.ReplicationConfig(protocols=("shop",), seeds=(0, 1), schedule="quick")
    records = [_record(m.name, s, 0.1 * (s + 1), 0.05) for m in rep.MAIN_METHODS for s in config.seeds]
    path = tmp_path / "replication_records.json"
    path.write_text(json.dumps({"wall_seconds": 12.0, "command": "python tools/replicate.py --quick",
                                "environment": {"cpu_count": "2"},
                                "records": [r.to_json() for r in records]}), encoding="utf-8")
    result = rep.load_result(str(path), config)
    assert result.records == records and result.wall_seconds == 12.0
    assert result.command == "python tools/replicate.py --quick"
    with pytest.raises(ValueError, match="no record of 3 runs"):
        rep.load_result(str(path), rep.ReplicationConfig(protocols=("shop",), seeds=(0, 1, 2), schedule="quick"))


def test_frozen_shuffled_encoder_loads_as_a_text_encoder_and_matches(tmp_path):
    from atl_keras.experiments import save_lookup_encoder
    from atl_keras.text import load_text_encoder

    shuffled = ShuffledTextEncoder(HashingTextEncoder(dim=32), ["red tee", "blue coat", "black boot", "tan bag"], seed=2)
    path = save_lookup_encoder(shuffled, str(tmp_path / "shuffled"))
    frozen = load_text_encoder(path)  # a path string: JSON-serialisable in TrainConfig
    texts = sorted(shuffled.mapping)
    np.testing.assert_allclose(frozen.encode(texts), shuffled.encode(texts), atol=1e-6)
    assert np.all(frozen.encode(["green dress"]) == 0)  # unknown text -> zero row ("missing")


def test_atl_replicate_refuses_bad_input_clearly(tmp_path, capsys):
    from atl_keras.cli import main

    assert main(["replicate", "--seeds", "0", "--output", str(tmp_path)]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert main(["replicate", "--protocols", "nope", "--output", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    assert main(["replicate", "--from-records", str(missing), "--output", str(tmp_path)]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written on bad input

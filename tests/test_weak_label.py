"""Specification of the weak-label testbed and experiment: the variant shop, the statistics
of the pre-registered comparisons (against small references), and the report's STRUCTURE
after CI-sized runs (never the result)."""

from __future__ import annotations

import csv
import itertools
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from atl_keras.data.synthetic_shop import COLOURS, add_variant_listings, design_ids, make_synthetic_shop
from atl_keras.experiments import (
    ReplicationConfig,
    ReplicationResult,
    RunRecord,
    holm,
    paired_differences,
    render_weak_label_report,
    t_critical,
    weak_label_methods,
)
from atl_keras.experiments.statistics import paired_t_p_value

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- variant shop
@pytest.fixture(scope="module")
def variant_shop():
    return make_synthetic_shop(120, catalog_per_item=1, street_per_item=2, image_size=16, seed=3,
                               variant_fraction=0.5)


def test_variant_listings_share_a_design_and_differ_as_declared(variant_shop):
    attrs = variant_shop.item_attributes
    groups = design_ids(variant_shop)
    assert len(attrs) == 120 and len(set(groups)) < 120
    for design in np.unique(groups):
        members = [attrs[i] for i in np.flatnonzero(groups == design)]
        assert 1 <= len(members) <= 3
        original = [m for m in members if m["listing"] == "original"]
        assert len(original) == 1
        plain = {k: v for k, v in original[0].items() if k not in ("design", "listing")}
        for m in members:
            other = {k: v for k, v in m.items() if k not in ("design", "listing")}
            if m["listing"] == "relisting":
                assert other == plain
            elif m["listing"] == "colour variant":
                assert other["colour"] != plain["colour"]
                assert {k: v for k, v in other.items() if k != "colour"} == \
                       {k: v for k, v in plain.items() if k != "colour"}
    kinds = {a["listing"] for a in attrs}
    assert {"original", "relisting", "colour variant"} <= kinds
    assert len(set(variant_shop.descriptions)) == 120  # every listing its own text


def test_variant_listings_never_straddle_splits(variant_shop):
    groups = design_ids(variant_shop)
    split_of = {}
    for label, split in zip(variant_shop.labels, variant_shop.splits):
        split_of.setdefault(int(groups[label]), set()).add(str(split))
    assert all(len(s) == 1 for s in split_of.values())
    assert {"train", "val", "test"} <= set().union(*split_of.values())


def test_no_variants_gives_the_classic_shop_and_bad_arguments_fail():
    a = make_synthetic_shop(40, image_size=16, seed=5)
    b = make_synthetic_shop(40, image_size=16, seed=5, variant_fraction=0.0)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.descriptions == b.descriptions and a.item_attributes == b.item_attributes
    np.testing.assert_array_equal(design_ids(a), np.arange(40))
    with pytest.raises(ValueError, match="variant_fraction"):
        make_synthetic_shop(10, variant_fraction=1.5)
    with pytest.raises(ValueError, match="max_listings"):
        make_synthetic_shop(10, variant_fraction=0.5, max_listings=1)


def test_add_variant_listings_keeps_the_count_and_colour_variants_are_new_combinations():
    base = [{"category": "tee", "colour": c, "pattern": p} for c, p in itertools.product(list(COLOURS)[:4], ["solid", "dots"])]
    out = add_variant_listings(base, 1.0, 3, np.random.default_rng(0))
    assert len(out) == len(base)
    combos = [tuple(sorted((k, v) for k, v in a.items() if k not in ("design", "listing")))
              for a in out if a["listing"] != "relisting"]
    assert len(combos) == len(set(combos))  # originals and colour variants are all distinct products


# --------------------------------------------------------------------------- statistics
def test_t_critical_matches_tables():
    for df, expected in [(1, 12.706), (4, 2.776), (7, 2.365), (30, 2.042)]:
        assert t_critical(0.95, df) == pytest.approx(expected, abs=1e-3)
    assert t_critical(0.99, 7) == pytest.approx(3.499, abs=1e-3)


def _holm_reference(p, alpha=0.05):
    """Holm by its textbook definition: reject H_(1..k) with k the largest index such that
    p_(i) <= alpha / (m - i + 1) for every i <= k."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    rejected = [False] * m
    for rank, i in enumerate(order):
        if p[i] > alpha / (m - rank):
            break
        rejected[i] = True
    adjusted = [0.0] * m
    for rank, i in enumerate(order):
        adjusted[i] = min(1.0, max((m - r) * p[order[r]] for r in range(rank + 1)))
    return adjusted, rejected


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.005], [0.2, 0.001, 0.049, 0.5, 0.012], [0.06], [0.0125, 0.0124, 0.5]])
def test_holm_matches_the_textbook_definition(p):
    adjusted, rejected, levels = holm(p)
    ref_adjusted, ref_rejected = _holm_reference(np.array(p))
    np.testing.assert_allclose(adjusted, ref_adjusted)
    assert rejected == ref_rejected
    assert sorted(levels) == sorted(1 - 0.05 / (len(p) - r) for r in range(len(p)))


def _record(method, seed, r1, variant=None):
    metrics = {"recall_at_1": r1, "recall_at_10": min(1.0, r1 + 0.3), "map_at_r": r1 / 2}
    if variant is not None:
        metrics.update(variant_recall_at_1=variant, attribute_agreement_at_10=0.5, attribute_agreement_chance=0.2)
    return RunRecord("variant_shop", method, seed, {"variant_shop": metrics}, {}, {}, 1.0,
                     host="test-host", code_version="abc")


def test_paired_differences_against_a_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.3, 0.5, 8)
    b = a - rng.normal(0.03, 0.01, 8)
    records = [_record("x", s, a[s]) for s in range(8)] + [_record("y", s, b[s]) for s in range(8)]
    (d,) = paired_differences(records, "variant_shop", "recall_at_1", [("x - y", "x", "y")])
    diff = a - b
    half = 2.3646 * diff.std(ddof=1) / math.sqrt(8)
    assert d.n == 8 and d.wins == int(np.sum(diff > 0))
    assert d.mean == pytest.approx(diff.mean()) and d.low == pytest.approx(diff.mean() - half, abs=1e-4)
    assert d.p_value == pytest.approx(paired_t_p_value(diff))
    assert d.holds and d.verdict == "holds (> 0)"  # one comparison: Holm = the plain test


def _synthetic_result(effect: float, seeds=range(8), schedule="weak_label", noise=0.002):
    config = ReplicationConfig(experiment="weak_label", protocols=("variant_shop",), seeds=tuple(seeds),
                               schedule=schedule)
    rng = np.random.default_rng(1)
    records = []
    for method in config.methods("variant_shop"):
        for s in config.seeds:
            base = 0.4 + 0.01 * s
            bonus = effect if method.margin_source == "text" else 0.0
            records.append(_record(method.name, s, base + bonus + rng.normal(0, noise), variant=base + 0.1))
    return ReplicationResult(config, records, wall_seconds=1.0, command="atl replicate --experiment weak_label",
                             environment={"cpu_count": "2"})


def test_report_lists_every_condition_and_run_and_applies_the_decision_rules():
    report = render_weak_label_report(_synthetic_result(effect=0.05))
    names = [m.name for m in weak_label_methods()]
    assert len(names) == 9
    for name in names:
        assert f"`{name}`" in report
    run_rows = [line for line in report.splitlines() if line.startswith("| `") and "| test-host |" in line]
    assert len(run_rows) == 9 * 8
    for label in ("C1", "C2", "C3", "C4", "C5"):
        assert f"| {label} " in report
    assert "**Text is used** (C1 and C2 hold): **YES**" in report
    assert "**ATL helps beyond mining** (C3 holds): **YES**" in report
    assert "Secondary: variant R@1" in report and "attr. agreement@10" in report
    assert "Attribute agreement of a random ranking: 0.200" in report

    null = render_weak_label_report(_synthetic_result(effect=0.0))
    assert "**Text is used** (C1 and C2 hold): **NOT SHOWN**" in null


def test_one_seed_is_reported_as_not_testable():
    report = render_weak_label_report(_synthetic_result(effect=0.05, seeds=[0]))
    assert "no verdict (n = 1 < 3)" in report and "**No verdicts**" in report


def _verdict_lines(report: str) -> str:
    return report.split("### Verdicts")[1].split("###")[0]


def test_two_seeds_give_no_verdict():
    """Failed before issue 26: two seeds with a consistent difference gave 'holds' and a YES."""
    report = render_weak_label_report(_synthetic_result(effect=0.05, seeds=[0, 1]))
    assert "YES" not in _verdict_lines(report) and "holds (> 0)" not in report
    assert "no verdict (n = 2 < 3)" in report


def test_zero_variance_differences_give_no_p_and_no_verdict():
    """Failed before issue 26: identical paired differences gave p = 0, 'holds' and 'Holm p < 0.001'."""
    records = [_record("x", s, 0.4 + 0.01 * s) for s in range(6)] + [_record("y", s, 0.3 + 0.01 * s) for s in range(6)]
    (d,) = paired_differences(records, "variant_shop", "recall_at_1", [("x - y", "x", "y")])
    assert d.n == 6 and d.mean == pytest.approx(0.1)
    assert math.isnan(d.p_value) and math.isnan(d.holm_p) and not d.holds
    assert d.verdict == "no verdict (zero variance)"
    report = render_weak_label_report(_synthetic_result(effect=0.05, noise=0.0))
    assert "YES" not in _verdict_lines(report) and "< 0.001" not in report and "holds (> 0)" not in report


def test_quick_schedule_never_gives_verdicts_and_says_it_checks_the_pipeline():
    """Failed before issue 26: a strong effect under the quick schedule gave YES verdicts."""
    report = render_weak_label_report(_synthetic_result(effect=0.05, schedule="quick"))
    assert "checks the pipeline only" in report
    assert "YES" not in _verdict_lines(report) and "holds (> 0)" not in report


def test_a_users_report_claims_no_pre_registration_and_no_shop():
    config = ReplicationConfig(experiment="weak_label", dataset="catalog:products.csv", seeds=(0, 1, 2, 3),
                               schedule="weak_label")
    rng = np.random.default_rng(2)
    records = [RunRecord("catalog", m.name, s, {"catalog": {"recall_at_1": float(rng.uniform(0.2, 0.4))}}, {}, {},
                         1.0, host="h", code_version="c") for m in config.methods("catalog") for s in config.seeds]
    report = render_weak_label_report(ReplicationResult(config, records, wall_seconds=1.0))
    assert "pre-registered" not in report and "fixes the shop" not in report and "synthetic shop" not in report
    assert "**Text is used on this catalog**" in report
    assert "random (uniform) - fixed, batch-hard" in report and "text - random (uniform), semi-hard" in report


def test_replicate_help_does_not_offer_the_quick_schedule_for_an_answer(capsys):
    from atl_keras.cli.replicate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["-h"])
    out = capsys.readouterr().out
    catalog_lines = [line for line in out.splitlines() if "catalog:" in line and "MY catalog" in line]
    assert catalog_lines and not any("quick" in line for line in catalog_lines)


def test_weak_label_conditions_differ_only_in_their_margin_table():
    methods = weak_label_methods()
    for a, b in itertools.combinations(methods, 2):
        fields = {f for f in a.__dataclass_fields__ if getattr(a, f) != getattr(b, f)}
        assert fields <= {"name", "title", "mining", "margin_source", "variant_threshold", "ablation"}
    assert {m.margin_mapping for m in methods} == {"catalog"}


# --------------------------------------------------------------------------- the command
def _write_catalog(root: pathlib.Path, items: int = 48) -> pathlib.Path:
    shop = make_synthetic_shop(items, catalog_per_item=2, street_per_item=2, image_size=16, seed=0)
    rows = []
    for row, (label, domain) in enumerate(zip(shop.labels, shop.domains)):
        path = root / "images" / f"{row:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shop.images[row]).save(path)
        rows.append({"image": f"images/{path.name}", "item_id": shop.item_ids[label],
                     "description": shop.descriptions[label], "domain": str(domain)})
    csv_path = root / "products.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "item_id", "description", "domain"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


@pytest.mark.slow
def test_atl_replicate_on_a_users_catalog_writes_the_weak_label_report(tmp_path):
    catalog = _write_catalog(tmp_path)
    out = tmp_path / "report"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "atl_keras.cli", "replicate", "--dataset", f"catalog:{catalog}", "--seeds", "2",
         "--schedule", "quick", "--text-encoder", "hashing", "--output", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "weak_label.md").read_text(encoding="utf-8")
    for name in ("fixed_bh", "permuted_bh", "shuffled_text_bh", "text_bh", "fixed_sh", "text_sh"):
        assert f"`{name}`" in report
    assert "oracle" not in report.split("### Every run")[0].split("### Every condition")[1]  # no attributes
    assert "**Text is used on this catalog**" in report
    assert (out / "weak_label_records.json").exists()


def test_atl_replicate_on_a_too_small_catalog_says_what_is_missing(tmp_path):
    catalog = _write_catalog(tmp_path, items=8)
    proc = subprocess.run(
        [sys.executable, "-m", "atl_keras.cli", "replicate", "--dataset", f"catalog:{catalog}", "--seeds", "1",
         "--schedule", "quick", "--text-encoder", "hashing", "--output", str(tmp_path / "out"),
         "--work-dir", str(tmp_path / "work")],
        cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_quick_never_writes_over_published_results(tmp_path):
    from atl_keras.cli.replicate import parse_args

    args = parse_args(["--quick"])
    assert args.output is None  # resolved to runs/replicate-quick in main(), never results/
    from atl_keras.cli import main

    assert main(["replicate", "--experiment", "paper", "--dataset", "catalog:x.csv"]) == 2


# --------------------------------------------------------------------------- proxy losses beside ATL (issue 15)
def test_proxy_methods_share_atls_controls_and_differ_only_in_the_loss():
    import dataclasses

    from atl_keras.experiments import weak_label_proxy_methods
    from atl_keras.experiments.runs import train_config

    config = ReplicationConfig(experiment="weak_label", protocols=("variant_shop",), seeds=(0, 1, 2),
                               schedule="weak_label", proxy_seeds=(0, 1), proxy_oracle=True)
    protocol = config.protocol("variant_shop")
    atl = {m.margin_source: m for m in weak_label_methods() if m.mining == "batch_hard"}
    proxies = weak_label_proxy_methods()
    assert [m.name for m in proxies] == ["adaptive_proxy_text", "adaptive_proxy_permuted", "adaptive_proxy_fixed",
                                         "proxy_anchor", "adaptive_proxy_oracle"]
    for method in proxies:
        assert method.is_proxy and not method.is_atl
        source = method.margin_source if method.loss == "adaptive_proxy" else "text"
        a = dataclasses.asdict(train_config(protocol, method, 1, config.schedule_obj, config))
        b = dataclasses.asdict(train_config(protocol, atl[source], 1, config.schedule_obj, config))
        assert {k for k in a if a[k] != b[k]} == {"loss", "output_dir"}, method.name
    assert weak_label_proxy_methods(oracle=False)[-1].name == "proxy_anchor"


def test_proxy_seeds_are_run_seed_major_on_their_seeds_only_and_checked():
    config = ReplicationConfig(experiment="weak_label", protocols=("variant_shop",), seeds=(0, 1, 2),
                               schedule="quick", proxy_seeds=(0, 1))
    plan = [(m.name, s) for _, m, s in config.plan()]
    assert len(plan) == 9 * 3 + 4 * 2
    assert [s for _, s in plan] == sorted(s for _, s in plan)  # seed-major: stopping keeps paired seeds
    assert {s for name, s in plan if name == "proxy_anchor"} == {0, 1}
    assert "adaptive_proxy_oracle" not in {name for name, _ in plan}  # opt-in (proxy_oracle)
    assert len(ReplicationConfig(experiment="weak_label", protocols=("variant_shop",), seeds=(0, 1),
                                 schedule="quick").plan()) == 18  # no proxies unless asked
    with pytest.raises(ValueError, match="among seeds"):
        ReplicationConfig(experiment="weak_label", protocols=("variant_shop",), seeds=(0, 1), proxy_seeds=(2,))
    with pytest.raises(ValueError, match="weak_label"):
        ReplicationConfig(seeds=(0, 1), proxy_seeds=(0,))


def _result_with_proxies(proxy_seeds=(0, 1, 2)):
    base = _synthetic_result(effect=0.05)
    config = ReplicationConfig(experiment="weak_label", protocols=("variant_shop",), seeds=base.config.seeds,
                               schedule="weak_label", proxy_seeds=proxy_seeds)
    rng = np.random.default_rng(5)
    extra = [_record(m.name, s, 0.45 + 0.01 * s + (0.03 if m.name == "adaptive_proxy_text" else 0.0)
                     + rng.normal(0, 0.001), variant=0.5)
             for m in config.methods("variant_shop") if m.is_proxy for s in proxy_seeds]
    return base, ReplicationResult(config, base.records + extra, 1.0, base.command, base.environment)


def test_report_adds_the_proxy_losses_beside_atl_and_leaves_the_pre_registered_analysis_unchanged():
    base, with_proxies = _result_with_proxies()
    plain, report = render_weak_label_report(base), render_weak_label_report(with_proxies)
    head = lambda text: text.split("### Context")[0].split("## Synthetic shop")[1]  # noqa: E731
    assert head(report) == head(plain)  # conditions, C1-C5, verdicts, secondary metrics: identical
    assert "Proxy losses (an addition, not pre-registered" in report and "seeds 0, 1, 2" in report
    addition = report.split("### Addition (not pre-registered)")[1].split("### Every run")[0]
    assert "Proxy runs on seeds 0, 1, 2; the ATL rows here are restricted to the same seeds." in addition
    for name in ("text_bh", "permuted_bh", "fixed_bh", "oracle_bh", "text_sh", "adaptive_proxy_text",
                 "adaptive_proxy_permuted", "adaptive_proxy_fixed", "proxy_anchor"):
        assert f"| `{name}` | 3 |" in addition, name  # n = the proxy seeds, ATL restricted to them
    for label in ("P1", "P2", "P3", "P4", "P5", "P6"):
        assert f"| {label} " in addition
    assert "| P7 " not in addition  # no oracle proxy run
    p1 = next(line for line in addition.splitlines() if line.startswith("| P1 "))
    cells = [c.strip() for c in p1.split("|")]
    assert cells[2:4] == ["3", "3/3"] and float(cells[4]) == pytest.approx(0.03, abs=0.003)  # on the 3 proxy seeds
    runs = report.split("### Every run")[1]
    assert sum(line.startswith("| `proxy_anchor` |") for line in runs.splitlines()) == 3


def test_atl_replicate_refuses_more_proxy_seeds_than_seeds(capsys):
    from atl_keras.cli import main

    assert main(["replicate", "--experiment", "weak_label", "--seeds", "2", "--proxies", "3"]) == 2
    assert "--proxies" in capsys.readouterr().err


# --------------------------------------------------------------------------- early stopping (issue 26)
def test_users_catalogs_default_to_early_stopping():
    from atl_keras.cli.replicate import default_schedule, parse_args
    from atl_keras.experiments import SCHEDULES

    assert default_schedule(parse_args(["--dataset", "catalog:x.csv"]), "weak_label") == "early_stopping"
    assert default_schedule(parse_args(["--experiment", "weak_label"]), "weak_label") == "weak_label"
    assert default_schedule(parse_args(["--dataset", "catalog:x.csv", "--quick"]), "weak_label") == "quick"
    schedule = SCHEDULES["early_stopping"]
    assert schedule.early_stopping_patience and schedule.epochs * schedule.steps_per_epoch == 2000
    assert "stopping when validation R@1 has not improved for 3 epochs" in schedule.description


def test_training_stops_when_validation_recall_stops_improving(tmp_path):
    import json

    from atl_keras.train import TrainConfig, run_training

    config = TrainConfig(dataset="synthetic-shop", synthetic_items=40, image_size=16, text_encoder="hashing",
                         p=4, k=2, epochs=8, steps_per_epoch=2, ks=(1,), embedding_dim=8, validation_size=40,
                         output_dir=str(tmp_path / "run"), projector_size=0, early_stopping_patience=1)
    result = run_training(config, verbose=0)
    val = result.history["val_recall_at_1"]
    assert result.epochs_trained == len(val) <= 8
    assert result.best_epoch == int(np.argmax(val)) + 1  # the first best epoch's weights are kept
    if result.epochs_trained < 8:  # stopped: exactly `patience` epochs without improvement
        assert result.epochs_trained == result.best_epoch + 1
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["best_epoch"] == result.best_epoch
    with pytest.raises(ValueError, match="early_stopping_patience"):
        TrainConfig(early_stopping_patience=0)


@pytest.mark.slow
def test_replicate_on_a_catalog_reports_the_steps_each_run_used(tmp_path):
    """CI-sized, structure only: early stopping on a user's catalog, steps in the report."""
    from atl_keras.experiments import Schedule, run_replication, write_report

    catalog = _write_catalog(tmp_path)
    schedule = Schedule(epochs=4, steps_per_epoch=2, validation_size=40, early_stopping_patience=1)
    config = ReplicationConfig(experiment="weak_label", dataset=f"catalog:{catalog}", seeds=(0,), schedule=schedule,
                               text_encoder="hashing", work_dir=str(tmp_path / "work"))
    result = run_replication(config)
    names = {r.method for r in result.records}
    assert {"fixed_bh", "random_bh", "permuted_bh", "shuffled_text_bh", "text_bh"} <= names
    for r in result.records:
        assert 2 <= r.steps_used <= r.steps_trained <= 8 and r.steps_used % 2 == 0
    report = (tmp_path / "out" / "weak_label.md")
    write_report(result, str(report.parent))
    text = report.read_text(encoding="utf-8")
    assert "Steps per run (early stopping" in text and "steps (scored / trained)" in text
    assert "stopping when validation R@1 has not improved for 1 epochs" in text

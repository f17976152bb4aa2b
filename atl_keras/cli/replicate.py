"""`atl replicate`: the paper's claim (ATL vs triplet baselines) or whether the weak label helps.

    atl replicate --quick                         # CI-sized, < 2 min, hashing encoder, into runs/replicate-quick
    atl replicate --seeds 5 --ablations           # the published replication (~80 min, 2 cores)
    atl replicate --experiment weak_label         # the pre-registered margin-source experiment (8 seeds, 240 steps)
    atl replicate --experiment weak_label_confirmatory   # Block C: trained models, seeds 100-109, resumable
    atl replicate --experiment weak_label --proxies 8   # + the proxy losses beside ATL (issue 15)
    atl replicate --dataset catalog:products.csv --seeds 5   # does text help on MY catalog? (early stopping)
    atl replicate --dataset catalog:products.csv --schedule quick --seeds 1   # pipeline check only, no verdicts

(`python tools/replicate.py` is the same command.) Writes <output>/replication.md,
<output>/replication_*.png and replication_records.json (the weak-label experiment:
<output>/weak_label.md and weak_label_records.json; Block C: weak_label_confirmatory.md and
weak_label_confirmatory_records.json, rewritten after each complete seed block, and a rerun on any
host keeps the complete blocks of that file). `--quick` never writes over the
published results/: its default output is runs/replicate-quick. Each run's record is kept in
<work-dir>/records/ and reused by a rerun with identical settings, so an interrupted
replication resumes where it stopped (--no-reuse retrains). A thin CLI over
`atl_keras.experiments`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from atl_keras.cli.common import DefaultsHelpFormatter
from atl_keras.cli.environment import apply_home
from atl_keras.experiments import (
    CONFIRMATORY_SEEDS,
    PROTOCOLS,
    SCHEDULES,
    EXPERIMENTS,
    ReplicationConfig,
    load_result,
    run_replication,
    write_report,
)


def parse_args(argv: list[str] | None = None, prog: str = "atl replicate") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: schedule 'quick', 1 seed, hashing text encoder (same report structure).")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds, from --first-seed (default 5; 8 for the weak-label experiment; "
                             "10 for weak_label_confirmatory; 1 with --quick). Verdicts need at least 3")
    parser.add_argument("--first-seed", type=int, default=None,
                        help="first seed (default 0; 100 for weak_label_confirmatory)")
    parser.add_argument("--output", default=None,
                        help="report and plot directory (default: results; runs/replicate-quick with --quick)")
    parser.add_argument("--experiment", choices=EXPERIMENTS, default=None,
                        help="paper: triplet baselines vs ATL; weak_label: margin sources (fixed, random, text, "
                             "oracle) x miners (default: paper; weak_label with --dataset)")
    parser.add_argument("--dataset", default=None, metavar="SPEC",
                        help="run the weak-label controls on your data: catalog:PATH.csv|.jsonl or "
                             "deepfashion-inshop:ROOT (implies --experiment weak_label)")
    parser.add_argument("--protocols", default=None,
                        help=f"comma-separated, from {', '.join(PROTOCOLS)} (default: shop,fmnist; "
                             "variant_shop for the weak-label experiment)")
    parser.add_argument("--ablations", action="store_true",
                        help="also run the ATL ablations (margin range, threshold, encoder, shuffled-text control)")
    parser.add_argument("--ablation-protocols", default="shop", help="protocols the ablations run on (default: shop)")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                        help="training budget preset (default: full; weak_label for the weak-label experiment; "
                             "converged for weak_label_confirmatory; early_stopping with --dataset: each run trains "
                             "until validation R@1 stops improving, at most 2000 steps; quick with --quick). 'quick' (1 x 4 steps) checks the pipeline only: its reports give no "
                             "verdicts")
    parser.add_argument("--text-encoder", default=None, help="ATL's text encoder (default use-m3; hashing with --quick)")
    parser.add_argument("--work-dir", default=None,
                        help="run directories and per-run records (default: runs/replication; runs/weak-label)")
    parser.add_argument("--text-cache-dir", default=None,
                        help="description-embedding cache (default: $ATL_HOME/text_encoders/cache, "
                        "$ATL_HOME defaulting to ~/.cache/atl-keras)")
    parser.add_argument("--from-records", default=None, metavar="JSON",
                        help="re-render the report from a replication_records.json (no training); give the same "
                             "--schedule/--seeds/--protocols/--ablations it was made with")
    parser.add_argument("--proxies", type=int, default=0, metavar="N",
                        help="weak_label experiment: also train the proxy losses (adaptive proxy with the text, "
                             "permuted, fixed margins; ProxyAnchor) on seeds 0..N-1 and report them beside "
                             "ATL (an addition to the pre-registered design; default 0: not run)")
    parser.add_argument("--proxy-oracle", action="store_true",
                        help="with --proxies: also the adaptive proxy loss with oracle margins")
    parser.add_argument("--no-reuse", action="store_true", help="retrain runs even when a matching record exists")
    return parser.parse_args(argv)


def default_schedule(args: argparse.Namespace, experiment: str) -> str:
    """The schedule a command line asks for: --schedule, else quick (--quick), early_stopping
    (a user's --dataset), or the experiment's own."""
    if args.schedule:
        return args.schedule
    if args.quick:
        return "quick"
    if args.dataset:
        return "early_stopping"
    return {"weak_label": "weak_label", "weak_label_confirmatory": "converged"}.get(experiment, "full")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _confirmatory(config: ReplicationConfig, args: argparse.Namespace, output: str, command: str,
                  start: float) -> int:
    """Block C: run the missing seed blocks (or re-render from --from-records), report after each block."""
    from atl_keras.experiments.confirmatory import confirmatory_result, run_confirmatory, write_confirmatory

    try:
        if args.from_records:
            if not os.path.exists(args.from_records):
                raise FileNotFoundError(f"no records file {args.from_records}")
            paths = write_confirmatory(confirmatory_result(config, args.from_records, command), output)
        else:
            paths = {}

            def on_block(seed: int, written: dict[str, str]) -> None:
                paths.update(written)
                print(f"seed {seed}: block complete; wrote {written['report']} and {written['records']} "
                      f"({(time.perf_counter() - start) / 60:.1f} min so far)", flush=True)

            result = run_confirmatory(config, output, progress=lambda msg: print(msg, flush=True), command=command,
                                      on_block=on_block)
            paths = paths or write_confirmatory(result, output)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {paths['report']} ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


def main(argv: list[str] | None = None, prog: str = "atl replicate") -> int:
    """Run the replication (or re-render it with --from-records); 0 on success, 2 on bad input."""
    args = parse_args(argv, prog)
    experiment = args.experiment or ("weak_label" if args.dataset else "paper")
    if args.dataset and experiment != "weak_label":
        print("error: --dataset runs the weak-label experiment; drop --experiment paper", file=sys.stderr)
        return 2
    confirmatory = experiment == "weak_label_confirmatory"
    default_seeds = {"weak_label": 8, "weak_label_confirmatory": len(CONFIRMATORY_SEEDS)}.get(experiment, 5)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else default_seeds)
    first_seed = args.first_seed if args.first_seed is not None else (CONFIRMATORY_SEEDS[0] if confirmatory else 0)
    protocols = args.protocols or ("variant_shop" if experiment.startswith("weak_label") else "shop,fmnist")
    schedule = default_schedule(args, experiment)
    output = args.output or ("runs/replicate-quick" if args.quick else "results")
    if seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.proxies < 0 or args.proxies > seeds:
        print(f"error: --proxies must be between 0 and --seeds ({seeds}): the proxy runs are paired with ATL's "
              "seeds", file=sys.stderr)
        return 2
    try:
        config = ReplicationConfig(
            protocols=_comma_list(protocols),
            seeds=tuple(range(first_seed, first_seed + seeds)),
            schedule=schedule,
            experiment=experiment,
            dataset=args.dataset,
            ablations=args.ablations,
            ablation_protocols=_comma_list(args.ablation_protocols),
            text_encoder=args.text_encoder or ("hashing" if args.quick else "use-m3"),
            # --quick keeps its records apart: a quick run must not overwrite a full run's records.
            work_dir=args.work_dir or ("runs/replicate-quick/work" if args.quick else
                                       {"weak_label": "runs/weak-label",
                                        "weak_label_confirmatory": "runs/weak-label-confirmatory"}.get(
                                           experiment, "runs/replication")),
            proxy_seeds=tuple(range(args.proxies)),
            proxy_oracle=args.proxy_oracle,
            text_cache_dir=args.text_cache_dir,
            reuse=not args.no_reuse,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = apply_home(config, "replicate")
    command = f"{prog} " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    start = time.perf_counter()
    if confirmatory:
        return _confirmatory(config, args, output, command.strip(), start)
    if args.from_records:
        try:
            result = load_result(args.from_records, config)  # keeps the command and times of the training run
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        try:
            result = run_replication(config, progress=lambda msg: print(msg, flush=True), command=command.strip())
        except (ValueError, FileNotFoundError) as err:  # the user's data or settings: one clear line
            print(f"error: {err}", file=sys.stderr)
            return 2
    paths = write_report(result, output)
    print(f"wrote {paths['report']} ({len(result.records)} runs, {(time.perf_counter() - start) / 60:.1f} min)")
    for name, path in sorted(paths.items()):
        if name != "report":
            print(f"  {name}: {path}")
    return 0

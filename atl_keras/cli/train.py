"""`atl train`: train an embedding model, evaluate it on the dataset's test protocol."""

from __future__ import annotations

import argparse
import os
import sys

from atl_keras.cli.environment import add_weight_arguments, apply_allow_download, apply_home

from atl_keras.cli.common import (
    add_data_arguments,
    positive_ints,
    save_freq,
    show_train_config_defaults,
    train_config,
)
from atl_keras.losses.registry import LOSSES, MINING_MODES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an embedding model and evaluate it",
        argument_default=argparse.SUPPRESS,
        description="Flags override --config (YAML with TrainConfig field names), which "
        "overrides the defaults.",
    )
    p.add_argument("--config", dest="config_file", help="YAML file of TrainConfig fields")
    add_data_arguments(p)
    p.add_argument("--output", dest="output_dir")
    p.add_argument("--loss", choices=list(LOSSES),
                   help="; ".join(f"{spec.name}: {spec.summary}" for spec in LOSSES.values())
                   + " (proxy losses learn one proxy per training item, docs/proxy_losses.md)")
    p.add_argument("--mining", choices=list(MINING_MODES))
    p.add_argument("--distance", choices=["squared_l2", "l2", "cosine"])
    p.add_argument("--margin", type=float, help="triplet loss margin")
    p.add_argument("--min-margin", type=float, help="ATL margin of identical descriptions")
    p.add_argument("--max-margin", type=float, help="ATL margin of opposite descriptions")
    p.add_argument("--margin-source", choices=["text", "shuffled_text", "permuted", "fixed", "oracle", "random"],
                   help="where ATL's per-pair margins come from (default text; random: i.i.d. uniform margins in "
                   "[min, max] per item pair, needs no descriptions; the others are controls, see "
                   "atl_keras.margins.sources)")
    p.add_argument("--margin-mapping", choices=["linear", "paper", "catalog"],
                   help="text distance -> margin: linear (default), paper (unverified preset), catalog "
                   "(the catalog's 1st-99th percentile stretched onto [min, max]: margins that spread)")
    p.add_argument("--semantic-threshold", type=float,
                   help="negatives whose description distance is below this are not negatives")
    p.add_argument("--missing-text-margin", type=float,
                   help="margin for pairs where an item has no description (default: midpoint)")
    p.add_argument("--proxy-scale", type=float,
                   help="proxy losses' scale (default 16 adaptive_proxy, 32 proxy_anchor's alpha)")
    p.add_argument("--proxy-anchor-margin", type=float, help="ProxyAnchor's delta (default 0.1)")
    p.add_argument("--proxy-lr-multiplier", type=float,
                   help="proxies' learning rate over the model's (default 10)")
    p.add_argument("--text-encoder",
                   help="use-m3 (built-in, offline), hashing, a local TF-Hub SavedModel dir or a URL")
    p.add_argument("--text-cache-dir")
    p.add_argument("--backbone",
                   help="small_cnn, or a keras.applications name: resnet50, mobilenetv3-small, "
                   "efficientnetv2-b0, ... (all: python -c 'import atl_keras as atl; print(atl.available_backbones())')")
    add_weight_arguments(p)
    p.add_argument("--embedding-dim", type=int)
    p.add_argument("--p", type=int, help="labels (items) per batch")
    p.add_argument("--k", type=int, help="images per label per batch")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--validation-size", type=int)
    p.add_argument("--test-size", type=int, help="evaluate on the first N test queries")
    p.add_argument("--ks", type=positive_ints,
                   help="Recall@K values to report, comma-separated (default 1,10,20)")
    p.add_argument("--strategy", choices=["auto", "one_device", "mirrored", "multi_worker", "tpu"],
                   help="tf.distribute strategy (auto: all GPUs if >= 2, else one device; "
                   "multi_worker reads TF_CONFIG); see docs/distributed.md")
    p.add_argument("--logical-cpus", type=int,
                   help="split the CPU into N logical devices first (test the mirrored path without GPUs)")
    p.add_argument("--tpu", help="TPU name or grpc:// address for --strategy tpu")
    p.add_argument("--no-cross-replica-mining", dest="cross_replica_mining", action="store_false",
                   help="mine triplets inside each replica's slice instead of the global batch")
    p.add_argument("--augment", action="store_true",
                   help="random flip, translation, zoom, brightness and contrast on training batches")
    p.add_argument("--mixed-precision", action="store_true",
                   help="mixed_float16 on GPUs (loss scaling), mixed_bfloat16 on CPUs/TPUs")
    p.add_argument("--fresh", action="store_true",
                   help="delete the backup in --output (an interrupted run, or one with other settings) "
                        "and start over; without it a backup of other settings stops the run")
    p.add_argument("--save-freq", type=save_freq,
                   help="back up for resumption every N steps or 'epoch' (default)")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="skip TF op determinism (faster on GPUs; runs no longer bit-reproducible)")
    p.add_argument("--projector-size", type=int,
                   help="test gallery images in the TensorBoard projector export (0: none)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (default: a progress bar on a terminal, one line per epoch otherwise)")
    show_train_config_defaults(p)


def run(args: argparse.Namespace) -> int:
    from atl_keras.metrics import format_metrics_table
    from atl_keras.train import run_training

    values = vars(args)
    quiet = values.pop("quiet", False)
    apply_allow_download(values)
    config = apply_home(train_config(values), "train")
    print(f"atl train: {config.loss} loss ({config.mining}) on {config.dataset}, "
          f"text encoder {config.text_encoder}, output {config.output_dir}", flush=True)
    try:
        # Keras' progress bar on a terminal; one plain line per epoch in a redirected log.
        verbose = 0 if quiet else (1 if sys.stdout.isatty() else 2)
        result = run_training(config, verbose=verbose,
                              progress=lambda message: print(f"atl train: {message}", flush=True))
    except KeyboardInterrupt:
        print(f"atl train: {interrupted_message(config)}", file=sys.stderr, flush=True)
        return 130
    print(f"\nTest retrieval ({describe_test(result.data)}) on {config.dataset}, "
          f"trained in {result.seconds:.0f} s:")
    print(format_metrics_table(result.test_metrics))
    print(f"\nModel: {result.model_path}\nMetrics: {os.path.join(result.output_dir, 'metrics.json')}"
          f"\nTensorBoard: tensorboard --logdir {os.path.join(result.output_dir, 'logs')}")
    return 0


def interrupted_message(config) -> str:
    """One line after Ctrl-C: what was kept and how to go on."""
    from atl_keras.train import BACKUP_DIR, backup_epoch

    backup_dir = os.path.join(config.output_dir, BACKUP_DIR)
    done = backup_epoch(backup_dir)
    if done is None:
        return "interrupted before the first backup; rerun the same command to start over."
    if done >= config.epochs:
        return (f"interrupted after training; the backup in {backup_dir} is kept: rerun the same "
                "command to write the final files.")
    return (f"interrupted; the backup in {backup_dir} ({done} of {config.epochs} epochs done) is kept: "
            f"rerun the same command to resume from epoch {done + 1}.")


def describe_test(data) -> str:
    """The test protocol, and whether its labels (items or classes) were trained on: the
    shop's test items never are; Fashion-MNIST's 10 classes are, unless --unseen-classes."""
    if data is None:
        return "test"
    import numpy as np

    test = data.test
    labels = test.query_labels if test.gallery_labels is None else np.concatenate(
        [test.query_labels, test.gallery_labels])
    if np.isin(labels, data.train_labels).any():
        return f"{test.protocol}, new images of labels seen in training"
    return f"{test.protocol}, items unseen in training"

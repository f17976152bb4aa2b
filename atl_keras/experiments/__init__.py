"""Replicate the paper's claim: ATL vs the fixed-margin triplet loss, same budget, several seeds.

    from atl_keras.experiments import ReplicationConfig, run_replication, write_report
    result = run_replication(ReplicationConfig(schedule="quick", seeds=(0,)))
    paths = write_report(result, "results")      # replication.md + PNG plots

Every method trains the SAME backbone with the SAME P x K sampler, schedule and budget
(`atl_keras.train.run_training`); only the loss (and its mining / text encoder) changes.

Methods (`MAIN_METHODS`): ``triplet_batch_hard`` and ``triplet_semi_hard`` (fixed margin),
``atl_use`` (adaptive margin from the built-in Universal Sentence Encoder, batch-hard mining
under each negative's own margin). Ablations (`ablation_methods`) vary ATL's margin range,
its semantic threshold, the text encoder (``hashing``) and run a CONTROL whose descriptions
are shuffled across items (`ShuffledTextEncoder`): if ATL's gain comes from the text, the
control must lose it.

Protocols (`PROTOCOLS`), each giving one or more evaluation settings:

- ``shop``: synthetic shop, street photo -> catalog shots of items never seen in training
  (evaluation ``shop``).
- ``fmnist``: Fashion-MNIST trained on 6 classes, tested on the 4 held out
  (`FMNIST_UNSEEN`). The held-out test images are split into a query half and a gallery half
  (stratified, fixed seed, no image in both); evaluations ``fmnist_clean`` (clean queries)
  and ``fmnist_street`` (street-style queries from `street_style`; the gallery stays clean).

The library never prints: pass `progress` to `run_replication` to hear about each run.

Modules: `methods` (recipes), `protocols` (datasets, schedules, config), `evaluation`
(query/gallery settings), `controls` (shuffled text), `runs` (training + records),
`statistics` (seeds, paired tests), `plots`, `report`, `weak_label` (does the weak label
help? margin-source conditions, pre-registered comparisons, its report), `confirmatory`
(Block C on trained models: resumable seed blocks, positive control, verdicts when complete).
"""
from atl_keras.experiments.methods import BASELINES, MAIN_METHODS, Method, ablation_methods
from atl_keras.experiments.protocols import CONFIRMATORY_SEEDS, EXPERIMENTS, EVALUATIONS, FMNIST_UNSEEN, METRICS, PROTOCOLS, Protocol, ReplicationConfig, SCHEDULES, Schedule
from atl_keras.experiments.evaluation import query_gallery_split, street_style
from atl_keras.experiments.controls import ShuffledTextEncoder, derangement, save_lookup_encoder
from atl_keras.experiments.runs import ReplicationResult, RunRecord, load_result, run_one, run_replication
from atl_keras.experiments.statistics import aggregate, compare, no_verdict_reason, paired_t_p_value, student_t_two_sided_p, t_critical
from atl_keras.experiments.plots import chance_recall, plot_recall_curves, plot_retrieval_grid
from atl_keras.experiments.report import render_report, write_report
from atl_keras.experiments.methods import weak_label_methods, weak_label_proxy_methods
from atl_keras.experiments.weak_label import holm, paired_differences, render_weak_label_report

__all__ = [
    "BASELINES",
    "CONFIRMATORY_SEEDS",
    "EVALUATIONS",
    "EXPERIMENTS",
    "FMNIST_UNSEEN",
    "MAIN_METHODS",
    "METRICS",
    "Method",
    "PROTOCOLS",
    "Protocol",
    "ReplicationConfig",
    "ReplicationResult",
    "RunRecord",
    "SCHEDULES",
    "Schedule",
    "ShuffledTextEncoder",
    "ablation_methods",
    "aggregate",
    "chance_recall",
    "compare",
    "derangement",
    "load_result",
    "no_verdict_reason",
    "paired_t_p_value",
    "plot_recall_curves",
    "plot_retrieval_grid",
    "query_gallery_split",
    "render_report",
    "run_one",
    "run_replication",
    "save_lookup_encoder",
    "street_style",
    "student_t_two_sided_p",
    "write_report",
    "weak_label_methods",
    "weak_label_proxy_methods",
    "holm",
    "paired_differences",
    "render_weak_label_report",
    "t_critical",
]

"""Recall@K curves and retrieval grids of a replication."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from atl_keras.experiments.evaluation import EvalSetting, evaluation_settings
from atl_keras.experiments.methods import ATL_USE, MAIN_METHODS, TRIPLET_BATCH_HARD, ablation_methods, method_title
from atl_keras.experiments.protocols import EVALUATIONS
from atl_keras.experiments.runs import ReplicationResult, train_config
from atl_keras.experiments.statistics import aggregate

def plot_recall_curves(result: ReplicationResult, evaluation: str, path: str) -> str:
    """PNG: mean Recall@K (K = 1..max_k) per main method on `evaluation`, +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = aggregate(result.records)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for method in MAIN_METHODS + (ablation_methods() if result.config.ablations else ()):
        entry = stats.get((evaluation, method.name))
        if entry is None or (method.ablation and method.ablation != "control"):
            continue
        mean, std = entry["curve"]
        ks = np.arange(1, len(mean) + 1)
        style = {"atl_shuffled": "--", "triplet_mean_margin": ":"}.get(method.name, "-")
        ax.plot(ks, mean, style, marker="o", markersize=3,
                label=f"{method_title(method, result.config)} (n={entry['n']})")
        ax.fill_between(ks, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("K")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("Recall@K")
    ax.set_title(EVALUATIONS.get(evaluation, evaluation), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_retrieval_grid(
    query_images: np.ndarray,
    query_labels: np.ndarray,
    gallery_images: np.ndarray,
    gallery_labels: np.ndarray,
    panels: Sequence[tuple[str, dict[str, list]]],
    path: str,
    title: str = "",
) -> str:
    """PNG: for each query row, the query then its top-5 under each panel's method, side by side.

    Args:
        query_images, gallery_images: uint8 ``[N, H, W, C]``.
        panels: ``(method title, {"queries": [q rows], "top": [[gallery rows] per query]})``;
            every panel must list the same queries.
    Correct matches get a green frame, wrong ones red.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = panels[0][1]["queries"]
    for name, grid in panels:
        if grid["queries"] != queries:
            raise ValueError(f"Panel {name!r} shows other queries than {panels[0][0]!r}; use the same seed and evaluation.")
    top = len(panels[0][1]["top"][0])
    cols = len(panels) * (top + 1)
    fig, axes = plt.subplots(len(queries), cols, figsize=(cols * 0.9, len(queries) * 1.05 + 0.5), dpi=100, squeeze=False)

    def show(ax, image, colour=None):
        image = np.asarray(image)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                  vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(colour is not None)
            if colour:
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5)

    for row, q in enumerate(queries):
        for p, (name, grid) in enumerate(panels):
            base = p * (top + 1)
            show(axes[row, base], query_images[q], "blue")
            if row == 0:
                axes[row, base].set_title(f"{name}\nquery", fontsize=6, loc="left")
            for j, g in enumerate(grid["top"][row]):
                ok = gallery_labels[g] == query_labels[q]
                show(axes[row, base + 1 + j], gallery_images[g], "green" if ok else "red")
                if row == 0:
                    axes[row, base + 1 + j].set_title(f"#{j + 1}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def chance_recall(query_labels: np.ndarray, gallery_labels: np.ndarray, k: int) -> float:
    """Expected Recall@k under a uniformly random ranking of the gallery.

    Per query with ``R`` matches among ``N`` gallery items: ``1 - C(N - R, k) / C(N, k)``,
    averaged over the queries with ``R > 0``.
    """
    gallery_labels = np.asarray(gallery_labels)
    n = len(gallery_labels)
    values, counts = np.unique(gallery_labels, return_counts=True)
    r_of = dict(zip(values.tolist(), counts.tolist()))
    out = []
    for label in np.asarray(query_labels).tolist():
        r = r_of.get(label, 0)
        if r == 0:
            continue
        # C(N-R, k) / C(N, k) = prod_{i<k} (N-R-i) / (N-i)
        miss = 1.0
        for i in range(min(k, n)):
            miss *= max(n - r - i, 0) / (n - i)
        out.append(1.0 - miss)
    return float(np.mean(out)) if out else math.nan


def _first_seed_settings(result: ReplicationResult) -> dict[str, EvalSetting]:
    """The evaluation sets of the first seed, rebuilt from the data (deterministic per seed)."""
    from atl_keras.train import load_data

    config, schedule = result.config, result.config.schedule_obj
    out: dict[str, EvalSetting] = {}
    for name in config.protocols:
        protocol = result.config.protocol(name)
        train_cfg = train_config(protocol, ATL_USE, config.seeds[0], schedule, config)
        for s in evaluation_settings(protocol, load_data(train_cfg), schedule):
            out[s.name] = s
    return out


def _grid_plots(result: ReplicationResult, settings: dict[str, EvalSetting], output_dir: str) -> dict[str, str]:
    """Retrieval grids (ATL vs triplet batch-hard, first seed) for each evaluation."""
    config = result.config
    seed = config.seeds[0]
    by_key = {(r.protocol, r.method, r.seed): r for r in result.records}
    paths = {}
    for name in config.protocols:
        atl = by_key.get((name, ATL_USE.name, seed))
        base = by_key.get((name, TRIPLET_BATCH_HARD.name, seed))
        if atl is None or base is None:
            continue
        for evaluation in result.config.protocol(name).evaluations:
            s = settings[evaluation]
            path = os.path.join(output_dir, f"replication_grid_{s.name}.png")
            paths[s.name] = plot_retrieval_grid(
                s.query_images, s.query_labels, s.gallery_images, s.gallery_labels,
                [(method_title(ATL_USE, config), atl.grids[s.name]), (TRIPLET_BATCH_HARD.title, base.grids[s.name])],
                path, title=f"{EVALUATIONS[s.name]} - seed {seed} (green = same item/class)",
            )
    return paths

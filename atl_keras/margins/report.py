"""The inspect-margins report: the margins a catalog's descriptions produce, to choose ATL's range.

    config = TrainConfig(dataset="synthetic-shop")
    report = inspect_margins(config, load_data(config), output_dir="runs/margins")
    print(report.text)          # distance quantiles, margins, nearest descriptions
    report.plot_path            # PNG: histograms of description distances and margins

`atl inspect-margins` is the command-line face of this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from atl_keras.distances import max_distance
from atl_keras.margins.mapping import MAPPINGS, linear_margins, text_distance_table
from atl_keras.margins.sources import margin_spread, margin_table
from atl_keras.text import embed_descriptions, load_text_encoder

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@dataclass
class MarginReport:
    """Statistics of the pairwise description distances of distinct training items."""

    distances: np.ndarray  # [P] upper-triangle pairwise text distances
    margins: np.ndarray  # [P] the ATL margin of each pair
    quantiles: dict[float, float]
    below_threshold: float | None
    text: str
    plot_path: str
    nearest: list[tuple[str, list[tuple[float, str]]]] = field(default_factory=list)


def margin_statistics(
    text_embeddings: np.ndarray,
    min_margin: float,
    max_margin: float,
    distance: str = "squared_l2",
    semantic_threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[float, float], float | None]:
    """Distances and margins over all pairs of distinct items with known text.

    Returns `(distances [P], margins [P], quantiles of distances, share of pairs below
    semantic_threshold or None)`.
    """
    d = text_distance_table(text_embeddings, distance)
    upper = d[np.triu_indices(len(d), k=1)]
    upper = upper[np.isfinite(upper)]
    if upper.size == 0:
        raise ValueError("Fewer than two items with a description: nothing to compare.")
    margins = linear_margins(upper, min_margin, max_margin, distance)
    quantiles = {q: float(np.quantile(upper, q)) for q in QUANTILES}
    below = None if semantic_threshold is None else float(np.mean(upper < semantic_threshold))
    return upper, margins, quantiles, below


def _plot(distances: np.ndarray, margins: np.ndarray, threshold: float | None, path: str,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].hist(distances, bins=60, color="#4c72b0")
    axes[0].set_xlabel("description distance d(g_a, g_n)")
    axes[0].set_ylabel("item pairs")
    if threshold is not None:
        axes[0].axvline(threshold, color="#c44e52", linestyle="--", label="semantic_threshold")
        axes[0].legend()
    axes[1].hist(margins, bins=60, color="#55a868")
    axes[1].set_xlabel("ATL margin m_an")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mapping_spreads(text: np.ndarray, config) -> dict[str, str]:
    """One line per margin mapping: mean, sd, CV, min and max of the margins it gives the
    items' pairs (``paper`` only for squared_l2)."""
    out = {}
    for mapping in MAPPINGS:
        if mapping == "paper" and config.distance != "squared_l2":
            continue
        table = margin_table("text", text_embeddings=text, mapping=mapping, min_margin=config.min_margin,
                             max_margin=config.max_margin, distance=config.distance,
                             missing_text_margin=config.missing_text_margin)
        s = margin_spread(table)
        out[mapping] = (f"mean {s['mean']:.3f}, sd {s['sd']:.3f}, CV {s['cv']:.3f}, "
                        f"range {s['min']:.3f}-{s['max']:.3f}")
    return out


def inspect_margins(config, data, output_dir: str = "runs/margins", examples: int = 5) -> MarginReport:
    """Margins of the training items of `data` under `config`'s encoder and range.

    `config` is an `atl_keras.train.TrainConfig` (dataset, text encoder, margins) and `data`
    its `RetrievalData` (`atl_keras.train.load_data(config)`; only ``train_labels`` and
    ``descriptions`` are read). Writes `margins.png` into `output_dir`; returns the report.
    """
    from atl_keras.home import with_home_dirs

    config = with_home_dirs(config)  # None text directories: the ATL home
    items = np.unique(data.train_labels)
    descriptions = [data.descriptions[i] for i in items]
    encoder = load_text_encoder(config.text_encoder, cache_dir=config.text_encoder_dir)
    text = embed_descriptions(descriptions, encoder, cache_dir=config.text_cache_dir)
    distances, margins, quantiles, below = margin_statistics(
        text, config.min_margin, config.max_margin, config.distance, config.semantic_threshold
    )
    os.makedirs(output_dir, exist_ok=True)
    plot_path = os.path.join(output_dir, "margins.png")
    _plot(distances, margins, config.semantic_threshold, plot_path,
          f"{config.dataset}: {len(items)} items, encoder {config.text_encoder}")

    pairwise = text_distance_table(text, config.distance)
    rng = np.random.default_rng(config.seed)
    known = [i for i, d in enumerate(descriptions) if d]
    nearest = []
    for row in rng.choice(known, size=min(examples, len(known)), replace=False):
        order = [j for j in np.argsort(pairwise[row]) if j != row and np.isfinite(pairwise[row, j])]
        nearest.append(
            (descriptions[row], [(float(pairwise[row, j]), descriptions[j]) for j in order[:3]])
        )

    lines = [
        f"{config.dataset}: {len(items)} training items, {len(distances)} item pairs, "
        f"text encoder {config.text_encoder}, distance {config.distance} "
        f"(max {max_distance(config.distance):g})",
        "description distance quantiles: "
        + ", ".join(f"q{int(q * 100):02d}={v:.3f}" for q, v in quantiles.items()),
        f"margins with min_margin={config.min_margin}, max_margin={config.max_margin}: "
        f"min {margins.min():.3f}, median {np.median(margins):.3f}, max {margins.max():.3f}",
    ]
    lines.append("margin spread per mapping (sd / mean = coefficient of variation; "
                 "--margin-mapping chooses, see atl_keras.margins.mapping):")
    lines.extend(f"  {name:8s} {line}" for name, line in mapping_spreads(text, config).items())
    if below is not None:
        lines.append(
            f"semantic_threshold={config.semantic_threshold}: {below:.1%} of item pairs are "
            "not treated as negatives"
        )
    lines.append("\nnearest descriptions:")
    for description, neighbours in nearest:
        lines.append(f"  {description}")
        lines.extend(f"    {d:.3f}  {other}" for d, other in neighbours)
    return MarginReport(
        distances=distances,
        margins=margins,
        quantiles=quantiles,
        below_threshold=below,
        text="\n".join(lines),
        plot_path=plot_path,
        nearest=nearest,
    )

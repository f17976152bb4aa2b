"""The training recipes compared: triplet baselines, ATL and its ablations and controls."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from atl_keras.experiments.protocols import ReplicationConfig

@dataclass(frozen=True)
class Method:
    """One training recipe: the loss and what feeds it; everything else is shared.

    `text_encoder=None` means "the replication's main encoder" (``use-m3``; ``hashing`` in
    quick mode). `threshold_quantile` sets ATL's ``semantic_threshold`` to that quantile of
    the pairwise description distances of the training catalog (so it masks that share of
    the closest pairs), resolved per run. `margin_from_text_mean` gives a fixed-margin
    triplet loss the mean of the margins ATL (with `min_margin`/`max_margin` and the main
    encoder) assigns to the training catalog's item pairs, resolved per run.
    """

    name: str
    title: str
    loss: str
    mining: str = "batch_hard"
    text_encoder: str | None = None
    min_margin: float = 0.05
    max_margin: float = 0.4
    margin: float = 0.2
    threshold_quantile: float | None = None
    shuffle_descriptions: bool = False
    margin_from_text_mean: bool = False  # fixed margin = ATL's mean margin over training item pairs
    ablation: str = ""  # which ablation group this belongs to ("" = main comparison)
    margin_source: str = "text"  # see atl_keras.margins.SOURCES
    margin_mapping: str = "linear"  # see atl_keras.margins.MAPPINGS
    variant_threshold: bool = False  # semantic_threshold = median text distance of training variant pairs

    @property
    def is_atl(self) -> bool:
        return self.loss == "atl"

    @property
    def is_proxy(self) -> bool:
        """One learnable proxy per training item (``adaptive_proxy``, ``proxy_anchor``)."""
        return self.loss in ("adaptive_proxy", "proxy_anchor")

TRIPLET_BATCH_HARD = Method("triplet_batch_hard", "Triplet (m=0.2), batch-hard", "triplet", "batch_hard")
TRIPLET_SEMI_HARD = Method("triplet_semi_hard", "Triplet (m=0.2), semi-hard", "triplet", "semi_hard")
ATL_USE = Method("atl_use", "ATL (USE, m in [0.05, 0.4]), batch-hard", "atl", "batch_hard")
MAIN_METHODS: tuple[Method, ...] = (TRIPLET_BATCH_HARD, TRIPLET_SEMI_HARD, ATL_USE)
BASELINES = ("triplet_batch_hard", "triplet_semi_hard")


def ablation_methods() -> tuple[Method, ...]:
    """ATL variants; each differs from `ATL_USE` in one thing (the default range is `ATL_USE`)."""
    return (
        dataclasses.replace(ATL_USE, name="atl_margin_0.1_0.3", title="ATL, m in [0.1, 0.3]",
                            min_margin=0.1, max_margin=0.3, ablation="margin range"),
        dataclasses.replace(ATL_USE, name="atl_margin_0.0_0.8", title="ATL, m in [0.0, 0.8]",
                            min_margin=0.0, max_margin=0.8, ablation="margin range"),
        dataclasses.replace(ATL_USE, name="atl_tau_q01", title="ATL, tau = 1% quantile",
                            threshold_quantile=0.01, ablation="semantic threshold"),
        dataclasses.replace(ATL_USE, name="atl_tau_q05", title="ATL, tau = 5% quantile",
                            threshold_quantile=0.05, ablation="semantic threshold"),
        dataclasses.replace(ATL_USE, name="atl_hashing", title="ATL, hashing text encoder",
                            text_encoder="hashing", ablation="text encoder"),
        dataclasses.replace(ATL_USE, name="atl_shuffled", title="CONTROL: ATL, shuffled descriptions",
                            shuffle_descriptions=True, ablation="control"),
        dataclasses.replace(TRIPLET_BATCH_HARD, name="triplet_mean_margin",
                            title="CONTROL: Triplet, batch-hard, m = ATL's mean margin",
                            margin_from_text_mean=True, ablation="control"),
    )


def method_title(method: Method, config: ReplicationConfig) -> str:
    """The method's title, naming the encoder actually used (e.g. ``hashing`` in quick mode)."""
    encoder = method.text_encoder or config.text_encoder
    if (method.is_atl or method.is_proxy) and encoder != "use-m3":
        return method.title.replace("USE", encoder)
    return method.title


#: The weak-label experiment's margin sources, in report order (see `weak_label_methods`).
WEAK_LABEL_SOURCES = ("fixed", "random", "permuted", "shuffled_text", "text", "oracle")
WEAK_LABEL_MINERS = {"batch_hard": "bh", "semi_hard": "sh"}
WEAK_LABEL_SOURCE_TITLES = {
    "fixed": "fixed margin (the text margins' mean)",
    "random": "random: i.i.d. uniform margins in [0.05, 0.4] per item pair (no text)",
    "permuted": "permuted: text margin values permuted across item pairs",
    "shuffled_text": "shuffled text: descriptions re-assigned across items",
    "text": "text (USE)",
    "oracle": "oracle: true attribute disagreement (text's mean and sd)",
}


def weak_label_method_name(source: str, mining: str, threshold: bool = False) -> str:
    """``"<source>_<bh|sh>"`` (``"text_tau_sh"`` with the variant threshold)."""
    return f"{source}{'_tau' if threshold else ''}_{WEAK_LABEL_MINERS[mining]}"


def weak_label_methods(oracle: bool = True, threshold: bool = True, shuffled: bool = False,
                       random: bool = False) -> tuple[Method, ...]:
    """The weak-label experiment's conditions: ATL through one margin-table code path,
    catalog-scaled margins in [0.05, 0.4], each condition differing only in its margin table.

    Block A: miners {batch_hard, semi_hard} x sources {fixed, permuted, text, oracle (where the
    catalog has attributes)}, plus shuffled text where asked (users' catalogs) and i.i.d. uniform
    ``random`` margins where asked (users' catalogs, the confirmatory Block C). Block B
    (`threshold`): semi-hard text with ``semantic_threshold`` at the median text distance of
    the training catalog's variant listings.
    """
    sources = [s for s in WEAK_LABEL_SOURCES if (s != "oracle" or oracle) and (s != "shuffled_text" or shuffled)
               and (s != "random" or random)]
    out = []
    for mining in WEAK_LABEL_MINERS:
        for source in sources:
            out.append(Method(weak_label_method_name(source, mining),
                              f"{WEAK_LABEL_SOURCE_TITLES[source]}, {mining.replace('_', '-')}",
                              "atl", mining, margin_source=source, margin_mapping="catalog",
                              ablation="block A"))
    if threshold:
        out.append(Method(weak_label_method_name("text", "semi_hard", True),
                          "text (USE) + semantic threshold at the variants' median text distance, semi-hard",
                          "atl", "semi_hard", margin_source="text", margin_mapping="catalog",
                          variant_threshold=True, ablation="block B"))
    return tuple(out)



#: Margin sources of the adaptive proxy loss in the weak-label experiment, in run order
#: (the oracle last: it is a testbed check, the first to drop when time is short).
WEAK_LABEL_PROXY_SOURCES = ("text", "permuted", "fixed", "oracle")


def weak_label_proxy_methods(oracle: bool = True) -> tuple[Method, ...]:
    """The proxy losses beside ATL in the weak-label experiment (an addition to its
    pre-registered design, issue 15).

    ``adaptive_proxy_<source>``: `atl_keras.AdaptiveProxyLoss` with the margin table of that
    source through the same catalog-scaled mapping onto [0.05, 0.4] as the ATL conditions (one
    margin per (class, negative proxy) pair; no mining). ``proxy_anchor``: ProxyAnchor with PML's
    defaults, no text (the proxy baseline). Run order: text, permuted, fixed, ProxyAnchor, oracle.
    """
    sources = [s for s in WEAK_LABEL_PROXY_SOURCES if s != "oracle"]
    out = [Method(f"adaptive_proxy_{source}", f"adaptive proxy loss, {WEAK_LABEL_SOURCE_TITLES[source]}",
                  "adaptive_proxy", margin_source=source, margin_mapping="catalog", ablation="proxy")
           for source in sources]
    out.append(Method("proxy_anchor", "ProxyAnchor (delta 0.1, alpha 32; no text)", "proxy_anchor",
                      margin_mapping="catalog", ablation="proxy"))
    if oracle:
        out.append(Method("adaptive_proxy_oracle", f"adaptive proxy loss, {WEAK_LABEL_SOURCE_TITLES['oracle']}",
                          "adaptive_proxy", margin_source="oracle", margin_mapping="catalog", ablation="proxy"))
    return tuple(out)

"""Metric-learning losses for Keras 3: one concept per module.

- `atl_keras.losses.base`: `MetricLoss` (the public base class), target splitting, label
  and embedding preparation, replica scaling.
- `atl_keras.losses.mining`: miners as objects (`BatchAllMiner`, `BatchHardMiner`,
  `SemiHardMiner`), usable by any loss with a hinge; ``mining="semi_hard"`` names one.
- `atl_keras.losses.triplet`: the triplet loss and the adaptive triplet loss (ATL).
- `atl_keras.losses.margin_table`: the triplet loss with a precomputed margin table.
- `atl_keras.losses.proxy`: proxy losses (adaptive proxy, ProxyAnchor).
- The pair family, one file each: `contrastive`, `multi_similarity`, `circle`, `supcon`
  (shared pieces and `PairLoss` in `atl_keras.losses.pairs`), `arcface` (ArcFace and
  sub-center ArcFace on proxies); `atl_keras.losses.pair_miners` (multi-similarity,
  distance-weighted); `atl_keras.losses.memory` (cross-batch memory, XBM).
- `atl_keras.losses.keras_compat`: losses by registered name (`get`), and the explicit
  opt-in for dict targets in a plain ``keras.Model``.
- `atl_keras.losses.registry`: the loss names the training config, the CLI and the docs read.

The weak-label margins the losses use live in `atl_keras.margins`. Names are imported on
first use (``from atl_keras.losses import TripletLoss``), so the registry imports without
Keras.
"""

from __future__ import annotations

import importlib
from typing import Any

from atl_keras.losses.registry import MINING_MODES, loss_modules

#: Public name -> the module that defines it (the modules' ``__all__``).
_EXPORTS: dict[str, str] = {
    "MetricLoss": "atl_keras.losses.base",
    "BatchAllMiner": "atl_keras.losses.mining",
    "BatchHardMiner": "atl_keras.losses.mining",
    "Miner": "atl_keras.losses.mining",
    "SemiHardMiner": "atl_keras.losses.mining",
    "get_miner": "atl_keras.losses.mining",
    "DistanceWeightedMiner": "atl_keras.losses.pair_miners",
    "MultiSimilarityMiner": "atl_keras.losses.pair_miners",
    "PairMiner": "atl_keras.losses.pair_miners",
    "PairLoss": "atl_keras.losses.pairs",
    "CrossBatchMemory": "atl_keras.losses.memory",
    "AdaptiveTripletLoss": "atl_keras.losses.triplet",
    "TripletLoss": "atl_keras.losses.triplet",
    "adaptive_triplet_loss": "atl_keras.losses.triplet",
    "margin_triplet_loss": "atl_keras.losses.triplet",
    "triplet_loss": "atl_keras.losses.triplet",
    "triplet_statistics": "atl_keras.losses.triplet",
    "MarginTableTripletLoss": "atl_keras.losses.margin_table",
    "AdaptiveProxyLoss": "atl_keras.losses.proxy",
    "ProxyAnchorLoss": "atl_keras.losses.proxy",
    "ProxyLoss": "atl_keras.losses.proxy",
    "adaptive_proxy_loss": "atl_keras.losses.proxy",
    "proxy_anchor_loss": "atl_keras.losses.proxy",
    "get": "atl_keras.losses.keras_compat",
    "install_keras_target_support": "atl_keras.losses.keras_compat",
    "resolve_losses": "atl_keras.losses.keras_compat",
}

__all__ = sorted(["MINING_MODES", *_EXPORTS])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a loss added by a registry line: look in its module's __all__
        for candidate in loss_modules():
            loaded = importlib.import_module(candidate)
            if name in getattr(loaded, "__all__", ()):
                module = candidate
                break
    if module is None:
        raise AttributeError(f"module 'atl_keras.losses' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

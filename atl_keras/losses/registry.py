"""The one registry of loss names: what ``TrainConfig.loss``, ``atl train --loss`` and the
docs offer, and where each loss lives. Imports neither Keras nor TensorFlow.

Adding a loss is one file in ``atl_keras/losses/`` (the loss, registered with
``keras.saving.register_keras_serializable(package="atl_keras")``, and a builder
``(config, data, item_text) -> keras.losses.Loss``) plus one `LossSpec` line in `LOSSES`
below; see docs/adding_a_loss.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOSSES",
    "MINING_MODES",
    "LossSpec",
    "build_loss",
    "import_losses",
    "loss_modules",
    "loss_names",
    "proxy_loss_names",
]

#: Names of the built-in miners (`atl_keras.losses.mining`), the ``mining=`` sugar.
MINING_MODES: tuple[str, ...] = ("batch_all", "batch_hard", "semi_hard")


@dataclass(frozen=True)
class LossSpec:
    """One training loss: its config name, the module defining it and its builder."""

    name: str  # TrainConfig.loss / `atl train --loss`
    module: str  # the module in atl_keras.losses that defines the loss and the builder
    builder: str  # function (config, data, item_text) -> keras.losses.Loss in `module`
    summary: str  # one line for `--help` and the docs
    proxies: bool = False  # one learnable proxy per training item (ATLModel(num_proxies=C))


#: The losses `atl_keras.train` can build, in the order the CLI lists them.
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("atl", "atl_keras.losses.triplet", "atl_from_config",
             "adaptive triplet loss: margins from description distances (weak labels)"),
    LossSpec("triplet", "atl_keras.losses.triplet", "triplet_from_config",
             "triplet loss with a constant margin"),
    LossSpec("adaptive_proxy", "atl_keras.losses.proxy", "adaptive_proxy_from_config",
             "normalised softmax over proxies, a text margin per negative proxy", proxies=True),
    LossSpec("proxy_anchor", "atl_keras.losses.proxy", "proxy_anchor_from_config",
             "ProxyAnchor (PyTorch Metric Learning semantics)", proxies=True),
    LossSpec("contrastive", "atl_keras.losses.contrastive", "contrastive_from_config",
             "contrastive loss (PML 2.9: L2 distance, margins 0 and 1)"),
    LossSpec("weak_contrastive", "atl_keras.losses.contrastive", "weak_contrastive_from_config",
             "contrastive loss, negative margin relaxed for similar descriptions"),
    LossSpec("multi_similarity", "atl_keras.losses.multi_similarity", "multi_similarity_from_config",
             "multi-similarity loss with its miner (PML 2.9)"),
    LossSpec("weak_multi_similarity", "atl_keras.losses.multi_similarity",
             "weak_multi_similarity_from_config",
             "multi-similarity loss, negative base raised for similar descriptions"),
    LossSpec("circle", "atl_keras.losses.circle", "circle_from_config", "circle loss (PML 2.9)"),
    LossSpec("weak_circle", "atl_keras.losses.circle", "weak_circle_from_config",
             "circle loss, negative relaxation grown for similar descriptions"),
    LossSpec("supcon", "atl_keras.losses.supcon", "supcon_from_config",
             "supervised contrastive loss (NT-Xent with labels, PML 2.9)"),
    LossSpec("arcface", "atl_keras.losses.arcface", "arcface_from_config",
             "ArcFace on one proxy per item (PML 2.9)", proxies=True),
    LossSpec("weak_arcface", "atl_keras.losses.arcface", "weak_arcface_from_config",
             "ArcFace plus a text margin per negative proxy", proxies=True),
)}

#: Modules of the package that define Keras-serializable objects besides the losses above.
_SUPPORT_MODULES = (
    "atl_keras.losses.base",
    "atl_keras.losses.mining",
    "atl_keras.losses.pair_miners",
    "atl_keras.losses.margin_table",
    "atl_keras.losses.keras_compat",
)


def loss_names() -> tuple[str, ...]:
    """Every registered loss name."""
    return tuple(LOSSES)


def proxy_loss_names() -> tuple[str, ...]:
    """The registered losses that learn one proxy per training item."""
    return tuple(name for name, spec in LOSSES.items() if spec.proxies)


def loss_modules() -> tuple[str, ...]:
    """Every module of `atl_keras.losses` (importing them registers the Keras classes)."""
    return tuple(dict.fromkeys((*_SUPPORT_MODULES, *(spec.module for spec in LOSSES.values()))))


def import_losses() -> None:
    """Import every loss module, which registers the losses with Keras (for ``load_model``)."""
    for module in loss_modules():
        importlib.import_module(module)


def build_loss(config: Any, data: Any = None, item_text: Any = None) -> Any:
    """The loss named by ``config.loss``, built by its registered builder.

    Args:
        config: an `atl_keras.train.TrainConfig` (or anything with its fields).
        data: the `RetrievalData` (proxy losses and margin tables need the training items).
        item_text: ``[M, T]`` text embeddings of the catalog's items.
    """
    spec = LOSSES.get(config.loss)
    if spec is None:
        raise ValueError(f"Unknown loss {config.loss!r}; choose one of {', '.join(LOSSES)}.")
    builder = getattr(importlib.import_module(spec.module), spec.builder)
    return builder(config, data, item_text)

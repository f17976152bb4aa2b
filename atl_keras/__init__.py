"""atl-keras: weakly supervised adaptive triplet loss for visual similarity search.

    import atl_keras as atl

    model = atl.ATLModel(backbone="small_cnn", input_shape=(28, 28, 1), embedding_dim=64)
    model.compile(optimizer="adam", loss=atl.AdaptiveTripletLoss(min_margin=0.05, max_margin=0.4))
    model.fit(atl.data.pk_dataset(images, labels, text_embeddings, p=10, k=8), ...)

Names are imported on first use (module ``__getattr__``), so ``import atl_keras`` (and
``atl --help``) does not load TensorFlow. The Keras-serializable classes (models, layers,
losses) are registered with Keras at ``import atl_keras`` if Keras is already imported, and
on first use of any ``atl.`` name; otherwise call ``atl.register_keras_objects()`` before
``keras.saving.load_model("model.keras")``. Importing atl_keras patches nothing in Keras
and installs no import hook.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "available_backbones": "atl_keras.backbones",
    "build_backbone": "atl_keras.backbones",
    "pairwise_distances": "atl_keras.distances",
    "AdaptiveTripletLoss": "atl_keras.losses.triplet",
    "TripletLoss": "atl_keras.losses.triplet",
    "adaptive_triplet_loss": "atl_keras.losses.triplet",
    "margin_triplet_loss": "atl_keras.losses.triplet",
    "triplet_loss": "atl_keras.losses.triplet",
    "triplet_statistics": "atl_keras.losses.triplet",
    "RetrievalEvaluation": "atl_keras.metrics",
    "format_metrics_table": "atl_keras.metrics",
    "retrieval_metrics": "atl_keras.metrics",
    "index_catalog": "atl_keras.catalog_index",
    "ATLModel": "atl_keras.model",
    "MetricModel": "atl_keras.metric_model",
    "write_projector": "atl_keras.projector",
    "ProxyHead": "atl_keras.proxies",
    "strip_proxies": "atl_keras.proxies",
    "AdaptiveProxyLoss": "atl_keras.losses.proxy",
    "ProxyAnchorLoss": "atl_keras.losses.proxy",
    "ContrastiveLoss": "atl_keras.losses.contrastive",
    "MultiSimilarityLoss": "atl_keras.losses.multi_similarity",
    "CircleLoss": "atl_keras.losses.circle",
    "SupConLoss": "atl_keras.losses.supcon",
    "ArcFaceLoss": "atl_keras.losses.arcface",
    "MultiSimilarityMiner": "atl_keras.losses.pair_miners",
    "DistanceWeightedMiner": "atl_keras.losses.pair_miners",
    "WeakLabelMargins": "atl_keras.margins.weak_label",
    "ExactSearcher": "atl_keras.search",
    "exact_search": "atl_keras.search",
    "RetrievalIndex": "atl_keras.search.retrieval_index",
    "neighbour_grid": "atl_keras.search.pictures",
    "index_catalog": "atl_keras.catalog_index",
    "attribute_agreement_at_k": "atl_keras.semantic_metrics",
    "semantic_retrieval_metrics": "atl_keras.semantic_metrics",
    "variant_recall_at_k": "atl_keras.semantic_metrics",
    "DescriptionCache": "atl_keras.text",
    "HashingTextEncoder": "atl_keras.text",
    "TextEncoder": "atl_keras.text",
    "embed_descriptions": "atl_keras.text",
    "load_text_encoder": "atl_keras.text",
}
#: Subpackages / modules reachable as attributes (``atl.data.pk_dataset``).
_SUBMODULES = ("data", "distribute", "losses", "margins")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "register_keras_objects"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"atl_keras.{name}")
    else:
        raise AttributeError(f"module 'atl_keras' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    if not _registered:
        _register_serializables()
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from atl_keras import data, distribute, losses, margins
    from atl_keras.backbones import available_backbones, build_backbone
    from atl_keras.distances import pairwise_distances
    from atl_keras.losses.triplet import (
        AdaptiveTripletLoss,
        TripletLoss,
        adaptive_triplet_loss,
        margin_triplet_loss,
        triplet_loss,
        triplet_statistics,
    )
    from atl_keras.metrics import RetrievalEvaluation, format_metrics_table, retrieval_metrics
    from atl_keras.catalog_index import index_catalog
    from atl_keras.metric_model import MetricModel
    from atl_keras.model import ATLModel
    from atl_keras.projector import write_projector
    from atl_keras.proxies import ProxyHead, strip_proxies
    from atl_keras.losses.proxy import AdaptiveProxyLoss, ProxyAnchorLoss
    from atl_keras.losses.arcface import ArcFaceLoss
    from atl_keras.losses.circle import CircleLoss
    from atl_keras.losses.contrastive import ContrastiveLoss
    from atl_keras.losses.multi_similarity import MultiSimilarityLoss
    from atl_keras.losses.pair_miners import DistanceWeightedMiner, MultiSimilarityMiner
    from atl_keras.losses.supcon import SupConLoss
    from atl_keras.margins.weak_label import WeakLabelMargins
    from atl_keras.search import ExactSearcher, exact_search
    from atl_keras.search.pictures import neighbour_grid
    from atl_keras.search.retrieval_index import RetrievalIndex
    from atl_keras.semantic_metrics import (
        attribute_agreement_at_k,
        semantic_retrieval_metrics,
        variant_recall_at_k,
    )
    from atl_keras.text import (
        DescriptionCache,
        HashingTextEncoder,
        TextEncoder,
        embed_descriptions,
        load_text_encoder,
    )


# --------------------------------------------------------------------------- registration
#: Modules whose classes are registered with `keras.saving.register_keras_serializable`.
#: The loss modules come from `atl_keras.losses.registry.loss_modules`.
_SERIALIZABLE_MODULES = (
    "atl_keras.backbones",
    "atl_keras.metric_model",
    "atl_keras.model",
    "atl_keras.proxies",
)
_TRIGGERS = ("keras", "tensorflow")  # `import tensorflow` imports keras inside its own import


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and bool(getattr(spec, "_initializing", False))


_registered = False


def _register_serializables() -> bool:
    """Import the modules that register atl_keras' Keras objects, once it is safe to do so
    (Keras and TensorFlow fully imported, no atl_keras module half-imported)."""
    global _registered
    if _registered:
        return True
    if "keras" not in sys.modules or any(_initializing(name) for name in _TRIGGERS) or any(
        _initializing(name) for name in list(sys.modules) if name.startswith("atl_keras.")
    ):
        return False
    _registered = True
    from atl_keras.losses.registry import loss_modules

    for name in (*_SERIALIZABLE_MODULES, *loss_modules()):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    return True


def register_keras_objects() -> None:
    """Register atl_keras' Keras classes (models, layers, losses) with Keras, so
    ``keras.saving.load_model`` finds them; imports Keras. Idempotent.

    Runs by itself at ``import atl_keras`` when Keras is already imported, and on the first
    use of any ``atl.`` name; otherwise call it before ``keras.saving.load_model``
    (no import hook is installed).
    """
    import keras  # noqa: F401  (the registry lives in Keras)

    if not _register_serializables():  # only while a module is half-imported
        raise RuntimeError("register_keras_objects() was called while atl_keras or Keras is "
                           "still being imported; call it after the imports.")


_register_serializables()

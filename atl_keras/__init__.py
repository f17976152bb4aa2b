"""atl-keras: weakly supervised adaptive triplet loss for visual similarity search.

    import atl_keras as atl

    model = atl.ATLModel(backbone="small_cnn", input_shape=(28, 28, 1), embedding_dim=64)
    model.compile(optimizer="adam", loss=atl.AdaptiveTripletLoss(min_margin=0.05, max_margin=0.4))
    model.fit(atl.data.pk_dataset(images, labels, text_embeddings, p=10, k=8), ...)
"""

__version__ = "0.1.0"

from atl_keras import data, distribute
from atl_keras.backbones import available_backbones, build_backbone
from atl_keras.distances import pairwise_distances
from atl_keras.losses import (
    AdaptiveTripletLoss,
    TripletLoss,
    adaptive_triplet_loss,
    triplet_loss,
    triplet_statistics,
)
from atl_keras.metrics import RetrievalEvaluation, format_metrics_table, retrieval_metrics
from atl_keras.model import ATLModel
from atl_keras.projector import write_projector
from atl_keras.search import ExactSearcher, exact_search
from atl_keras.semantic_metrics import attribute_agreement_at_k, semantic_retrieval_metrics, variant_recall_at_k
from atl_keras.text import (
    DescriptionCache,
    HashingTextEncoder,
    TextEncoder,
    embed_descriptions,
    load_text_encoder,
)

__all__ = [
    "ATLModel",
    "AdaptiveTripletLoss",
    "DescriptionCache",
    "ExactSearcher",
    "HashingTextEncoder",
    "RetrievalEvaluation",
    "TextEncoder",
    "TripletLoss",
    "adaptive_triplet_loss",
    "attribute_agreement_at_k",
    "available_backbones",
    "build_backbone",
    "data",
    "distribute",
    "embed_descriptions",
    "exact_search",
    "format_metrics_table",
    "load_text_encoder",
    "pairwise_distances",
    "retrieval_metrics",
    "semantic_retrieval_metrics",
    "triplet_loss",
    "triplet_statistics",
    "variant_recall_at_k",
    "write_projector",
]

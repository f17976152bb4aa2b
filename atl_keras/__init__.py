"""atl-keras: weakly supervised adaptive triplet loss for visual similarity search."""

__version__ = "0.1.0"

"""merge-mix: find data mixtures by merging per-domain component models."""

__version__ = "0.1.0"

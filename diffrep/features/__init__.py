"""Feature extraction: node hooks, noise policies, the extractor and aggregation helpers."""
from .aggregate import pool, upsample_concat
from .extractor import FeatureDict, FeatureExtractor
from .noise_policy import NoisePolicy

__all__ = ["FeatureDict", "FeatureExtractor", "NoisePolicy", "pool", "upsample_concat"]

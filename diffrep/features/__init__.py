"""Feature extraction: node hooks, noise policies, the extractor, aggregation and on-disk stores.

Lives here: FeatureExtractor (noise to t, run the U-Net, read named nodes), pooling and upsampling,
pooled-feature caches, pixel-descriptor stores, streaming to safetensors, image reading, and 3D volumes
by sliding windows (``sliding``: SlidingWindowExtractor; ``windows``: the window plan; ``memory_estimate``:
the peak-memory check made before any work). May import
backbones and the shared helpers; imported by heads, anomaly, the pipelines, the CLI and benchmarks.
"""
from .aggregate import pool, upsample_concat
from .extractor import FeatureDict, FeatureExtractor
from .noise_policy import NoisePolicy

__all__ = ["FeatureDict", "FeatureExtractor", "NoisePolicy", "pool", "upsample_concat"]

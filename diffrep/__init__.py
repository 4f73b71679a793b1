"""diffrep: pretrained denoising diffusion U-Nets as representations for discriminative work."""
from ._types import AnomalyResult, FeatureInfo, FeatureKey
from .backbones import Backbone, BackboneConfig, load_backbone
from .features import FeatureExtractor, pool, upsample_concat

__version__ = "0.1.0"
__all__ = [
    "AnomalyResult", "Backbone", "BackboneConfig", "FeatureExtractor", "FeatureInfo", "FeatureKey",
    "load_backbone", "pool", "upsample_concat", "__version__",
]

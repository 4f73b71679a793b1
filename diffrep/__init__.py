"""diffrep: pretrained denoising diffusion U-Nets as representations for discriminative work.

The public names below are imported on first use (PEP 562 ``__getattr__``), so ``import diffrep``
(and the ``diffrep`` command's start-up) loads no torch or MONAI until one of them is needed.
Subpackages: backbones, features, heads, anomaly, data, training (the library), pipelines (tasks
built from them) and cli (the command line, on top). Anyone may import this package.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "AnomalyResult": "._types", "FeatureInfo": "._types", "FeatureKey": "._types",
    "Backbone": ".backbones", "BackboneConfig": ".backbones", "load_backbone": ".backbones",
    "FeatureExtractor": ".features", "pool": ".features", "upsample_concat": ".features",
}
__all__ = [
    "AnomalyResult", "Backbone", "BackboneConfig", "FeatureExtractor", "FeatureInfo", "FeatureKey",
    "load_backbone", "pool", "upsample_concat", "__version__",
]


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first access and cache the name in this module."""
    if name not in _LAZY:
        raise AttributeError(f"module 'diffrep' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

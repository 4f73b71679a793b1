"""Heads over diffusion features; each follows scikit-learn (init stores args, fit returns self, clone works).

- segmentation: PixelClassifier (an MLP ensemble on pixel descriptors, Baranchuk et al. 2022) and its
  label checks and metrics (label_maps);
- classification: LinearProbe on pooled features and the node x timestep selection on a validation
  split (selection).

May import diffrep.features, diffrep.backbones, diffrep.persistence and the shared helpers (errors, _types,
_legacy_formats); imported by the pipelines, the CLI and the benchmarks, never by features or backbones.
"""
from .linear_probe import LinearProbe
from .pixel_classifier import MLPEnsemble, PixelClassifier, combine_members, segmentation_metrics
from .selection import (
    SelectionResult, carve_validation, default_concatenations, key_name, parse_key_name, sample_per_class,
    select_node_timestep, stack_features,
)

__all__ = [
    "LinearProbe", "MLPEnsemble", "PixelClassifier", "SelectionResult", "carve_validation", "combine_members",
    "default_concatenations", "key_name", "parse_key_name", "sample_per_class", "segmentation_metrics",
    "select_node_timestep", "stack_features",
]

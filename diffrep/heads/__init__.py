"""Heads over diffusion features; each follows scikit-learn (init stores args, fit returns self, clone works)."""
from .pixel_classifier import MLPEnsemble, PixelClassifier, combine_members, segmentation_metrics

__all__ = ["MLPEnsemble", "PixelClassifier", "combine_members", "segmentation_metrics"]

# Classification track (linear probe on pooled features; node x timestep selection on a validation split).
from .linear_probe import LinearProbe  # noqa: E402
from .selection import (  # noqa: E402
    SelectionResult, carve_validation, default_concatenations, key_name, parse_key_name, sample_per_class,
    select_node_timestep, stack_features,
)

__all__ += [
    "LinearProbe", "SelectionResult", "carve_validation", "default_concatenations", "key_name", "parse_key_name",
    "sample_per_class", "select_node_timestep", "stack_features",
]

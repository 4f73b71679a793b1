"""Anomaly scorers on diffusion U-Nets (and the DAE baseline): fit on healthy images, score maps.

Every scorer follows :class:`AnomalyScorer`: ``fit(healthy_images, masks=None) -> self``,
``score(images, masks=None) -> AnomalyResult`` (maps (N, *spatial), scores (N,); higher = more
anomalous) and ``unet_calls_per_image`` (network evaluations per slice). ``score_volume`` applies a
scorer to a whole NIfTI volume. Metrics live in ``diffrep.anomaly.metrics``.

Lives here: the reconstruction (partial diffusion), multi-level, feature-distance and calibrated scorers,
the DAE baseline, post-processing, metrics, NIfTI volume scoring (slice by slice; whole 3D volumes by
sliding windows in ``sliding``), and image-level out-of-distribution scores from the likelihood
(``LikelihoodScorer``: NLL or NLL minus the PNG length; ``TypicalityScorer``). A scorer's ``timestep`` is the L it
noises to, ``noise_type`` its noise distribution and ``noise`` its noise policy (``diffrep.features``'
vocabulary). May import backbones, features, data, persistence and the shared helpers (diffusion, noise,
errors...); imported by the CLI, the benchmarks and users, never by backbones, features or heads.
"""
from .base import AnomalyScorer
from .calibration import CalibratedScorer
from .dae import DAEScorer, brain_augment
from .ensemble import MultiLevelScorer
from .feature_distance import FeatureDistanceScorer
from .likelihood_scores import LikelihoodScorer
from .postprocess import check_masks, erode_masks, image_scores, median_filter_maps, postprocess_maps
from .reconstruction import ReconstructionScorer
from .typicality import TypicalityScorer
from .volume import score_volume

__all__ = [
    "LikelihoodScorer", "TypicalityScorer",
    "AnomalyScorer", "CalibratedScorer", "DAEScorer", "FeatureDistanceScorer", "MultiLevelScorer", "ReconstructionScorer",
    "brain_augment", "check_masks", "erode_masks", "image_scores", "median_filter_maps", "postprocess_maps",
    "score_volume",
]

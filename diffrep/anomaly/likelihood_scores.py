"""Image-level out-of-distribution scores from a diffusion U-Net's likelihood, in bits per dimension.

:class:`LikelihoodScorer` scores each image by its negative log-likelihood under the backbone
(:mod:`diffrep.likelihood`), by one of two estimators:

- ``method="vlb"``: the variational bound of the discrete DDPM (Ho et al. 2020, eq. 5), T U-Net calls
  per image, one seeded noise draw per timestep;
- ``method="ode"``: the probability-flow ODE of the VP-SDE (Song et al. 2021, "Score-Based Generative
  Modeling through SDEs"), the divergence by Hutchinson's estimator with ``hutchinson`` Gaussian probes,
  scipy's adaptive solver with ``rtol``/``atol``: the number of calls is adaptive, and each call also
  costs ``hutchinson`` vector-Jacobian products (about two forwards each).

and reports either the raw NLL (``correction="none"``; Nalisnick et al. 2019, "Do deep generative models
know what they don't know?", show that it can rank simpler inputs as more likely than the training
kind) or the input-complexity-corrected S(x) = NLL(x) - L(x) with L the PNG code length
(``correction="png"``; Serra et al. 2020, see :mod:`diffrep.anomaly.complexity`). Higher = more anomalous.

8-bit data (``eight_bit=True``, the default): images are taken as 8-bit codes of the data range
(rounded to 256 levels). The VLB uses the discretised decoder (Ho et al. eq. 13), a bound on the
probability of those codes; the ODE evaluates the density at uniformly dequantised codes
((k + u) / 256, u ~ U[0, 1) per pixel, seeded) and adds the 7-bit offset of
:func:`diffrep.likelihood.bits_per_dim`. With ``eight_bit=False`` both give the density of the
model-range image in [-1, 1] (Gaussian decoder, no dequantisation, no offset), which can be negative.

Seeds: every image has its own generator, seeded from ``seed`` and a hash of its values (as in
:class:`~diffrep.anomaly.ReconstructionScorer`), which draws its VLB noise, its dequantisation noise and
its Hutchinson probes: they depend on the image, the settings and the seed, never on its batch or
position. The ODE solver's steps are shared by a batch (scipy controls the RMS error over the whole
state), so an image's ODE NLL varies with its batch within the solver tolerance; the VLB does not.

Maps: the likelihood belongs to the whole image, so an image's map holds its score at every pixel;
masks shape only the maps (zero outside the eroded mask), never the score.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._types import AnomalyResult
from ..backbones.backbone import Backbone
from ..errors import check_positive_int
from ..likelihood import EpsFn, bits_per_dim, ode_nll, vlb_nll, vp_sde
from .base import AnomalyScorer, check_choice
from .complexity import png_bits_per_dim, to_uint8
from .postprocess import check_masks, postprocess_maps
from .reconstruction import image_seed

METHODS = ("vlb", "ode")
TRACES = ("hutchinson", "exact")
CORRECTIONS = ("none", "png")
COLUMNS = ("nll_bits_per_dim", "png_bits_per_dim", "corrected_bits_per_dim", "unet_calls")


def check_tolerance(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite number > 0, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def network(backbone: Backbone) -> EpsFn:
    """The backbone as ``eps_fn`` for :mod:`diffrep.likelihood`: CPU tensors of any float dtype in, the
    U-Net run in float32 on its device, the prediction back on the CPU in the input's dtype."""
    device = backbone.device

    def eps_fn(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return backbone(x.to(device=device, dtype=torch.float32), timesteps.to(device)).to("cpu", x.dtype)
    return eps_fn


class LikelihoodScorer(AnomalyScorer):
    """Per-image NLL (bits/dim) of a diffusion backbone as an anomaly score; see the module docstring.

    Args:
        backbone: the pretrained noise predictor (linear beta schedule for ``method="ode"``).
        method: ``"vlb"`` (T calls) or ``"ode"`` (adaptive).
        correction: ``"none"`` (raw NLL) or ``"png"`` (NLL minus the PNG length, Serra et al. 2020).
        hutchinson: Gaussian probe vectors of the ODE's trace estimator (fixed for a whole solve, so its
            error does not average out over time: with few dimensions it dominates).
        trace: ``"hutchinson"`` or ``"exact"`` (one vector-Jacobian product per dimension and call: tiny images).
        rtol, atol: the ODE solver's tolerances. eight_bit: score 8-bit codes (see the module docstring).
        seed: the seed of every draw. batch_size: images per solve (ODE) or per U-Net forward (VLB).

    Nothing to fit: ``fit`` validates. :meth:`nll_table` gives every column (raw, PNG length, corrected,
    calls); ``score`` the chosen one as ``scores``.
    """

    def __init__(self, backbone: Backbone, method: str = "vlb", correction: str = "none", hutchinson: int = 1,
                 rtol: float = 1e-5, atol: float = 1e-5, eight_bit: bool = True, seed: int = 0,
                 batch_size: int = 32, trace: str = "hutchinson") -> None:
        self.backbone = backbone
        self.method = method
        self.correction = correction
        self.hutchinson = hutchinson
        self.rtol = rtol
        self.atol = atol
        self.eight_bit = eight_bit
        self.seed = seed
        self.batch_size = batch_size
        self.trace = trace

    def _validate(self) -> None:
        super()._validate()
        check_choice(self.method, "method", METHODS)
        check_choice(self.correction, "correction", CORRECTIONS)
        check_positive_int(self.hutchinson, "hutchinson")
        check_choice(self.trace, "trace", TRACES)
        check_tolerance(self.rtol, "rtol")
        check_tolerance(self.atol, "atol")
        check_positive_int(self.seed, "seed", minimum=0)
        if not isinstance(self.eight_bit, bool):
            raise TypeError(f"eight_bit: expected True or False, got {self.eight_bit!r}")
        if self.method == "ode":
            vp_sde(self.backbone.config.schedule)  # refuses schedules without a VP-SDE limit

    @property
    def unet_calls_per_image(self) -> int:
        """VLB: T (one forward per timestep). ODE: adaptive, the mean over the images of the last
        :meth:`nll_table`/``score`` call (each with ``hutchinson`` vector-Jacobian products); a
        ValueError before any."""
        self._validate()
        if self.method == "vlb":
            return int(self.backbone.num_timesteps)
        calls = getattr(self, "_last_calls", None)
        if calls is None:
            raise ValueError("unet_calls_per_image: the ODE's cost is adaptive (set by rtol/atol and the images); "
                             "expected a scoring call first, got none")
        return int(round(calls))

    # ------------------------------------------------------------------ scores
    def nll_table(self, images: Any, progress: bool = False) -> dict[str, np.ndarray]:
        """Per image (N,): ``nll_bits_per_dim``, ``png_bits_per_dim`` (L), ``corrected_bits_per_dim`` (NLL - L)
        and ``unet_calls`` (forward calls spent on the image: T, or the NFE of its batch's ODE solve)."""
        from tqdm.auto import tqdm

        self._validate()
        x = self._check_images(images)
        starts = range(0, x.shape[0], int(self.batch_size))
        parts = [self._table(x[i:i + int(self.batch_size)])
                 for i in tqdm(starts, desc=f"likelihood ({self.method})", unit="batch", disable=not progress)]
        table = {key: np.concatenate([part[key] for part in parts]) for key in COLUMNS}
        self._last_calls = float(table["unet_calls"].mean())
        return table

    def score_images(self, images: Any) -> np.ndarray:
        """The chosen score per image (N,) float64: raw NLL (``correction="none"``) or NLL - L (``"png"``)."""
        table = self.nll_table(images)
        return table["nll_bits_per_dim" if self.correction == "none" else "corrected_bits_per_dim"]

    def score(self, images: Any, masks: Any = None) -> AnomalyResult:
        """``scores`` (N,) float64 from :meth:`score_images`; ``maps`` hold each image's score at every pixel."""
        self._validate()
        x = self._check_images(images)
        return constant_maps_result(self.score_images(x), x, check_masks(masks, tuple(x.shape)), self)

    def _raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        scores = torch.from_numpy(self.score_images(images)).float()
        return scores.view(-1, *[1] * (images.ndim - 2)).expand(images.shape[0], *images.shape[2:])

    # ----------------------------------------------------------------- helpers
    def _table(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Every column for one validated batch in the data range."""
        x = x.detach().cpu()
        bb, n, dims = self.backbone, x.shape[0], x[0].numel()
        norm = bb.config.normalisation
        codes = to_uint8(x.numpy(), norm.low, norm.high)
        generators = [torch.Generator().manual_seed(image_seed(int(self.seed), image)) for image in x]
        y = torch.from_numpy(codes).double() * (2.0 / 255.0) - 1.0 if self.eight_bit else bb.to_model_range(x.double())
        if self.method == "vlb":
            out = vlb_nll(network(bb), bb.schedule, y, generators, decoder="discretised" if self.eight_bit else "gaussian")
            nll, calls = bits_per_dim(out["nll"], dims, eight_bit=False), np.full(n, bb.num_timesteps)
        else:
            if self.eight_bit:  # uniform dequantisation (Song et al. 2021, app. D.2): (k + u) / 256
                u = torch.cat([torch.rand((1, *x.shape[1:]), generator=g, dtype=torch.float64) for g in generators])
                y = (torch.from_numpy(codes).double() + u) * (2.0 / 256.0) - 1.0
            out = ode_nll(network(bb), vp_sde(bb.config.schedule), y, generator=generators, rtol=float(self.rtol),
                          atol=float(self.atol), probes=int(self.hutchinson), trace=self.trace)
            nll = bits_per_dim(out["nll"], dims, eight_bit=self.eight_bit)
            calls = np.full(n, int(out["network_calls"]))
        nll = nll.double().numpy()
        png = png_bits_per_dim(codes)
        return {"nll_bits_per_dim": nll, "png_bits_per_dim": png, "corrected_bits_per_dim": nll - png,
                "unet_calls": calls.astype(np.int64)}


def constant_maps_result(scores: np.ndarray, x: torch.Tensor, masks: np.ndarray | None,
                         scorer: AnomalyScorer) -> AnomalyResult:
    """An AnomalyResult for an image-level score: each map holds its image's score at every pixel,
    post-processed with the scorer's erosion and median filter (zero outside the eroded mask)."""
    raw = np.broadcast_to(scores.astype(np.float32).reshape(-1, *[1] * (x.ndim - 2)), (x.shape[0], *x.shape[2:]))
    maps, _ = postprocess_maps(np.ascontiguousarray(raw), masks, erode=int(scorer.erode), median=int(scorer.median))
    return AnomalyResult(scores=np.asarray(scores, dtype=np.float64), maps=maps)

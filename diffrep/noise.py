"""Noise fields for diffusion and denoising models: Gaussian, simplex (AnoDDPM) and coarse (DAE).

All functions return tensors of shape (N, C, H, W) (or (N, C, D, H, W)) and draw every random number
from the given ``torch.Generator``, so the same seed gives the same field bit for bit on CPU.

- :func:`simplex_noise`: fractal simplex gradient noise, the structured noise of AnoDDPM
  (Wyatt et al., "AnoDDPM: Anomaly Detection with Denoising Diffusion Probabilistic Models using
  Simplex Noise", CVPRW 2022). Normalised to zero mean and unit variance per (n, c) slice so that it
  can replace eps in q(x_t | x_0) = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps.
- :func:`coarse_noise`: low-resolution Gaussian noise upsampled bilinearly, the training noise of the
  denoising autoencoder of Kascenas et al. ("Denoising Autoencoders for Unsupervised Anomaly Detection
  in Brain MRI", MIDL 2022).
- :func:`gaussian_noise`: plain i.i.d. N(0, 1).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F

from .errors import as_dtype, check_positive_int

# The noise types (distributions) make_noise draws. The first two are zero-mean, unit-variance fields that
# can stand in for eps in q(x_t | x_0) (the reconstruction scorers' noise types); coarse noise is the DAE's.
EPS_NOISE_TYPES = ("gaussian", "simplex")
NOISE_TYPES = (*EPS_NOISE_TYPES, "coarse")


def _check_shape(shape: Any, name: str = "shape") -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name}: expected a tuple of ints (N, C, H, W) or (N, C, D, H, W), got {shape!r}") from None
    if len(dims) not in (4, 5):
        raise ValueError(f"{name}: expected 4 dims (N, C, H, W) or 5 dims (N, C, D, H, W), got {len(dims)} dims {dims}")
    if any(s < 1 for s in dims):
        raise ValueError(f"{name}: expected every dimension >= 1, got {dims}")
    return dims


def _draw_device(generator: torch.Generator | None, device: Any) -> torch.device:
    """Random numbers are drawn where the generator lives (or on ``device`` when none is given)."""
    return generator.device if generator is not None else torch.device(device or "cpu")


def gaussian_noise(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None,
                   dtype: str | torch.dtype = torch.float32) -> torch.Tensor:
    """I.i.d. standard normal noise of the given (N, C, *spatial) shape, the usual DDPM eps."""
    dims = _check_shape(shape)
    dtype = as_dtype(dtype)
    out = torch.randn(dims, generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return out.to(device) if device is not None else out


def _simplex_octave(coords: list[torch.Tensor], generator: torch.Generator | None, draw_device: torch.device) -> torch.Tensor:
    """One octave of n-D simplex gradient noise (Perlin 2001; Gustavson 2005) at given points.

    ``coords`` holds n tensors of shape (B, P), the points' lattice coordinates along each axis.
    Every slice b gets its own random unit gradients at the lattice vertices it touches, so slices
    are independent. Returns (B, P), unnormalised. Works per axis (no small trailing dims: fast on CPU).
    """
    n = len(coords)
    b, p = coords[0].shape
    dev = coords[0].device
    skew = (math.sqrt(n + 1) - 1) / n
    unskew = (1 - 1 / math.sqrt(n + 1)) / n
    s = sum(coords) * skew
    cell = [torch.floor(x + s) for x in coords]
    t = sum(cell) * unskew
    x0 = [x - c + t for x, c in zip(coords, cell)]                      # offset from the cell origin
    # The simplex containing the point: corner k steps +1 along the k largest components of x0.
    rank = [sum(((x0[e] > x0[d]) | ((x0[e] == x0[d]) & (e < d))).long() for e in range(n) if e != d)
            for d in range(n)]                                          # n >= 2 here
    cell = [c.long() for c in cell]
    lo = [c.amin(dim=1, keepdim=True) for c in cell]                    # per-slice lattice origin
    size = [int((c.amax(dim=1, keepdim=True) - m).max()) + 2 for c, m in zip(cell, lo)]
    strides = [math.prod(size[d + 1:]) for d in range(n)]
    per_slice = math.prod(size)
    grads = torch.randn((n, b * per_slice), generator=generator, device=draw_device, dtype=coords[0].dtype)
    grads = (grads / grads.norm(dim=0, keepdim=True).clamp_min(1e-12)).to(dev)
    index0 = torch.arange(b, device=dev).view(b, 1) * per_slice
    for c, m, st in zip(cell, lo, strides):
        index0 = index0 + (c - m) * st
    value = torch.zeros((b, p), dtype=coords[0].dtype, device=dev)
    for k in range(n + 1):
        corner = [(r < k).long() for r in rank]
        d = [x - cr + k * unskew for x, cr in zip(x0, corner)]
        index = index0 + sum(cr * st for cr, st in zip(corner, strides))
        falloff = (0.5 - sum(v * v for v in d)).clamp_min_(0.0)
        value += falloff.square_().square_() * sum(grads[e][index] * d[e] for e in range(n))
    return value


def simplex_noise(shape: tuple[int, ...], *, octaves: int = 6, persistence: float = 0.8, frequency: float = 64.0,
                  generator: torch.Generator | None = None, device=None, dtype: str | torch.dtype = torch.float32) -> torch.Tensor:
    """Fractal simplex noise, AnoDDPM's structured noise (Wyatt et al. 2022), one independent field per (n, c).

    Frequency convention (AnoDDPM's ``rand_3d_octaves``): ``frequency`` is the *lattice spacing in
    pixels* of the coarsest octave, i.e. a feature size, not cycles per image. Octave o samples
    simplex noise at pixel coordinate / (frequency / 2**o) with amplitude persistence**o, so the
    spacing halves and the amplitude shrinks every octave. With the defaults (6 octaves, 0.8, 64)
    the lattice spacings are 64, 32, 16, 8, 4 and 2 pixels: at 64 x 64 blobs range from a couple of
    pixels to the whole image. Octaves finer than a pixel behave like white noise. Each slice also
    gets a random sub-cell offset per octave so lattices do not line up across slices.

    Args:
        shape: (N, C, H, W) or (N, C, D, H, W).
        octaves: number of octaves, an int >= 1.
        persistence: amplitude ratio between successive octaves, > 0 (AnoDDPM: 0.8).
        frequency: lattice spacing in pixels of the first octave, > 0 (AnoDDPM: 64).
        generator: source of all random numbers (gradients and offsets); None uses torch's global RNG.
        device, dtype: of the result (dtype: a floating torch dtype or its name); the computation runs on ``device``.

    Returns:
        A tensor of ``shape`` whose every (n, c) slice has zero mean and unit (population) variance.
    """
    dims = _check_shape(shape)
    dtype = as_dtype(dtype)
    check_positive_int(octaves, "octaves")
    for name, value in (("persistence", persistence), ("frequency", frequency)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    device = torch.device(device or "cpu")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n_slices, spatial = dims[0] * dims[1], dims[2:]
    axes = [torch.arange(s, dtype=work, device=device) for s in spatial]
    grid = [g.reshape(1, -1) for g in torch.meshgrid(*axes, indexing="ij")]
    draw_device = _draw_device(generator, device)
    total = torch.zeros((n_slices, grid[0].shape[1]), dtype=work, device=device)
    for o in range(octaves):
        offset = torch.rand((len(spatial), n_slices, 1), generator=generator, device=draw_device, dtype=work).to(device)
        spacing = float(frequency) / 2 ** o
        coords = [g / spacing + off for g, off in zip(grid, offset)]
        total += float(persistence) ** o * _simplex_octave(coords, generator, draw_device)
    total = total - total.mean(dim=1, keepdim=True)
    total = total / total.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-12)
    return total.reshape(dims).to(dtype)


def coarse_noise(shape: tuple[int, ...], *, resolution: int = 16, std: float = 0.2,
                 generator: torch.Generator | None = None, roll: bool = True, device=None,
                 dtype: str | torch.dtype = torch.float32) -> torch.Tensor:
    """Coarse noise of the denoising-autoencoder baseline (Kascenas et al., MIDL 2022).

    N(0, std^2) is drawn on a ``resolution`` x ``resolution`` grid per (n, c) and upsampled
    bilinearly (corners aligned, as ``F.upsample_bilinear`` in the reference code) to H x W. With
    ``roll`` each image's field is shifted by a random cyclic translation (the reference rolls the
    whole batch by one shift; here every image gets its own). 2-D only. Unlike :func:`simplex_noise`
    the result is not normalised: ``std`` is the noise magnitude added to images in [0, 1]. The
    reference applies it to the foreground only: multiply by a brain mask yourself.
    """
    dims = _check_shape(shape)
    dtype = as_dtype(dtype)
    if len(dims) != 4:
        raise ValueError(f"shape: coarse noise is 2-D only, expected (N, C, H, W), got {dims}")
    check_positive_int(resolution, "resolution")
    if isinstance(std, bool) or not isinstance(std, Real) or not math.isfinite(std) or std < 0:
        raise ValueError(f"std: expected a finite number >= 0, got {std!r}")
    n, c, h, w = dims
    draw_device = _draw_device(generator, device)
    low = torch.randn((n, c, resolution, resolution), generator=generator, device=draw_device, dtype=dtype) * std
    out = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True)
    if roll:
        shifts = torch.rand((n, 2), generator=generator, device=draw_device)
        sy, sx = (shifts[:, 0] * h).long().view(n, 1, 1, 1), (shifts[:, 1] * w).long().view(n, 1, 1, 1)
        rows = (torch.arange(h, device=draw_device).view(1, 1, h, 1) - sy) % h
        cols = (torch.arange(w, device=draw_device).view(1, 1, 1, w) - sx) % w
        out = out.gather(2, rows.expand(n, c, h, w)).gather(3, cols.expand(n, c, h, w))
    return out.to(device) if device is not None else out


def make_noise(noise_type: str, shape: tuple[int, ...], generator: torch.Generator | None = None,
               **kwargs: Any) -> torch.Tensor:
    """Draw noise of the named type: "gaussian", "simplex" or "coarse"; ``kwargs`` go to that function."""
    functions = {"gaussian": gaussian_noise, "simplex": simplex_noise, "coarse": coarse_noise}
    if noise_type not in functions:
        raise ValueError(f"noise_type: expected one of {', '.join(repr(k) for k in NOISE_TYPES)}, got {noise_type!r}")
    return functions[noise_type](shape, generator=generator, **kwargs)

"""Simplex (AnoDDPM), coarse (DAE) and Gaussian noise: shapes, seeding, statistics, validation."""
from __future__ import annotations

import pytest
import torch

from diffrep.noise import coarse_noise, gaussian_noise, make_noise, simplex_noise



def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _neighbour_corr(x: torch.Tensor, lag: int = 1) -> float:
    a, b = x[..., :-lag].flatten(), x[..., lag:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("kind", ["gaussian", "simplex", "coarse"])
def test_shape_dtype_and_determinism(kind):
    shape = (3, 2, 16, 24)
    a = make_noise(kind, shape, generator=_gen(7))
    b = make_noise(kind, shape, generator=_gen(7))
    c = make_noise(kind, shape, generator=_gen(8))
    assert a.shape == shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_simplex_is_normalised_per_slice():
    x = simplex_noise((4, 2, 32, 32), generator=_gen(0))
    flat = x.flatten(2)
    assert torch.allclose(flat.mean(-1), torch.zeros(4, 2), atol=1e-5)
    assert torch.allclose(flat.std(-1, unbiased=False), torch.ones(4, 2), atol=1e-4)


def test_simplex_slices_are_independent():
    x = simplex_noise((2, 2, 32, 32), generator=_gen(1))
    slices = x.flatten(2).reshape(4, -1)
    corr = torch.corrcoef(slices)
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.5


def test_spatial_correlation_simplex_vs_gaussian():
    simplex = simplex_noise((8, 1, 64, 64), generator=_gen(2))
    gauss = gaussian_noise((8, 1, 64, 64), generator=_gen(2))
    coarse = coarse_noise((8, 1, 64, 64), generator=_gen(2))
    assert _neighbour_corr(simplex) > 0.7
    assert _neighbour_corr(coarse) > 0.7
    assert abs(_neighbour_corr(gauss)) < 0.1
    # Fractal: correlation decays with distance but stays positive at a few pixels.
    assert _neighbour_corr(simplex, 1) > _neighbour_corr(simplex, 4) > _neighbour_corr(simplex, 16)


def test_simplex_feature_size_follows_frequency():
    coarse = simplex_noise((4, 1, 64, 64), octaves=1, frequency=32.0, generator=_gen(3))
    fine = simplex_noise((4, 1, 64, 64), octaves=1, frequency=4.0, generator=_gen(3))
    assert _neighbour_corr(coarse, 4) > _neighbour_corr(fine, 4) + 0.3


def test_simplex_3d_and_float64():
    x = simplex_noise((2, 1, 8, 12, 12), generator=_gen(4), dtype=torch.float64)
    assert x.shape == (2, 1, 8, 12, 12) and x.dtype == torch.float64
    assert torch.isfinite(x).all()
    assert torch.equal(x, simplex_noise((2, 1, 8, 12, 12), generator=_gen(4), dtype=torch.float64))


def test_simplex_runs_on_a_typical_batch():
    x = simplex_noise((16, 1, 64, 64), generator=_gen(5))  # AnoDDPM defaults; should take well under 1 s
    assert x.shape == (16, 1, 64, 64) and torch.isfinite(x).all()


def test_coarse_noise_magnitude_and_no_roll():
    x = coarse_noise((4, 1, 64, 64), resolution=16, std=0.2, roll=False, generator=_gen(6))
    assert 0.05 < float(x.std()) < 0.3
    low = torch.randn((4, 1, 16, 16), generator=_gen(6)) * 0.2
    assert torch.allclose(x[..., 0, 0], low[..., 0, 0]) and torch.allclose(x[..., -1, -1], low[..., -1, -1])


@pytest.mark.parametrize("kwargs, match", [
    ({"octaves": 0}, "octaves"),
    ({"octaves": 2.5}, "octaves"),
    ({"octaves": True}, "octaves"),
    ({"persistence": 0.0}, "persistence"),
    ({"persistence": -0.5}, "persistence"),
    ({"persistence": float("nan")}, "persistence"),
    ({"frequency": 0.0}, "frequency"),
])
def test_simplex_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simplex_noise((1, 1, 8, 8), **kwargs)


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 8), (1, 1, 1, 1, 8, 8), (0, 1, 8, 8)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape"):
        simplex_noise(shape)


def test_bad_kind_names_valid_kinds():
    with pytest.raises(ValueError, match="gaussian.*simplex.*coarse"):
        make_noise("perlin", (1, 1, 8, 8))


def test_coarse_validation():
    with pytest.raises(ValueError, match="2-D"):
        coarse_noise((1, 1, 4, 8, 8))
    with pytest.raises(ValueError, match="resolution"):
        coarse_noise((1, 1, 8, 8), resolution=0)
    with pytest.raises(ValueError, match="std"):
        coarse_noise((1, 1, 8, 8), std=-1.0)

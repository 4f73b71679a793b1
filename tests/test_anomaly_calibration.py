"""Healthy-residual calibration: the z-score table against a hand computation, NFE, errors, clone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from diffrep.anomaly import CalibratedScorer, ReconstructionScorer
from diffrep.anomaly.calibration import intensity_and_gradient
from tests.conftest import make_backbone
from tests.test_anomaly_scorers import StubScorer


def _images(n: int = 6, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bins", [1, 2, 4])
def test_z_scores_match_a_hand_computed_table(bins):
    healthy, test = _images(), _images(3, seed=1)
    masks = np.ones((6, 12, 12), dtype=bool)
    masks[:, :2] = False  # pixels outside the masks must not enter the table
    scorer = CalibratedScorer(StubScorer(scale=2.0), bins=bins, min_count=1).fit(healthy, masks)
    # reference: quantile edges, then per-cell mean/std of the stub's raw map (2 * image^2) inside the masks
    inten, grad = intensity_and_gradient(healthy.numpy())
    raw = 2.0 * healthy.numpy()[:, 0] ** 2
    q = np.linspace(0, 1, bins + 1)[1:-1]
    ei, eg = np.quantile(inten[masks], q), np.quantile(grad[masks], q)
    cell = lambda i, g: np.digitize(i, ei) * bins + np.digitize(g, eg)  # noqa: E731
    ti, tg = intensity_and_gradient(test.numpy())
    expected = np.empty((3, 12, 12))
    for c in np.unique(cell(ti, tg)):
        healthy_values = raw[masks][cell(inten[masks], grad[masks]) == c]
        if healthy_values.size == 0:  # a cell no healthy pixel fell into: global statistics
            healthy_values = raw[masks]
        sel = cell(ti, tg) == c
        expected[sel] = (2.0 * test.numpy()[:, 0][sel] ** 2 - healthy_values.mean()) / max(healthy_values.std(), 1e-3 * raw[masks].std())
    np.testing.assert_allclose(scorer.raw_maps(test), expected, rtol=1e-4, atol=1e-4)
    # healthy pixels come out standardised: mean 0, std 1 over the fitting set when every cell is populated
    z = scorer.raw_maps(healthy)[masks]
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1.0) < 0.05


def test_a_lesion_stands_out_more_after_calibration_than_an_edge():
    """Healthy images whose residual is large at edges: calibration removes the edge, keeps the lesion."""
    class EdgeResidual(StubScorer):
        def _raw_maps(self, images):  # residual = gradient magnitude, plus 3 inside a 'lesion' (values in (0.4, 0.6))
            grad = torch.from_numpy(intensity_and_gradient(images.numpy())[1])
            return grad + 3.0 * ((images[:, 0] > 0.4) & (images[:, 0] < 0.6)).float()

    generator = torch.Generator().manual_seed(0)
    healthy = 0.05 * torch.rand(16, 1, 16, 16, generator=generator)
    for i in range(16):
        healthy[i, :, :, 4 + i % 8:] += 0.9  # a vertical edge, at a different column in each image
    test = healthy[:1].clone()
    test[0, 0, 2:5, 1:4] = 0.5  # a flat lesion away from the edge (column 4)
    calibrated = CalibratedScorer(EdgeResidual(), bins=4).fit(healthy)
    raw = EdgeResidual().raw_maps(test)[0]
    z = calibrated.raw_maps(test)[0]
    edge = (slice(8, 14), slice(3, 5))
    assert raw[edge].max() > raw[3, 2]  # before: the healthy edge outranks the lesion's centre
    assert z[3, 2] > z[edge].max()      # after: the lesion outranks it


def test_calls_clone_and_errors():
    backbone = make_backbone("2d-2level")
    base = ReconstructionScorer(backbone, timestep=100, reverse="ddim", ddim_steps=3)
    scorer = CalibratedScorer(base, bins=3)
    assert scorer.unet_calls_per_image == 3
    assert clone(scorer).get_params()["scorer"].get_params()["ddim_steps"] == 3
    images = torch.rand(4, 1, 16, 16)
    with pytest.raises(NotFittedError, match="fit"):
        scorer.score(images)
    with pytest.raises(ValueError, match="masks: expected shape"):
        scorer.fit(images, np.ones((4, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="at least one healthy pixel"):
        scorer.fit(images, np.zeros((4, 16, 16), dtype=bool))
    with pytest.raises(TypeError, match="scorer: expected an AnomalyScorer"):
        CalibratedScorer("x0").fit(images)
    with pytest.raises(ValueError, match="bins: expected an integer >= 1"):
        CalibratedScorer(base, bins=0).fit(images)
    result = scorer.fit(images).score(images[:2], np.ones((2, 16, 16), dtype=bool))
    assert result.maps.shape == (2, 16, 16) and result.scores.shape == (2,)
    # deterministic: the base scorer's seeded noise makes two scoring calls identical
    np.testing.assert_array_equal(result.maps, scorer.score(images[:2], np.ones((2, 16, 16), dtype=bool)).maps)


def test_draws_average_reconstructions_and_multiply_calls():
    backbone = make_backbone("2d-2level")
    images = torch.rand(2, 1, 16, 16)
    one = ReconstructionScorer(backbone, timestep=300, noise="per_image")
    three = ReconstructionScorer(backbone, timestep=300, noise="per_image_ensemble(3)")
    assert one.unet_calls_per_image == 1 and three.unet_calls_per_image == 3
    assert ReconstructionScorer(backbone, timestep=300, reverse="ddim", ddim_steps=2,
                                noise="per_image_ensemble(4)").unet_calls_per_image == 8
    # one draw is the single-draw scorer, bit for bit (cached maps stay valid)
    np.testing.assert_array_equal(one.reconstruct(images), ReconstructionScorer(backbone, timestep=300).reconstruct(images))
    # three draws average three different single-draw reconstructions
    rec = three.reconstruct(images)
    assert not np.allclose(rec, one.reconstruct(images))
    with pytest.raises(ValueError, match=r"noise: expected 'per_image', .*got 'per_image_ensemble\(0\)'"):
        ReconstructionScorer(backbone, noise="per_image_ensemble(0)").reconstruct(images)


def test_an_already_fitted_base_scorer_is_not_refitted():
    class Counting(StubScorer):
        fits = 0

        def fit(self, healthy_images, masks=None):
            Counting.fits += 1
            self.fitted_ = True
            return self

    images = _images()
    base = Counting()
    CalibratedScorer(base, bins=2).fit(images)
    assert Counting.fits == 1
    CalibratedScorer(base, bins=2).fit(images)  # e.g. a trained DAE loaded from disk
    assert Counting.fits == 1

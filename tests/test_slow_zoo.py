"""Slow: the shipped checkpoints (the zoo) against their own provenance, on real data.

Run with ``python -m pytest -q -m slow`` (``make test-slow``). Everything here runs on a fresh
machine with only the package's dependencies: the brain data are the MNI152 volumes shipped in the
nilearn wheel. Only the Fashion-MNIST held-out losses need data outside the wheel; they skip, with
the reason, where the IDX files are not found.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrep import FeatureExtractor, load_backbone
from diffrep.backbones import Backbone, BackboneConfig
from diffrep.backbones.zoo import zoo_names
from diffrep.training.evaluate import heldout_losses

from .test_extractor import BATCHING_TOLERANCE

pytestmark = pytest.mark.slow

SHIPPED = ["brain-ddpm", "fmnist-ddpm", "fmnist-ddpm-long"]
# The recorded losses were computed with the float32 EMA weights; the zoo stores them in float16.
# Measured on brain-ddpm: within 0.03% at t <= 250 and 0.23% at t = 900 (loss 4e-4), hence 1%.
TRAINED_RTOL = 1e-2
# A fresh MONAI U-Net predicts exactly 0 (zero-initialised output layer), so its loss is the power of
# the seeded noise draws: it reproduces to float32 summation order.
FRESH_RTOL = 1e-5


def _heldout_images(provenance: dict) -> torch.Tensor:
    """The held-out images the training run evaluated on (its recipe's data section)."""
    data = provenance["recipe"]["data"]
    if data["dataset"] == "brain":
        from diffrep.data.brain import load_brain_split

        return torch.as_tensor(load_brain_split("val", size=data["size"]).images).float()
    from diffrep.data.fashion_mnist import load_fashion_mnist, to_tensor_images

    try:
        test, _ = load_fashion_mnist("test", path=data["path"])
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST is not installed (data outside the wheel): {str(err).splitlines()[0]}")
    return to_tensor_images(test[: data["heldout_size"]], pad_to=data["pad_to"])


def _fresh_init(backbone: Backbone, seed: int) -> Backbone:
    """The untrained U-Net the training run started from (``diffrep.training.loop`` seeds, then builds)."""
    torch.manual_seed(seed)
    config = backbone.config
    return Backbone(BackboneConfig(unet=config.unet, schedule=config.schedule, normalisation=config.normalisation))


def test_the_zoo_ships_the_documented_entries():
    assert zoo_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_loads_and_matches_its_recipe(name):
    backbone = load_backbone(name)
    provenance = backbone.config.provenance
    recipe = provenance["recipe"]
    assert provenance["complete"] and provenance["steps"] == recipe["max_steps"]
    assert recipe["name"] == name
    for section in ("unet", "schedule"):
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in vars(getattr(backbone.config, section)).items()} \
            == recipe["backbone"][section], section
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in backbone.unet.parameters())
    size = 28 if recipe["data"]["dataset"] == "fmnist" else recipe["data"]["size"]
    images = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    features = FeatureExtractor(backbone, backbone.node_names, [10, 500])(images)
    for info in backbone.feature_info():
        for t in (10, 500):
            value = features[(info.name, t)]
            assert tuple(value.shape) == info.shape(2, (size, size)) and torch.isfinite(value).all()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_reproduces_its_recorded_heldout_losses(name):
    """diffrep.training.evaluate.heldout_losses on the recipe's held-out set, as the training run did."""
    backbone = load_backbone(name)
    provenance = backbone.config.provenance
    seed, timesteps = provenance["recipe"]["seed"], provenance["recipe"]["eval_timesteps"]
    images = _heldout_images(provenance)
    trained = heldout_losses(backbone, images, timesteps, seed=seed)
    fresh = heldout_losses(_fresh_init(backbone, seed), images, timesteps, seed=seed)
    for t in timesteps:
        assert trained[t] == pytest.approx(provenance["heldout_loss"][str(t)], rel=TRAINED_RTOL), t
        assert fresh[t] == pytest.approx(provenance["heldout_loss_fresh_init"][str(t)], rel=FRESH_RTOL), t
        assert trained[t] < 0.6 * fresh[t], t  # the training left a model far better than its start


@pytest.mark.parametrize("name", ["brain-ddpm", "fmnist-ddpm"])
def test_shipped_checkpoint_features_follow_the_determinism_guarantee(name):
    """README "Noise": identical batching is bit for bit; batch 64 vs 1 agrees within the stated tolerance."""
    backbone = load_backbone(name)
    if name == "brain-ddpm":
        from diffrep.data.brain import load_brain_split

        images = torch.as_tensor(load_brain_split("val", size=64).images[:4]).float()
    else:
        images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    nodes, steps = backbone.node_names, [10, 250]
    first = FeatureExtractor(backbone, nodes, steps, seed=5, batch_size=64)(images)
    again = FeatureExtractor(backbone, nodes, steps, seed=5, batch_size=64)(images)
    single = FeatureExtractor(backbone, nodes, steps, seed=5, batch_size=1, batch_timesteps=False)(images)
    for key in first:
        assert torch.equal(first[key], again[key]), key
        torch.testing.assert_close(single[key], first[key], **BATCHING_TOLERANCE, msg=str(key))


def test_mni152_volumes_from_the_nilearn_wheel_give_the_documented_slices():
    """The MNI152 2009a volumes ship in nilearn; every split loads at 64 and 128 pixels, same slices."""
    from diffrep.data.brain import find_mni152, load_brain_split, load_volume

    files = find_mni152()
    assert set(files) >= {"t1", "gm", "wm"} and all(path.is_file() for path in files.values())
    t1, _ = load_volume(files["t1"])
    assert t1.ndim == 3 and min(t1.shape) > 128
    train = load_brain_split("train", size=64)
    assert len(train) == 93  # the brain-ddpm provenance records 93 training slices
    for split in ("train", "val", "test"):
        small, large = load_brain_split(split, size=64), load_brain_split(split, size=128)
        assert small.images.shape[1:] == (1, 64, 64) and large.images.shape[1:] == (1, 128, 128)
        np.testing.assert_array_equal(small.slice_index, large.slice_index)
        assert set(np.unique(large.labels)) == {0, 1, 2, 3}

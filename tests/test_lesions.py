"""Synthetic lesions on disc 'brains': seeding, masks inside the brain, effects per kind, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrep.data.lesions import LESION_KINDS, LesionConfig, add_lesions, make_anomaly_test_set



def _discs(n: int = 4, size: int = 32, radius: float = 12.0):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= radius ** 2
    masks = np.broadcast_to(disc, (n, 1, size, size)).copy()
    rng = np.random.default_rng(0)
    images = np.where(masks, 0.5 + 0.05 * rng.standard_normal(masks.shape), 0.0).clip(0, 1).astype(np.float32)
    return images, masks


CONFIG = LesionConfig(radius=(2.5, 4.0), margin=3)


def test_deterministic_and_seed_dependent():
    images, masks = _discs()
    a = add_lesions(images, masks, CONFIG, seed=1)
    b = add_lesions(images, masks, CONFIG, seed=1)
    c = add_lesions(images, masks, CONFIG, seed=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[1], c[1])


def test_outputs_types_shapes_masks_inside_brain():
    images, masks = _discs()
    out, lesions, kinds = add_lesions(images, masks, CONFIG, seed=0)
    assert out.shape == images.shape and out.dtype == np.float32
    assert lesions.shape == masks.shape and lesions.dtype == bool
    assert len(kinds) == 4 and set(kinds) <= set(LESION_KINDS)
    assert lesions.reshape(4, -1).any(1).all()
    assert not (lesions & ~masks).any()
    assert out.min() >= 0 and out.max() <= 1
    assert np.array_equal(out[~masks], images[~masks])
    out_t, lesions_t, _ = add_lesions(torch.from_numpy(images), torch.from_numpy(masks), CONFIG, seed=0)
    assert isinstance(out_t, torch.Tensor) and torch.equal(lesions_t, torch.from_numpy(lesions))


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_each_kind_changes_inside_not_outside(kind):
    images, masks = _discs()
    cfg = LesionConfig(kinds=(kind,), radius=(3.0, 4.0), count=(1, 1), margin=4)
    out, lesions, kinds = add_lesions(images, masks, cfg, seed=3)
    assert kinds == [kind] * 4
    change = np.abs(out - images)
    inside, outside = change[lesions].mean(), change[~lesions].mean()
    assert inside > 0.05
    assert inside > 8 * outside


def test_hyper_brightens_and_hypo_darkens():
    images, masks = _discs()
    for kind, sign in (("hyper", 1), ("hypo", -1)):
        cfg = LesionConfig(kinds=(kind,), radius=(3.0, 4.0), margin=4)
        out, lesions, _ = add_lesions(images, masks, cfg, seed=4)
        assert sign * (out - images)[lesions].mean() > 0.15
        assert (sign * (out - images)[lesions] >= -1e-6).all()


def test_lesion_size_scales_with_radius():
    images, masks = _discs(size=48, radius=20)
    small = add_lesions(images, masks, LesionConfig(radius=(2.0, 2.5), count=(1, 1)), seed=5)[1]
    large = add_lesions(images, masks, LesionConfig(radius=(6.0, 6.5), count=(1, 1)), seed=5)[1]
    assert large.sum() > 4 * small.sum()


def test_make_anomaly_test_set():
    images, masks = _discs(n=6)
    data = make_anomaly_test_set(images, masks, CONFIG, seed=0, anomalous_fraction=0.5)
    labels = data["labels"]
    assert labels.tolist().count(1) == 3 and labels.dtype == np.int64
    healthy = labels == 0
    assert np.array_equal(data["images"][healthy], images[healthy])
    assert not data["lesion_masks"][healthy].any()
    assert data["lesion_masks"][~healthy].reshape(3, -1).any(1).all()
    assert [k == "none" for k in data["kinds"]] == healthy.tolist()
    again = make_anomaly_test_set(images, masks, CONFIG, seed=0, anomalous_fraction=0.5)
    assert np.array_equal(again["images"], data["images"])


def test_bad_inputs():
    images, masks = _discs()
    with pytest.raises(ValueError, match=r"\(4, 1, 32, 32\).*\(4, 1, 16, 32\)"):
        add_lesions(images, masks[:, :, :16], CONFIG)
    empty = masks.copy()
    empty[2] = False
    with pytest.raises(ValueError, match=r"empty.*\[2\]"):
        add_lesions(images, empty, CONFIG)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        add_lesions(images * 2, masks, CONFIG)
    with pytest.raises(ValueError, match="kinds"):
        LesionConfig(kinds=("tumour",))
    with pytest.raises(ValueError, match="radius"):
        LesionConfig(radius=(5.0, 2.0))
    with pytest.raises(ValueError, match="anomalous_fraction"):
        make_anomaly_test_set(images, masks, CONFIG, anomalous_fraction=1.5)

"""Brain slice loader: NIfTI checks, mask/label derivation, splits, augmentation."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from diffrep.data import brain
from diffrep.data import (SPLITS, BrainSlices, augment_batch, brain_augmentation, check_labels, load_brain_slices,
                          load_brain_split, load_volume)


def ellipsoid(shape=(32, 32, 20)) -> np.ndarray:
    """Synthetic head: dark CSF shell, grey ring, bright white core, zero background."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt((grid[0] / 0.8) ** 2 + (grid[1] / 0.9) ** 2 + (grid[2] / 0.9) ** 2)
    vol = np.zeros(shape, np.float32)
    vol[r < 1.0] = 30.0
    vol[r < 0.85] = 60.0
    vol[r < 0.5] = 100.0
    return vol + np.random.default_rng(0).normal(0, 1, shape).astype(np.float32) * (r < 1.0)


def save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def test_load_volume(tmp_path):
    vol = ellipsoid()
    data, affine = load_volume(save(tmp_path / "t1.nii.gz", vol))
    assert data.dtype == np.float32 and data.shape == vol.shape and affine.shape == (4, 4)
    np.testing.assert_allclose(data, vol, atol=1e-4)
    flipped = np.diag([-1.0, 1, 1, 1])  # LAS on disk -> reoriented to RAS
    data2, aff2 = load_volume(save(tmp_path / "las.nii", vol, flipped))
    np.testing.assert_allclose(data2, vol[::-1], atol=1e-4)
    assert aff2[0, 0] > 0
    data3, _ = load_volume(save(tmp_path / "4d1.nii.gz", vol[..., None]))
    assert data3.shape == vol.shape


def test_load_volume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match=r"expected a 3D volume, got shape \(8, 8, 4, 3\)"):
        load_volume(save(tmp_path / "4d.nii.gz", np.zeros((8, 8, 4, 3), np.float32)))
    with pytest.raises(ValueError, match=r"expected a 3D volume, got shape \(8, 8\)"):
        load_volume(save(tmp_path / "2d.nii.gz", np.zeros((8, 8), np.float32)))
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="junk.nii.gz: expected a readable NIfTI"):
        load_volume(tmp_path / "junk.nii.gz")


def test_t1_only_folder(tmp_path):
    save(tmp_path / "a.nii.gz", ellipsoid())
    save(tmp_path / "b.nii", ellipsoid() * 2)
    s = load_brain_slices(size=16, volumes=tmp_path, min_brain_fraction=0.1)
    assert isinstance(s, BrainSlices) and len(s) > 0
    assert s.images.shape == (len(s), 1, 16, 16) and s.masks.dtype == bool and s.labels.dtype == np.int64
    assert set(np.unique(s.volume_id)) == {0, 1}
    assert s.source["label_method"] == ["multiotsu", "multiotsu"]
    assert 0.0 <= s.images.min() and s.images.max() <= 1.0
    assert not s.images[~s.masks].any()
    np.testing.assert_array_equal(s.labels > 0, s.masks[:, 0])
    assert set(np.unique(s.labels)) == {0, 1, 2, 3}
    # intensity scaling is undone by the percentile normalisation
    np.testing.assert_allclose(s.images[s.volume_id == 0], s.images[s.volume_id == 1], atol=1e-5)
    sub = s.subset([0, 2])
    assert len(sub) == 2 and sub.slice_index.tolist() == s.slice_index[[0, 2]].tolist()
    part = load_brain_slices(size=16, volumes=tmp_path / "a.nii.gz", slice_range=[(0, 5), (15, 20)])
    assert set(part.slice_index.tolist()) <= set(range(0, 5)) | set(range(15, 20))


def test_tissue_maps_and_errors(tmp_path):
    vol = ellipsoid()
    wm = (vol > 80).astype(np.float32)
    gm = ((vol > 45) & (vol < 80)).astype(np.float32)
    spec = {"t1": save(tmp_path / "t1.nii.gz", vol), "gm": save(tmp_path / "gm.nii.gz", gm),
            "wm": save(tmp_path / "wm.nii.gz", wm)}
    s = load_brain_slices(size=16, volumes=[spec])
    assert s.source["label_method"] == ["tissue_maps"] and set(np.unique(s.labels)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="non-empty brain mask"):
        load_brain_slices(size=16, volumes=save(tmp_path / "empty.nii.gz", np.zeros((16, 16, 8), np.float32)))
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_brain_slices(size=16, volumes=[{"t1": tmp_path / "nope.nii.gz"}])
    with pytest.raises(ValueError, match="expected keys 't1'"):
        load_brain_slices(size=16, volumes=[{"t1": spec["t1"], "gm": spec["gm"]}])
    with pytest.raises(ValueError, match="slice_range"):
        load_brain_slices(size=16, volumes=[spec], slice_range=(5, 2))
    with pytest.raises(ValueError, match="expected at least one slice"):
        load_brain_slices(size=16, volumes=[spec], slice_range=(100, 120))


def test_check_labels():
    check_labels(np.array([0, 1, 2, 3]), 4)
    with pytest.raises(ValueError, match=r"expected values in 0..3, got out-of-range value\(s\) \[-1, 4, 7\]"):
        check_labels(torch.tensor([[0, 4], [7, -1]]), 4)
    with pytest.raises(TypeError, match="integer dtype"):
        check_labels(np.array([0.0, 1.0]), 4)


def toy_batch(n=3, s=32):
    yy, xx = np.mgrid[:s, :s]
    r = np.hypot(yy - s / 2, xx - s / 2)
    labels = np.select([r < 5, r < 9, r < 13], [1, 3, 2], 0).astype(np.int64)
    labels = np.repeat(labels[None], n, 0)
    masks = (labels > 0)[:, None]
    images = (labels[:, None] / 3.0).astype(np.float32)
    return images, masks, labels


def test_augmentation_deterministic_and_joint():
    images, masks, labels = toy_batch()
    a = augment_batch(brain_augmentation(seed=3, prob=1.0), images, masks, labels)
    b = augment_batch(brain_augmentation(seed=3, prob=1.0), images, masks, labels)
    c = augment_batch(brain_augmentation(seed=4, prob=1.0), images, masks, labels)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    img, msk, lab = a
    assert img.shape == images.shape and img.dtype == torch.float32
    assert msk.shape == masks.shape and msk.dtype == torch.bool
    assert lab.shape == labels.shape and lab.dtype == torch.int64
    check_labels(lab, 4)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0 and not img[~msk].any()
    assert torch.equal(lab > 0, msk[:, 0])  # geometry applied jointly to mask and label
    assert not torch.equal(lab, torch.from_numpy(labels))  # something actually moved
    with pytest.raises(ValueError, match="expected masks"):
        augment_batch(brain_augmentation(0), images, masks[:, :, :8], labels)


def test_mni152_splits():
    splits = {name: load_brain_split(name, size=64) for name in SPLITS}
    seen: dict[str, set[int]] = {}
    for name, s in splits.items():
        n = len(s)
        assert n > 0 and s.images.shape == (n, 1, 64, 64) and s.labels.shape == (n, 64, 64)
        assert s.images.dtype == np.float32 and 0.0 <= s.images.min() and s.images.max() <= 1.0
        assert set(np.unique(s.labels)) == {0, 1, 2, 3}
        np.testing.assert_array_equal(s.labels > 0, s.masks[:, 0])
        assert (s.masks.mean(axis=(1, 2, 3)) >= 0.05).all()
        seen[name] = set(s.slice_index.tolist())
    assert len(splits["train"]) > len(splits["test"]) > 0 and len(splits["train"]) > len(splits["val"])
    # the slices the shipped brain-ddpm was trained on: same indices, same masks and labels, pixel for pixel
    expected = {"train": ([*range(11, 60), *range(106, 150)], 109788, [271140, 7272, 73728, 28788]),
                "val": (list(range(64, 78)), 32396, [24948, 1882, 18384, 12130]),
                "test": (list(range(82, 102)), 44094, [37826, 2352, 21222, 20520])}
    for name, (indices, brain_pixels, label_counts) in expected.items():
        s = splits[name]
        assert s.slice_index.tolist() == indices and int(s.masks.sum()) == brain_pixels
        assert np.bincount(s.labels.ravel(), minlength=4).tolist() == label_counts
    assert abs(float(splits["test"].images.astype(np.float64).sum()) - 31123.7100) < 1e-2
    names = list(seen)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            gap = min(abs(x - y) for x in seen[a] for y in seen[b])
            assert gap >= 4, f"{a}/{b} slices only {gap} apart"
    # cached, but callers get independent copies
    splits["test"].images[:] = 0.5
    assert load_brain_split("test", size=64).images.max() == 1.0
    with pytest.raises(ValueError, match="split: expected one of"):
        load_brain_split("dev")
    assert brain.find_mni152()["t1"].name == brain.MNI152_FILES["t1"]

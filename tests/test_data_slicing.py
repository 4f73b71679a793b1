"""Volume <-> slices (diffrep.data.slicing): layout, exact and interpolated round trips, labels kept, refusals."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from diffrep.data.slicing import SliceGeometry, crop_box, resize_labels, slices_to_volume, volume_to_slices

SHAPE = (30, 26, 9)


def _ball(shape=SHAPE, centre=(0.1, -0.2, 0.0), radius=0.7) -> np.ndarray:
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) < radius ** 2


def _smooth(shape=SHAPE) -> np.ndarray:
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return (1.0 + 0.5 * np.sin(2 * grid[0]) + 0.3 * np.cos(1.5 * grid[1]) + 0.2 * grid[2]).astype(np.float32)


def _labels(mask: np.ndarray) -> np.ndarray:
    """Four blocky classes (0 outside the mask), blocks of 4x4 voxels in-plane."""
    idx = np.indices(mask.shape)
    return np.where(mask, 1 + (idx[0] // 4 + idx[1] // 4) % 3, 0).astype(np.int64)


def test_axial_layout_and_crop_box():
    """Axial slice z is vol[:, ::-1, z].T (rows anterior -> posterior, columns left -> right), cut to the box."""
    rng = np.random.default_rng(0)
    mask = _ball()
    vol = rng.random(SHAPE).astype(np.float32)
    images, labels, geometry = volume_to_slices(vol, mask)
    r0, c0, side = geometry.box
    assert geometry == SliceGeometry(SHAPE, 2, (r0, c0, side), side) and crop_box(mask) == geometry.box
    assert images.shape == (SHAPE[2], 1, side, side) and images.dtype == np.float32
    assert labels.shape == (SHAPE[2], side, side) and labels.dtype == np.int64
    rows, cols = np.nonzero(mask.any(axis=2)[:, ::-1].T)
    assert side == max(np.ptp(rows), np.ptp(cols)) + 1 + 8  # footprint + 4-voxel margin on each side
    for z in (0, 4, 8):
        view = vol[:, ::-1, z].T
        for r, c in [(rows[0], cols[0]), (rows[-1], cols[-1]), (view.shape[0] // 2, view.shape[1] // 2)]:
            assert images[z, 0, r - r0, c - c0] == view[r, c]
            assert labels[z, r - r0, c - c0] == mask[:, ::-1, z].T[r, c]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_round_trip_is_exact_at_the_crop_size(axis):
    rng = np.random.default_rng(axis)
    mask = _ball()
    vol = rng.normal(size=SHAPE).astype(np.float32)
    labels = _labels(mask)
    images, label_slices, geometry = volume_to_slices(vol, mask, axis=axis, labels=labels, num_classes=4)
    assert images.shape[0] == SHAPE[axis] and geometry.size == geometry.box[2]
    back = slices_to_volume(images, geometry)
    assert back.shape == SHAPE and back.dtype == np.float32
    np.testing.assert_array_equal(back[mask], vol[mask])  # exactly, inside the crop box
    inside_box = slices_to_volume(np.ones_like(images), geometry) > 0
    assert not back[~inside_box].any() and inside_box.all(axis=axis).any()
    np.testing.assert_array_equal(back[inside_box], vol[inside_box])
    np.testing.assert_array_equal(slices_to_volume(label_slices, geometry, num_classes=4), labels)


@pytest.mark.parametrize("axis", [0, 2])
def test_round_trip_through_resizing_is_within_interpolation(axis):
    mask = _ball()
    vol = _smooth() * mask
    side = crop_box(mask, axis)[2]
    for size in (2 * side, side + 5):
        images, _, geometry = volume_to_slices(vol, mask, axis=axis, size=size)
        assert images.shape[2:] == (size, size)
        back = slices_to_volume(images, geometry)
        assert back.shape == SHAPE
        inner = ndi.binary_erosion(mask, iterations=2)
        error = np.abs(back[inner] - vol[inner])
        assert error.max() < 0.05 and error.mean() < 0.01, (size, error.max(), error.mean())


def test_labels_and_masks_keep_their_labels_through_resizing():
    mask = _ball()
    labels = _labels(mask)
    side = crop_box(mask)[2]
    _, label_slices, geometry = volume_to_slices(np.zeros(SHAPE), mask, size=2 * side, labels=labels, num_classes=4)
    assert set(np.unique(label_slices)) == {0, 1, 2, 3}  # a vote never invents a value between two labels
    back = slices_to_volume(label_slices, geometry, num_classes=4)
    assert back.dtype == np.int64 and set(np.unique(back)) == {0, 1, 2, 3}
    assert (back == labels).mean() > 0.97
    _, mask_slices, geometry = volume_to_slices(np.zeros(SHAPE), mask, size=2 * side)
    assert set(np.unique(mask_slices)) == {0, 1}
    assert (slices_to_volume(mask_slices, geometry, num_classes=2).astype(bool) == mask).mean() > 0.97


def test_mask_vote_is_more_than_half_the_covered_area():
    """The one rule for masks: brain where more than half of what a pixel covers is brain (ties: background)."""
    half = np.zeros((1, 4, 4), np.int64)
    half[0, :, :2] = 1
    assert not resize_labels(half, 1, 2).any()  # exactly half: background
    half[0, 0, 2] = 1
    assert resize_labels(half, 1, 2).all()  # more than half: brain


def test_refusals_name_the_value():
    mask = _ball()
    with pytest.raises(ValueError, match=r"axis: expected 0, 1 or 2, got 3"):
        volume_to_slices(np.zeros(SHAPE), mask, axis=3)
    with pytest.raises(ValueError, match=r"mask of its shape, got \(30, 26, 9\) and \(30, 26, 8\)"):
        volume_to_slices(np.zeros(SHAPE), mask[..., :8])
    with pytest.raises(ValueError, match="non-empty 3D mask"):
        volume_to_slices(np.zeros(SHAPE), np.zeros(SHAPE, bool))
    with pytest.raises(ValueError, match=r"labels: expected the volume's shape"):
        volume_to_slices(np.zeros(SHAPE), mask, labels=np.zeros((2, 2, 2), int), num_classes=2)
    images, _, geometry = volume_to_slices(np.zeros(SHAPE), mask, size=16)
    with pytest.raises(ValueError, match=r"maps: expected shape \(9, 16, 16\)"):
        slices_to_volume(images[:3], geometry)


def _private_imports(path: Path) -> list[str]:
    """Names starting with '_' that a module imports from another diffrep module."""
    tree = ast.parse(path.read_text())
    return [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for alias in node.names if alias.name.startswith("_") and node.level > 0]


def test_brain_and_volume_scoring_share_the_slicing_code_through_public_names():
    root = Path(__file__).resolve().parents[1] / "diffrep"
    for module in ("data/brain.py", "anomaly/volume.py", "data/slicing.py", "data/nifti.py"):
        assert _private_imports(root / module) == [], module
    source = (root / "anomaly" / "volume.py").read_text()
    assert "nib.load" not in source  # NIfTI files are read by diffrep.data.nifti only

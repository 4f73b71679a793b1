"""The one NIfTI loader (diffrep.data.nifti): RAS reorientation and its inverse, refusals naming the file."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from diffrep.data import load_volume
from diffrep.data.nifti import read_nifti

# voxel axes (i, j, k) point to (A, L, S): a permutation and a flip
AFFINE = np.array([[0.0, -1.1, 0.0, 30.0], [1.3, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1]])


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def test_ras_voxels_sit_at_the_same_world_points_and_go_back_to_the_file_order(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    volume = read_nifti(_save(tmp_path / "v.nii.gz", data))
    assert volume.data.shape == (7, 5, 3) and volume.data.dtype == np.float32
    assert np.all(np.diag(volume.ras_affine)[:3] > 0)  # RAS: each axis increases R, A, S
    for ijk in [(0, 0, 0), (4, 6, 2), (2, 3, 1)]:
        world = AFFINE @ np.array([*ijk, 1.0])
        ras_index = np.rint(np.linalg.inv(volume.ras_affine) @ world)[:3].astype(int)
        assert volume.data[tuple(ras_index)] == data[ijk]
    np.testing.assert_array_equal(volume.from_ras(volume.data), data)
    with pytest.raises(ValueError, match=r"v\.nii\.gz: expected an array of the RAS volume's shape \(7, 5, 3\)"):
        volume.from_ras(data)
    data4 = read_nifti(_save(tmp_path / "v4.nii.gz", data[..., None]))
    assert data4.from_ras(data4.data).shape == (5, 7, 3, 1)  # the file's own shape, singleton axis included
    same, affine = load_volume(tmp_path / "v.nii.gz", canonical=False)
    np.testing.assert_array_equal(same, data)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)  # the header stores float32


def test_refusals_name_the_file(tmp_path):
    data = np.ones((6, 6, 4), np.float32)
    with pytest.raises(FileNotFoundError, match=r"NIfTI mask not found: .*nowhere\.nii"):
        read_nifti(tmp_path / "nowhere.nii", "mask")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a NIfTI")
    with pytest.raises(ValueError, match=r"junk\.nii\.gz: expected a readable NIfTI volume"):
        read_nifti(tmp_path / "junk.nii.gz")
    with pytest.raises(ValueError, match=r"4d\.nii\.gz: expected a 3D volume, got shape \(6, 6, 4, 2\)"):
        read_nifti(_save(tmp_path / "4d.nii.gz", np.stack([data, data], -1)))
    full = _save(tmp_path / "full.nii.gz", np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32))
    (tmp_path / "cut.nii.gz").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.nii\.gz: expected a complete NIfTI mask, .*truncated"):
        read_nifti(tmp_path / "cut.nii.gz", "mask")
    bad = data.copy()
    bad[0, 0, :2] = np.nan
    _save(tmp_path / "nan.nii.gz", bad)
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: expected finite intensities, got 2 NaN/Inf voxel"):
        load_volume(tmp_path / "nan.nii.gz")
    assert np.isnan(read_nifti(tmp_path / "nan.nii.gz", finite=False).data).sum() == 2

"""NIfTI in, anomaly-map NIfTI out: grid, affine and header preserved; geometry round trip; bad input; CLI."""
from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
import pytest

from diffrep.anomaly import AnomalyScorer, ReconstructionScorer, score_volume
from diffrep.cli.anomaly import add_anomaly_cli
from diffrep.data.brain import normalise_intensities
from diffrep.data.nifti import read_nifti
from diffrep.data.slicing import crop_box
from diffrep.errors import as_float_images
from tests.conftest import make_backbone
from tests.test_anomaly_scorers import live_backbone

SHAPE = (40, 48, 12)
# A non-identity affine with an axis permutation and a flip: voxel axes (i, j, k) point to (A, L, S).
AFFINE = np.array([[0.0, -1.1, 0.0, 30.0], [1.3, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1]])


class ImageAsMap(AnomalyScorer):
    """map = the input image itself: lets the test follow the geometry through slicing and back."""

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size

    unet_calls_per_image = 0

    def _check_images(self, images):
        return as_float_images(images, in_channels=1, spatial_dims=2)

    def _raw_maps(self, images):
        return images[:, 0]


def _brain(shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid[0] / 0.8) ** 2 + (grid[1] / 0.75) ** 2 + (grid[2] / 0.9) ** 2)
    mask = radius < 1.0
    vol = (100 + 60 * grid[0] + 40 * np.sin(3 * grid[1]) + rng.normal(0, 3, shape)) * mask
    return vol.astype(np.float32), mask


def _write(path, data, affine=AFFINE, dtype=np.int16):
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_zooms(tuple(float(z) for z in np.abs(affine[:3, :3]).max(0))[: data.ndim] + (1.0,) * (data.ndim - 3))
    nib.save(img, str(path))
    return path


@pytest.fixture
def volume(tmp_path):
    vol, mask = _brain()
    return _write(tmp_path / "t1.nii.gz", vol), _write(tmp_path / "mask.nii.gz", mask, dtype=np.uint8), vol, mask


@pytest.mark.parametrize("use_mask", [True, False])
def test_map_on_the_input_grid(tmp_path, volume, use_mask):
    t1, mask_path, _, mask = volume
    scorer = ReconstructionScorer(live_backbone(), timestep=10)
    out = score_volume(scorer, t1, tmp_path / "map.nii.gz", mask_path=mask_path if use_mask else None, size=16,
                       progress=False)
    src, res = nib.load(str(t1)), nib.load(str(out))
    assert res.shape == SHAPE and np.allclose(res.affine, src.affine)
    assert tuple(res.header["dim"]) == tuple(src.header["dim"]) and res.header.get_zooms() == src.header.get_zooms()
    assert res.get_data_dtype() == np.float32
    data = res.get_fdata()
    assert np.isfinite(data).all() and data.max() > 0
    if use_mask:
        assert (data[~mask] == 0).all()
    assert not list(tmp_path.glob(".tmp-*"))


def test_geometry_round_trip(tmp_path, volume):
    t1, mask_path, vol, mask = volume
    out = score_volume(ImageAsMap(), t1, tmp_path / "map.nii", mask_path=mask_path, size=32, progress=False)
    back = nib.load(str(out)).get_fdata()
    lo, hi = np.percentile(vol[mask], [1, 99])
    expected = np.clip((vol - lo) / (hi - lo), 0, 1)
    inner = mask & (np.abs(np.gradient(mask.astype(float))[0]) == 0)
    assert np.corrcoef(back[inner], expected[inner])[0, 1] > 0.9  # same voxels, same order, same orientation


def test_map_at_the_crop_size_is_the_scored_slices_pasted_back_exactly(tmp_path, volume):
    """size = the crop's side: nothing is interpolated, so the map is the normalised scan voxel for voxel."""
    t1, mask_path, _, mask = volume
    side = crop_box(read_nifti(mask_path, "mask").data != 0)[2]
    out = score_volume(ImageAsMap(), t1, tmp_path / "map.nii.gz", mask_path=mask_path, size=side, progress=False)
    saved = nib.load(str(t1)).get_fdata(dtype=np.float32)
    expected, _, _ = normalise_intensities(saved, mask)
    np.testing.assert_array_equal(nib.load(str(out)).get_fdata(dtype=np.float32), expected)


@pytest.mark.parametrize("case,match", [
    ("mask_shape", r"\(40, 48, 12\).*\(40, 48, 10\)"), ("4d", r"3D.*\(40, 48, 12, 2\)"),
    ("zeros", "all-zero"), ("nan", "3 NaN"), ("suffix", r"\.nii"),
])
def test_bad_input(tmp_path, volume, case, match):
    t1, mask_path, vol, mask = volume
    kwargs = {"mask_path": None}
    out = tmp_path / "map.nii.gz"
    if case == "mask_shape":
        kwargs["mask_path"] = _write(tmp_path / "small.nii.gz", mask[..., :10], dtype=np.uint8)
    elif case == "4d":
        t1 = _write(tmp_path / "4d.nii.gz", np.stack([vol, vol], axis=-1))
    elif case == "zeros":
        t1 = _write(tmp_path / "zero.nii.gz", np.zeros(SHAPE))
    elif case == "nan":
        bad = vol.copy()
        bad[0, 0, :3] = np.nan
        t1 = _write(tmp_path / "nan.nii.gz", bad, dtype=np.float32)
    else:
        out = tmp_path / "map.npy"
    with pytest.raises(ValueError, match=match):
        score_volume(ImageAsMap(), t1, out, size=16, progress=False, **kwargs)


def test_cli_anomaly_score(tmp_path, volume):
    t1, mask_path, _, _ = volume
    make_backbone("2d-2level").save(tmp_path / "bb")
    parser = argparse.ArgumentParser()
    add_anomaly_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["anomaly", "score", "--backbone", str(tmp_path / "bb"), str(t1), "--out",
                              str(tmp_path / "m.nii.gz"), "--mask", str(mask_path), "--reverse", "ddim",
                              "--steps", "2", "--timestep", "20", "--size", "16", "--quiet"])
    assert args.func(args) == 0
    src, res = nib.load(str(t1)), nib.load(str(tmp_path / "m.nii.gz"))
    assert res.shape == SHAPE and np.array_equal(res.affine, src.affine)  # the input's grid and affine
    assert res.header.get_zooms() == src.header.get_zooms() and res.header["qform_code"] == src.header["qform_code"]
    with pytest.raises(SystemExit):
        parser.parse_args(["anomaly", "score", "--backbone", "x", "in.nii", "--out", "o.nii", "--reverse", "bogus"])


# ------------------------------------------------------------------------- refusals (issue 11)
def _digest(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "mask"])
def test_out_that_is_an_input_is_refused_and_the_input_survives(tmp_path, volume, monkeypatch, spelling):
    t1, mask_path, _, _ = volume
    monkeypatch.chdir(tmp_path)
    out = {"same": t1, "relative": t1.relative_to(tmp_path), "mask": mask_path,
           "symlink": tmp_path / "link.nii.gz"}[spelling]
    if spelling == "symlink":
        out.symlink_to(t1)
    before = _digest(t1), _digest(mask_path)
    for overwrite in (False, True):  # even --overwrite never replaces an input
        with pytest.raises(ValueError, match=r"expected a new output file, got the (input scan|mask)"):
            score_volume(ImageAsMap(), t1, out, mask_path=mask_path, size=16, progress=False, overwrite=overwrite)
    assert (_digest(t1), _digest(mask_path)) == before


def test_existing_out_is_refused_unless_overwrite(tmp_path, volume):
    t1, mask_path, _, _ = volume
    out = tmp_path / "old.nii.gz"
    out.write_bytes(b"previous result")
    with pytest.raises(FileExistsError, match=r"old\.nii\.gz: expected a new file, but it already exists"):
        score_volume(ImageAsMap(), t1, out, mask_path=mask_path, size=16, progress=False)
    assert out.read_bytes() == b"previous result"
    score_volume(ImageAsMap(), t1, out, mask_path=mask_path, size=16, progress=False, overwrite=True)
    assert nib.load(str(out)).shape == SHAPE


@pytest.mark.parametrize("case,match", [
    ("cut_gz", r"cut\.nii\.gz: expected a complete NIfTI volume.*truncated"),
    ("cut_nii", r"cut\.nii: expected a complete NIfTI volume.*truncated"),
    ("junk", r"junk\.nii\.gz: expected a readable NIfTI volume"),
    ("cut_mask", r"mask_cut\.nii\.gz: expected a complete NIfTI mask"),
    ("mask_affine", r"shifted\.nii\.gz: expected a mask on the grid of .*t1\.nii\.gz"),
])
def test_unreadable_or_misaligned_files_are_named(tmp_path, volume, case, match):
    t1, mask_path, vol, mask = volume
    if case in ("cut_gz", "cut_nii"):
        full = _write(tmp_path / ("full.nii.gz" if case == "cut_gz" else "full.nii"), vol)
        t1 = tmp_path / ("cut.nii.gz" if case == "cut_gz" else "cut.nii")
        t1.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    elif case == "junk":
        t1 = tmp_path / "junk.nii.gz"
        t1.write_bytes(b"not a NIfTI file at all")
    elif case == "cut_mask":
        mask_path = tmp_path / "mask_cut.nii.gz"
        mask_path.write_bytes((tmp_path / "mask.nii.gz").read_bytes()[:-200])
    else:
        shifted = AFFINE.copy()
        shifted[:3, 3] += 4.0
        mask_path = _write(tmp_path / "shifted.nii.gz", mask, affine=shifted, dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        score_volume(ImageAsMap(), t1, tmp_path / "map.nii.gz", mask_path=mask_path, size=16, progress=False)
    assert not (tmp_path / "map.nii.gz").exists()


def test_a_non_finite_map_is_never_written(tmp_path, volume):
    """One NaN weight makes every reconstruction NaN: the map is refused, naming the scan, and not written."""
    import torch

    t1, mask_path, _, _ = volume
    backbone = live_backbone()
    with torch.no_grad():
        next(backbone.unet.parameters()).view(-1)[0] = float("nan")
    scorer = ReconstructionScorer(backbone, timestep=10)
    with pytest.raises(ValueError, match=r"t1\.nii\.gz: expected a finite anomaly map, got \d+ NaN/Inf"):
        score_volume(scorer, t1, tmp_path / "map.nii.gz", mask_path=mask_path, size=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "t1.nii.gz"]


def test_cli_refuses_bad_device_and_out_before_loading_the_backbone(tmp_path, volume, monkeypatch):
    import diffrep.backbones

    t1, mask_path, _, _ = volume
    monkeypatch.setattr(diffrep.backbones, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
    parser = argparse.ArgumentParser()
    add_anomaly_cli(parser.add_subparsers(dest="command", required=True))
    base = ["anomaly", "score", "--backbone", "unused", str(t1)]
    for extra, error, match in [
        (["--out", str(tmp_path / "m.nii.gz"), "--device", "gpu0"], ValueError, r"device: expected .*'gpu0'"),
        (["--out", str(tmp_path / "m.nii.gz"), "--device", "cuda:99"], ValueError, r"device 'cuda:99': expected"),
        (["--out", str(t1)], ValueError, r"t1\.nii\.gz itself"),
        (["--out", str(mask_path), "--mask", str(mask_path), "--overwrite"], ValueError, r"got the mask .*itself"),
    ]:
        args = parser.parse_args(base + extra)
        with pytest.raises(error, match=match):
            args.func(args)

"""diffrep.data.anatomy: atlas loading and resampling, the class set, splits, joint deformation.

Tests on the installed atlases skip where Debian's mricron-data (/usr/share/mricron/templates) or
nilearn's MNI152 is missing; the rest run on synthetic volumes.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from diffrep.data import anatomy as an
from diffrep.data.brain import BrainSlices, check_labels


def _atlases_available() -> bool:
    try:
        from diffrep.data.brain import find_mni152

        find_mni152()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return all((an.TEMPLATES_DIR / f).is_file() for atlas in ("aal", "jhu") for f in an.ATLASES[atlas])


needs_atlases = pytest.mark.skipif(not _atlases_available(),
                                   reason="mricron-data atlases or nilearn's MNI152 not installed")

#: Pixel counts per class (LABEL_NAMES order) of the undeformed 64x64 slices of each split.
SPLIT_COUNTS = {
    "train": [73632, 70130, 694, 411, 270, 2732, 346, 3337],
    "val": [8836, 9696, 165, 543, 363, 198, 476, 203],
    "test": [8922, 9346, 205, 342, 461, 462, 534, 208],
}


def save(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


# ------------------------------------------------------------------------------------- reserved files
@pytest.mark.parametrize("name", ["ch2.nii.gz", "ch2bet.nii.gz", "ch2better.nii.gz", "inia19-t1-brain.nii.gz",
                                  "inia19-NeuroMaps.nii.gz", "CH2.nii"])
def test_reserved_templates_are_refused_by_name_before_reading(tmp_path, monkeypatch, name):
    save(tmp_path / name, np.zeros((4, 4, 4), np.uint8), np.eye(4))
    monkeypatch.setattr(an, "load_volume", lambda *a, **k: pytest.fail("a reserved file was read"))
    with pytest.raises(PermissionError, match="reserved for independent evaluation"):
        an.load_atlas(tmp_path / name)


def test_a_link_to_a_reserved_template_is_refused(tmp_path):
    save(tmp_path / "ch2.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    (tmp_path / "aal.nii.gz").symlink_to(tmp_path / "ch2.nii.gz")
    with pytest.raises(PermissionError, match="reserved"):
        an.load_atlas("aal", templates=tmp_path)


def test_a_missing_atlas_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="mricron-data"):
        an.load_atlas("jhu", templates=tmp_path)


# ---------------------------------------------------------------------------------------- resampling
def test_resampling_follows_the_affines_of_a_flipped_shifted_atlas():
    rng = np.random.default_rng(0)
    atlas = rng.integers(0, 9, size=(20, 22, 18)).astype(np.int32)
    atlas_affine = np.array([[-2.0, 0, 0, 19], [0, 2, 0, -21], [0, 0, 2, -17], [0, 0, 0, 1]])  # LAS, 2 mm
    target_affine = np.array([[1.0, 0, 0, -15.5], [0, 1, 0, -20.5], [0, 0, 1, -16.5], [0, 0, 0, 1]])  # RAS, 1 mm
    shape = (44, 48, 40)
    out = an.resample_labels(atlas, atlas_affine, shape, target_affine)
    assert out.dtype == np.int32 and out.shape == shape
    voxels = np.indices(shape).reshape(3, -1)
    ijk = (np.linalg.inv(atlas_affine) @ target_affine @ np.vstack([voxels, np.ones(voxels.shape[1])]))[:3]
    assert np.allclose(np.abs(ijk % 1 - 0.5), 0.25)  # no ties: every target voxel has one nearest atlas voxel
    nearest = np.rint(ijk).astype(int)
    inside = np.all((ijk >= 0) & (ijk <= np.array(atlas.shape)[:, None] - 1), axis=0)
    outside = np.any((ijk < -1) | (ijk > np.array(atlas.shape)[:, None]), axis=0)
    got = out.reshape(-1)
    assert inside.sum() > 10_000 and outside.sum() > 1000
    assert np.array_equal(got[inside], atlas[tuple(nearest[:, inside])])
    assert not got[outside].any()
    # a left-right flip of the atlas array with the matching affine resamples to the same labels
    flip = np.array([[-1.0, 0, 0, atlas.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    flipped_affine = atlas_affine @ flip
    assert np.array_equal(an.resample_labels(atlas[::-1], flipped_affine, shape, target_affine), out)


@needs_atlases
@pytest.mark.parametrize("atlas", ["aal", "jhu"])
def test_resampled_labels_agree_with_the_atlas_at_world_coordinates(atlas):
    from diffrep.data.brain import find_mni152

    t1 = nib.load(str(find_mni152()["t1"]))
    img = nib.load(str(an.TEMPLATES_DIR / an.ATLASES[atlas][0]))
    data = np.asarray(img.dataobj).astype(int)
    affine = an.HEADER_FIXES.get(an.ATLASES[atlas][0], (None, img.affine))[1]
    vol = an.anatomy_volume()
    resampled = an.resample_labels(*an.load_atlas(atlas), vol.labels.shape, vol.affine)
    assert np.allclose(vol.affine, t1.affine)  # the MNI152 file is RAS already
    rng = np.random.default_rng(1)
    inside = np.argwhere(resampled > 0)
    for v in np.concatenate([inside[rng.integers(0, len(inside), 300)], rng.integers(0, vol.labels.shape, (100, 3))]):
        ijk = np.rint(np.linalg.solve(affine, t1.affine @ np.r_[v, 1.0])[:3]).astype(int)
        expected = data[tuple(ijk)] if np.all((ijk >= 0) & (ijk < data.shape)) else 0
        assert resampled[tuple(v)] == expected, (atlas, v)


@needs_atlases
def test_atlas_orientation_left_is_left_and_the_jhu_header_is_corrected():
    report = an.anatomy_volume().report["atlases"]
    for atlas in ("aal", "jhu"):
        assert report[atlas]["mean_x_mm_left"] < -20 and report[atlas]["mean_x_mm_right"] > 20, atlas
    # the evidence for HEADER_FIXES: the shipped header puts the right tracts on the left and the
    # callosum 1.6 mm off the symmetric template's midline; the FSL affine centres it
    raw = nib.load(str(an.TEMPLATES_DIR / an.ATLASES["jhu"][0]))
    shipped, fixed = an.HEADER_FIXES[an.ATLASES["jhu"][0]]
    assert np.allclose(raw.affine, shipped)
    _, used = an.load_atlas("jhu")
    assert np.allclose(used, fixed)
    names = an.region_names("jhu")
    data = np.asarray(raw.dataobj)
    for affine, callosum_x, right_sign in ((shipped, -1.6, -1), (fixed, 0.4, 1)):
        x = affine[0, 0] * np.arange(data.shape[0]) + affine[0, 3]
        cc = np.isin(data, [names[r] for r in an.CLASSES[3][2]])
        right = np.isin(data, [v for n, v in names.items() if n.endswith("_R")])
        assert abs(x[np.nonzero(cc)[0]].mean() - callosum_x) < 0.3
        assert np.sign(x[np.nonzero(right)[0]].mean()) == right_sign


@needs_atlases
def test_class_voxels_lie_in_the_brain_mask_off_csf_and_share_intensity():
    vol = an.anatomy_volume()
    classes = vol.report["classes"]
    assert list(classes) == list(an.LABEL_NAMES[2:])
    for name, c in classes.items():
        assert c["fraction_in_brain_mask"] == 1.0, name
    assert {k: c["csf_voxels_dropped"] for k, c in classes.items()} == {
        "caudate": 2062, "lentiform": 0, "thalamus": 369, "corpus_callosum": 999, "internal_capsule": 0,
        "corona_radiata": 3}
    assert set(np.unique(vol.labels)) == set(range(an.NUM_CLASSES))
    assert not np.any((vol.labels > 1) & (vol.tissue == 1)) and np.array_equal(vol.labels > 0, vol.mask)
    # the point of the task: grey nuclei share an intensity band, tracts another, as other brain does
    grey = [classes[c]["intensity_mean"] for c in ("caudate", "lentiform", "thalamus")]
    white = [classes[c]["intensity_mean"] for c in ("corpus_callosum", "internal_capsule", "corona_radiata")]
    assert max(grey) - min(grey) < 0.12 and max(white) - min(white) < 0.08


# -------------------------------------------------------------------------------------------- splits
@needs_atlases
def test_splits_are_disjoint_separated_and_hold_every_class():
    seen = {}
    for split in ("train", "val", "test"):
        data = an.load_anatomy_split(split, copies=0)
        counts = np.bincount(data.labels.ravel(), minlength=an.NUM_CLASSES).tolist()
        assert counts == SPLIT_COUNTS[split], split
        for k in range(an.NUM_CLASSES):
            assert (data.labels == k).any(axis=(1, 2)).any(), (split, an.LABEL_NAMES[k])
        seen[split] = set(data.slice_index.tolist())
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert min(abs(i - j) for i in seen[a] for j in seen[b]) >= 4, (a, b)  # 3 slices between splits


@needs_atlases
def test_images_are_the_tissue_task_images_of_the_same_slices():
    from diffrep.data.brain import load_brain_slices

    data = an.load_anatomy_split("val", copies=0)
    tissue = load_brain_slices(64, slice_range=an.SPLITS["val"])
    assert np.array_equal(tissue.slice_index, data.slice_index)
    np.testing.assert_allclose(data.images, tissue.images, atol=1e-6)
    assert np.array_equal(data.masks, tissue.masks)


@needs_atlases
def test_the_test_set_is_fixed_seeded_deformed_copies():
    base = an.load_anatomy_split("test", copies=0)
    test = an.load_anatomy_split("test")
    assert len(test) == an.DEFORM_COPIES["test"] * len(base) and test.source["deformation"]["seed"] == 10_000
    again = an.load_anatomy_split("test")
    assert np.array_equal(test.images, again.images) and np.array_equal(test.labels, again.labels)
    assert not np.array_equal(test.labels[:len(base)], base.labels)
    check_labels(test.labels, an.NUM_CLASSES)
    assert test.labels.dtype == np.int64 and set(np.unique(test.labels)) <= set(range(an.NUM_CLASSES))


# --------------------------------------------------------------------------------------- deformation
def blob_slices(n: int = 3, size: int = 64) -> BrainSlices:
    """A grey disc 'brain' (label 1) holding a bright off-centre blob labelled 5."""
    yy, xx = np.mgrid[:size, :size]
    brain = (yy - 32) ** 2 + (xx - 32) ** 2 < 26 ** 2
    blob = (yy - 22) ** 2 + (xx - 40) ** 2 < 6 ** 2
    labels = np.where(blob, 5, brain.astype(int)).astype(np.int64)
    images = (0.4 * brain + 0.5 * blob).astype(np.float32)
    return BrainSlices(np.repeat(images[None, None], n, 0), np.repeat(brain[None, None], n, 0),
                       np.repeat(labels[None], n, 0), np.arange(n), np.zeros(n, np.int64))


def test_deformation_moves_a_labelled_blob_with_its_image():
    data = blob_slices()
    out = an.deform_slices(data, copies=2, seed=3)
    assert len(out) == 6 and out.labels.dtype == np.int64 and out.images.dtype == np.float32
    assert set(np.unique(out.labels)) <= {0, 1, 5}
    moved = []
    for image, label in zip(out.images[:, 0], out.labels):
        bright, blob = image > 0.7, label == 5
        assert (bright & blob).sum() / (bright | blob).sum() > 0.8  # the label follows the image
        assert np.array_equal(label > 0, image > 0) or ((label > 0) ^ (image > 0)).mean() < 0.01
        moved.append(np.abs(np.argwhere(blob).mean(0) - np.argwhere(data.labels[0] == 5).mean(0)).max())
    assert max(moved) > 2.0  # a fixed position would not find the blob


def test_deformation_is_determined_by_the_seed():
    data = blob_slices(2)
    a, b, c = (an.deform_slices(data, 2, seed) for seed in (5, 5, 6))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert not np.array_equal(a.labels[0], a.labels[1])  # each slice draws its own deformation
    with pytest.raises(ValueError, match="copies"):
        an.deform_slices(data, 0, 1)

"""Anatomy segmentation on the MNI152 T1: classes that share intensity and differ only by context.

The tissue task of :mod:`diffrep.data.brain` labels voxels by their T1 intensity. Here the classes are
deep grey nuclei (similar grey-matter intensity) and white-matter tracts (similar white-matter
intensity), with everything else in the brain as one "other brain" class, so a pixel's intensity
does not tell its class: its position in the anatomy does.

Atlases (label maps in MNI space, Debian package ``mricron-data``, :data:`TEMPLATES_DIR`):

- AAL (``aal.nii.gz`` + ``aal.nii.txt`` names): Tzourio-Mazoyer et al., "Automated anatomical
  labeling of activations in SPM using a macroscopic anatomical parcellation of the MNI MRI
  single-subject brain", NeuroImage 15:273-289, 2002. Source of caudate, putamen, pallidum, thalamus.
- JHU white-matter labels (``JHU-WhiteMatter-labels-1mm.nii.gz`` + ``.txt``, ICBM-DTI-81): Mori et
  al., "Stereotaxic white matter atlas based on diffusion tensor imaging in an ICBM template",
  NeuroImage 40:570-582, 2008. Source of the corpus callosum, internal capsule, corona radiata.
- Also loadable (not in the class set): Harvard-Oxford cortical max-prob (Desikan et al., NeuroImage
  31:968-980, 2006), AICHA (Joliot et al., J Neurosci Methods 254:46-59, 2015), Brodmann areas.

Target grid: the MNI152 2009a symmetric T1 shipped in nilearn (Fonov et al., NeuroImage 54:313-327,
2011), found by :func:`diffrep.data.brain.find_mni152`; brain mask and tissue labels as in the tissue
task. ``ch2*.nii.gz`` and ``inia19-*.nii.gz`` of the same folder are reserved for independent
evaluation: :func:`load_atlas` refuses them by name.
"""
from __future__ import annotations

import fnmatch
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from scipy import ndimage as ndi

from .augment import augment_batch
from .brain import BrainSlices, derive_brain_mask, find_mni152, normalise_intensities
from .nifti import load_volume
from .slicing import volume_to_slices

PathLike = Union[str, os.PathLike]

TEMPLATES_DIR = Path("/usr/share/mricron/templates")
#: File name patterns of the templates reserved for independent evaluation (never read here).
RESERVED_PATTERNS: tuple[str, ...] = ("ch2*.nii*", "inia19-*.nii*")
#: Atlas name -> (label volume, name table or None).
ATLASES: dict[str, tuple[str, str | None]] = {
    "aal": ("aal.nii.gz", "aal.nii.txt"),
    "jhu": ("JHU-WhiteMatter-labels-1mm.nii.gz", "JHU-WhiteMatter-labels-1mm.nii.txt"),
    "harvard-oxford": ("HarvardOxford-cort-maxprob-thr0-1mm.nii.gz", None),
    "aicha": ("AICHAmc.nii.gz", "AICHAmc.nii.txt"),
    "brodmann": ("brodmann.nii.gz", None),
}
#: mricron-data's JHU 1 mm labels carry an RAS header (x = i - 91 mm) over voxels stored in FSL's
#: radiological order, whose true affine is x = 90 - i mm (the affine of FSL's JHU-ICBM-labels-1mm
#: and of the Harvard-Oxford file beside it). Evidence: under the shipped header every "_R" tract
#: lies at x < 0 and the corpus callosum is centred 1.6 mm left of the symmetric template's midline;
#: under the FSL affine the "_R" tracts lie at x > 0, the callosum within 0.6 mm of the midline and
#: 84% of the tract voxels on white matter instead of 82% (tests pin the first two). Applied only to
#: a header equal to the wrong one.
HEADER_FIXES: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "JHU-WhiteMatter-labels-1mm.nii.gz": (
        np.array([[1.0, 0, 0, -91], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]]),
        np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])),
}

#: The class set: (name, atlas, atlas region names). Left and right are one class. Putamen and
#: pallidum form the lentiform nucleus: the pallidum spans only MNI z -5..+8 mm, too short to appear
#: in three gap-separated axial blocks. Later entries win where atlases overlap (the JHU tracts over
#: AAL's macroscopic nuclei, which reach into the internal capsule).
CLASSES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("caudate", "aal", ("Caudate_L", "Caudate_R")),
    ("lentiform", "aal", ("Putamen_L", "Putamen_R", "Pallidum_L", "Pallidum_R")),
    ("thalamus", "aal", ("Thalamus_L", "Thalamus_R")),
    ("corpus_callosum", "jhu", ("Genu_of_corpus_callosum", "Body_of_corpus_callosum", "Splenium_of_corpus_callosum")),
    ("internal_capsule", "jhu", tuple(f"{part}_of_internal_capsule_{side}" for part in
                                      ("Anterior_limb", "Posterior_limb", "Retrolenticular_part") for side in "RL")),
    ("corona_radiata", "jhu", tuple(f"{part}_corona_radiata_{side}" for part in ("Anterior", "Superior", "Posterior")
                                    for side in "RL")),
)
LABEL_NAMES: tuple[str, ...] = ("background", "other_brain", *(c[0] for c in CLASSES))
NUM_CLASSES = len(LABEL_NAMES)
ORIENTATIONS = {"axial": 2, "coronal": 1}

#: Splits over MNI152 axial indices z (half-open [lo, hi); MNI z mm = index - 72). Only slices
#: through the structures are used (z -13..+42 mm). val (z -1..+3 mm, through the pallidum) and test
#: (z +7..+11 mm: thalamus, internal capsule, genu and splenium) lie where all six structures are
#: cut; train is the rest: below (z -13..-5: lentiform, caudate head, anterior corona radiata) and
#: above (z +15..+42: top of thalamus, lentiform and internal capsule, caudate body, callosal body,
#: corona radiata). 3-slice gaps: the nearest slices of two splits are 4 mm apart, more than a pixel
#: (2.95 mm) of the 64x64 slices. Every class appears in every split (tests pin the pixel counts);
#: train holds few slices of thalamus (6), lentiform (8) and internal capsule (4), the price of
#: blocks. Coronal slices (``load_anatomy_slices(orientation="coronal")``) were considered and not
#: split: all six classes are cut only in y -20..-4 mm (17 slices), where the caudate covers 3..18
#: pixels of a 64x64 slice, too little room for three separated blocks.
SPLITS: dict[str, tuple[tuple[int, int], ...]] = {
    "train": ((59, 68), (87, 115)),
    "val": ((71, 76),),
    "test": ((79, 84),),
}
#: Seeded deformed copies per slice of each split (train unchanged; val and test fixed copies).
DEFORM_COPIES = {"train": 0, "val": 2, "test": 4}
DEFORM_SEEDS = {"train": 0, "val": 20_000, "test": 10_000}


def _reserved(path: Path) -> bool:
    names = {path.name.lower(), Path(os.path.realpath(path)).name.lower()}
    return any(fnmatch.fnmatch(n, p) for n in names for p in RESERVED_PATTERNS)


def atlas_path(name_or_path: PathLike, templates: PathLike | None = None) -> Path:
    """The label volume of an atlas (a key of :data:`ATLASES` or a path); reserved templates are refused.

    Raises PermissionError for ``ch2*`` / ``inia19-*`` (also through a symlink), FileNotFoundError
    when the file is missing (install Debian's ``mricron-data``).
    """
    base = Path(templates) if templates is not None else TEMPLATES_DIR
    path = base / ATLASES[name_or_path][0] if name_or_path in ATLASES else Path(name_or_path)
    if _reserved(path):
        raise PermissionError(f"{path}: reserved for independent evaluation (ch2*, inia19-*); "
                              f"do not train, select or test on it")
    if not path.is_file():
        raise FileNotFoundError(f"atlas not found: {path} (Debian package mricron-data installs "
                                f"{TEMPLATES_DIR}); expected one of {sorted(ATLASES)} or a path")
    return path


def load_atlas(name_or_path: PathLike, templates: PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(integer label volume in file order, affine to MNI mm) of an atlas, with :data:`HEADER_FIXES` applied."""
    path = atlas_path(name_or_path, templates)
    data, affine = load_volume(path, canonical=False)
    fix = HEADER_FIXES.get(path.name)
    if fix is not None and np.allclose(affine, fix[0], atol=1e-3):
        affine = fix[1].copy()
    return np.rint(data).astype(np.int32), affine


def region_names(name: str, templates: PathLike | None = None) -> dict[str, int]:
    """Region name -> label value from an atlas's name table (``index name [code]`` lines, CRLF or LF)."""
    table = ATLASES[name][1]
    if table is None:
        raise ValueError(f"atlas {name!r} ships no name table")
    path = atlas_path(name, templates).with_name(table)
    names = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[parts[1]] = int(parts[0])
    return names


def resample_labels(labels: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target_affine: np.ndarray,
                    ) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume onto a target grid through the two affines.

    Target voxel v takes the label of the atlas voxel nearest to inv(affine) @ target_affine @ v
    (0 outside the atlas); orientation and flips are handled by the affines alone.
    """
    mapping = np.linalg.inv(affine) @ target_affine
    out = ndi.affine_transform(np.asarray(labels, np.int32), mapping[:3, :3], offset=mapping[:3, 3],
                               output_shape=tuple(shape), order=0, mode="constant", cval=0)
    return out.astype(np.int32)


@dataclass(frozen=True)
class AnatomyVolume:
    """The MNI152 T1 with anatomy labels: ``t1`` normalised to [0, 1] (0 outside), ``mask`` (bool),
    ``labels`` (uint8 in 0..NUM_CLASSES-1), ``tissue`` (0 bg, 1 CSF, 2 GM, 3 WM), ``affine`` (RAS)
    and ``report`` (orientation and overlap checks, :func:`label_report`)."""

    t1: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray
    report: dict[str, Any]


def class_volume(mask: np.ndarray, tissue: np.ndarray, atlases: dict[str, np.ndarray],
                 names: dict[str, dict[str, int]]) -> tuple[np.ndarray, dict[str, int]]:
    """(labels uint8, CSF voxels dropped per class): background 0, other brain 1, then :data:`CLASSES`.

    A class voxel must lie in the brain mask and not on CSF of the MNI152 tissue labels (AAL's caudate
    and JHU's callosum reach into the template's larger ventricles); dropped voxels are other brain.
    """
    labels = mask.astype(np.uint8)
    dropped = {}
    for k, (cls, atlas, regions) in enumerate(CLASSES, start=2):
        missing = [r for r in regions if r not in names[atlas]]
        if missing:
            raise ValueError(f"{atlas} name table: expected regions {missing} for class {cls!r}")
        region = np.isin(atlases[atlas], [names[atlas][r] for r in regions]) & mask
        dropped[cls] = int((region & (tissue == 1)).sum())
        labels[region & (tissue != 1)] = k
    return labels, dropped


def label_report(affine: np.ndarray, mask: np.ndarray, t1: np.ndarray, tissue: np.ndarray,
                 atlases: dict[str, np.ndarray], names: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Orientation and overlap checks of the resampled atlases on the MNI152 grid.

    Per atlas: mean world x (mm) of the regions named ``*_L`` and ``*_R`` (left must be < 0 < right)
    and the fraction of its labelled voxels inside the brain mask. Per class: atlas voxels, fraction
    inside the mask, CSF voxels dropped, tissue fractions and mean +- std normalised T1 intensity.
    """
    x_mm = affine[0, 0] * np.arange(mask.shape[0]) + affine[0, 3]
    out: dict[str, Any] = {"atlases": {}, "classes": {}}
    for atlas, data in atlases.items():
        side = {}
        for s in "LR":
            ids = [v for n, v in names[atlas].items() if n.endswith(f"_{s}")]
            side[s] = float(x_mm[np.nonzero(np.isin(data, ids))[0]].mean())
        out["atlases"][atlas] = {"file": ATLASES[atlas][0], "mean_x_mm_left": side["L"], "mean_x_mm_right": side["R"],
                                 "labelled_voxels": int((data > 0).sum()),
                                 "fraction_in_brain_mask": float(mask[data > 0].mean())}
    for cls, atlas, regions in CLASSES:
        region = np.isin(atlases[atlas], [names[atlas][r] for r in regions])
        kept = region & mask & (tissue != 1)
        out["classes"][cls] = {
            "atlas_voxels": int(region.sum()), "fraction_in_brain_mask": float(mask[region].mean()),
            "csf_voxels_dropped": int((region & mask & (tissue == 1)).sum()),
            "tissue_fractions": {t: float((tissue[region] == v).mean()) for v, t in ((1, "csf"), (2, "gm"), (3, "wm"))},
            "intensity_mean": float(t1[kept].mean()), "intensity_std": float(t1[kept].std())}
    return out


@functools.lru_cache(maxsize=2)
def _build(templates: str) -> AnatomyVolume:
    from .brain import _tissue_map

    mni = find_mni152()
    t1, affine = load_volume(mni["t1"])
    mask, tissue = derive_brain_mask(t1, _tissue_map(mni["gm"]), _tissue_map(mni["wm"]), str(mni["t1"]))
    norm, _, _ = normalise_intensities(t1, mask, str(mni["t1"]))
    atlases, names = {}, {}
    for atlas in sorted({c[1] for c in CLASSES}):
        data, atlas_affine = load_atlas(atlas, templates)
        atlases[atlas] = resample_labels(data, atlas_affine, t1.shape, affine)
        names[atlas] = region_names(atlas, templates)
    labels, _ = class_volume(mask, tissue, atlases, names)
    report = label_report(affine, mask, norm, tissue, atlases, names)
    for arr in (norm, mask, labels, tissue):
        arr.flags.writeable = False
    return AnatomyVolume(norm, mask, labels, tissue, affine, report)


def anatomy_volume(templates: PathLike | None = None) -> AnatomyVolume:
    """The MNI152 T1 with the anatomy labels resampled onto its grid (cached; arrays read-only)."""
    return _build(str(Path(templates) if templates is not None else TEMPLATES_DIR))


def anatomy_deformation(seed: int, rotate: float = 0.2, scale: float = 0.1, translate: float = 5.0,
                        elastic: tuple[float, float] = (1.0, 2.0)) -> Any:
    """A seeded MONAI ``Compose`` deforming image, mask and label jointly (bilinear / nearest / nearest).

    RandAffined always fires: rotation +-``rotate`` rad, isotropic-ish scale +-``scale``, translation
    +-``translate`` px; then Rand2DElasticd always fires: B-spline displacement on a 16 px control grid
    of magnitude ``elastic``. Zero padding. Apply with :func:`diffrep.data.augment.augment_batch`.
    """
    from monai.transforms import Compose, Rand2DElasticd, RandAffined

    keys, modes = ("image", "mask", "label"), ("bilinear", "nearest", "nearest")
    transform = Compose([
        RandAffined(keys=keys, prob=1.0, rotate_range=rotate, scale_range=scale, translate_range=translate,
                    mode=modes, padding_mode="zeros"),
        Rand2DElasticd(keys=keys, prob=1.0, spacing=(16, 16), magnitude_range=elastic, mode=modes,
                       padding_mode="zeros"),
    ])
    transform.set_random_state(seed=seed)
    return transform


def deform_slices(data: BrainSlices, copies: int, seed: int) -> BrainSlices:
    """``copies`` deformed versions of every slice (copy c uses :func:`anatomy_deformation` (seed + c));
    the originals are not included. Slice order: copy-major."""
    if copies < 1:
        raise ValueError(f"copies: expected >= 1, got {copies}")
    parts = [augment_batch(anatomy_deformation(seed + c), data.images, data.masks, data.labels) for c in range(copies)]
    images, masks, labels = (torch.cat([p[i] for p in parts]).numpy() for i in range(3))
    source = {**data.source, "deformation": {"copies": copies, "seed": seed}}
    return BrainSlices(images, masks, labels, np.tile(data.slice_index, copies), np.tile(data.volume_id, copies),
                       source)


def load_anatomy_slices(ranges: tuple[tuple[int, int], ...] | None = None, size: int = 64,
                        orientation: str = "axial", templates: PathLike | None = None) -> BrainSlices:
    """Slices (image, mask, anatomy labels) of the MNI152 T1 along ``orientation``, resized to ``size``.

    Images, crop and brain mask are exactly those of the tissue task (:func:`diffrep.data.brain.slice_brain`:
    percentile normalisation, one square crop around the brain, antialiased bilinear resize, the mask
    from the 4-class tissue vote); labels by the majority vote of :mod:`diffrep.data.slicing` over the
    anatomy classes, then 0 outside that mask and at least 1 (other brain) inside it.
    ``ranges``: (lo, hi) half-open slice indices along the axis to keep (None: every slice with brain).
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation: expected one of {sorted(ORIENTATIONS)}, got {orientation!r}")
    vol, axis = anatomy_volume(templates), ORIENTATIONS[orientation]
    images, tissue, _ = volume_to_slices(vol.t1, vol.mask, axis, size, labels=vol.tissue, num_classes=4)
    _, labels, _ = volume_to_slices(vol.t1, vol.mask, axis, size, labels=vol.labels, num_classes=NUM_CLASSES)
    brain = tissue > 0  # the tissue task's mask (its 4-class vote), so images equal that task's exactly
    labels = np.where(brain, np.maximum(labels, 1), 0)
    images = (np.clip(images, 0.0, 1.0) * brain[:, None]).astype(np.float32)
    index = np.arange(len(images))
    keep = (labels > 0).any(axis=(1, 2))
    if ranges is not None:
        keep &= np.any([(index >= lo) & (index < hi) for lo, hi in ranges], axis=0)
    source = {"task": "anatomy", "label_names": LABEL_NAMES, "orientation": orientation, "size": size,
              "atlases": {a: ATLASES[a][0] for a in sorted({c[1] for c in CLASSES})}}
    return BrainSlices(images[keep], (labels[keep] > 0)[:, None], labels[keep], index[keep],
                       np.zeros(int(keep.sum()), np.int64), source)


def load_anatomy_split(split: str, size: int = 64, copies: int | None = None, seed: int | None = None,
                       templates: PathLike | None = None) -> BrainSlices:
    """The axial ``train`` / ``val`` / ``test`` slices of :data:`SPLITS`, deformed as :data:`DEFORM_COPIES`
    and :data:`DEFORM_SEEDS` say (``copies`` / ``seed`` override; 0 copies: the undeformed slices)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
    data = load_anatomy_slices(SPLITS[split], size, "axial", templates)
    data.source["split"] = split
    copies = DEFORM_COPIES[split] if copies is None else copies
    if copies:
        data = deform_slices(data, copies, DEFORM_SEEDS[split] if seed is None else seed)
    return data

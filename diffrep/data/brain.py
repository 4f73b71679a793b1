"""Brain MRI axial slices (image, brain mask, tissue labels) from NIfTI volumes, MNI152 by default.

Slices are 2D arrays with rows running anterior -> posterior and columns running subject
left -> right (RAS volume ``vol[:, ::-1, z].T``), so ``imshow`` shows a conventional axial view.
Label classes: 0 background, 1 CSF, 2 grey matter, 3 white matter.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from scipy import ndimage as ndi

from .augment import augment_batch, brain_augmentation  # noqa: F401  (public re-export)
from .nifti import load_volume  # noqa: F401  (public re-export)
from .slicing import SliceGeometry, volume_to_slices

LABEL_NAMES: tuple[str, ...] = ("background", "csf", "gm", "wm")
NUM_CLASSES = len(LABEL_NAMES)

MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Fixed split over MNI152 axial indices z (half-open [lo, hi); MNI z mm = index - 72).
#: test: a block through the bodies of the lateral ventricles (z 82..101, MNI +10..+29 mm);
#: val: the block below it (basal ganglia, third ventricle, frontal horns; z 64..77);
#: train: everything else. 4-slice gaps (4 mm) separate the blocks so that no split holds a
#: near-copy of a neighbouring split's slice.
SPLITS: dict[str, tuple[tuple[int, int], ...]] = {
    "train": ((0, 60), (106, 189)),
    "val": ((64, 78),),
    "test": ((82, 102),),
}

PathLike = Union[str, os.PathLike]
VolumeSpec = Union[PathLike, Mapping[str, PathLike]]
SliceRange = Union[tuple[int, int], Sequence[tuple[int, int]]]


@dataclass
class BrainSlices:
    """A stack of 2D axial brain slices with aligned masks and tissue labels.

    images float32 (N, 1, S, S) in [0, 1] (0 outside the mask); masks bool (N, 1, S, S);
    labels int64 (N, S, S) in {0 background, 1 CSF, 2 GM, 3 WM}; slice_index int64 (N,) = z in
    the source volume; volume_id int64 (N,) = position of the volume in ``source["volumes"]``.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    slice_index: np.ndarray
    volume_id: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images: expected shape (N, 1, S, S), got {self.images.shape}")
        expected = {"masks": (n, *self.images.shape[1:]), "labels": (n, *self.images.shape[2:]),
                    "slice_index": (n,), "volume_id": (n,)}
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"{name}: expected shape {shape} to match images, got {got}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "BrainSlices":
        """A new BrainSlices holding copies of the selected slices (indices or a boolean mask)."""
        idx = np.asarray(indices)
        return BrainSlices(self.images[idx].copy(), self.masks[idx].copy(), self.labels[idx].copy(),
                           self.slice_index[idx].copy(), self.volume_id[idx].copy(), dict(self.source))

    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images float32, masks bool, labels int64) as torch tensors (copies)."""
        return (torch.from_numpy(self.images.copy()), torch.from_numpy(self.masks.copy()),
                torch.from_numpy(self.labels.copy()))


def check_labels(labels: np.ndarray | torch.Tensor, num_classes: int = NUM_CLASSES) -> None:
    """Raise unless ``labels`` is an integer array with every value in 0..num_classes-1 (any shape;
    ``errors.check_label_range``)."""
    from ..errors import check_label_range

    check_label_range(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels, num_classes)


def find_mni152() -> dict[str, Path]:
    """Paths of the MNI152 2009a T1, GM and WM volumes shipped inside the installed nilearn package."""
    from importlib import resources

    try:
        base = resources.files("nilearn") / "datasets" / "data"
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("find_mni152 needs nilearn (it ships the MNI152 template): pip install nilearn") from exc
    paths = {key: Path(str(base / name)) for key, name in MNI152_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNI152 files expected inside nilearn are missing: {missing}; reinstall nilearn")
    return paths


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def _tissue_map(path: PathLike) -> np.ndarray:
    prob, _ = load_volume(path)
    if prob.max() > 1.0 + 1e-3:  # MNI152 maps are stored as uint8 0..255
        prob = prob / 255.0
    return np.clip(prob, 0.0, 1.0)


def derive_brain_mask(t1: np.ndarray, gm: np.ndarray | None = None, wm: np.ndarray | None = None,
                      name: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """Brain mask (bool) and tissue labels (uint8, 0 outside the mask) of a RAS T1 volume.

    The recipe (with GM/WM probability maps, or from the T1 alone) is documented in
    :func:`load_brain_slices`; ``name`` is the file the errors name.
    """
    if gm is not None and wm is not None:
        if gm.shape != t1.shape or wm.shape != t1.shape:
            raise ValueError(f"{name}: expected GM/WM maps of the T1 shape {t1.shape}, got {gm.shape} and {wm.shape}")
        tissue = ndi.binary_dilation((gm + wm) > 0.1, iterations=2)
        mask = (t1 > 0.02 * float(t1.max())) & tissue
        mask = ndi.binary_fill_holes(_largest_component(mask)) if mask.any() else mask
        csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
        labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    else:
        from skimage.filters import threshold_multiotsu, threshold_otsu

        mask = t1 > threshold_otsu(t1) if np.ptp(t1) > 0 else np.zeros(t1.shape, bool)
        if mask.any():
            mask = ndi.binary_fill_holes(ndi.binary_closing(_largest_component(mask), iterations=2))
        labels = np.ones(t1.shape, np.uint8)
        if mask.sum() > 27:
            thr = threshold_multiotsu(t1[mask], classes=3)
            labels = (np.digitize(t1, thr) + 1).astype(np.uint8)
    if not mask.any():
        raise ValueError(f"{name}: expected a non-empty brain mask, got an empty one (check the volume's intensities)")
    labels[~mask] = 0
    return mask, labels


def normalise_intensities(t1: np.ndarray, mask: np.ndarray, name: str = "volume") -> tuple[np.ndarray, float, float]:
    """(normalised volume, lo, hi): the 1st..99th percentile of ``t1`` inside ``mask`` mapped to 0..1, clipped, 0 outside."""
    lo, hi = np.percentile(t1[mask], [1.0, 99.0])
    if hi <= lo:
        raise ValueError(f"{name}: expected varying intensities inside the brain mask, got 1st..99th percentile {lo}..{hi}")
    norm = np.clip((t1 - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    norm[~mask] = 0.0
    return norm, float(lo), float(hi)


def slice_brain(t1: np.ndarray, mask: np.ndarray, size: int, labels: np.ndarray | None = None,
                name: str = "volume") -> tuple[np.ndarray, np.ndarray, SliceGeometry, tuple[float, float]]:
    """Axial training-style slices of a RAS T1 volume: (images, label slices, geometry, (lo, hi)).

    Intensities normalised as :func:`normalise_intensities`, cut and resized by
    :func:`diffrep.data.slicing.volume_to_slices` (images bilinear, ``labels`` (0..3) or else the
    mask (0/1) by majority vote); images are clipped to [0, 1] and 0 where the resized label is 0.
    The geometry takes slice maps back onto the volume (:func:`diffrep.data.slicing.slices_to_volume`).
    """
    norm, lo, hi = normalise_intensities(t1, mask, name)
    num_classes = 2 if labels is None else NUM_CLASSES
    images, lab, geometry = volume_to_slices(norm, mask, axis=2, size=size, labels=labels, num_classes=num_classes)
    images = np.clip(images, 0.0, 1.0) * (lab > 0)[:, None]
    return images.astype(np.float32), lab, geometry, (lo, hi)


@functools.lru_cache(maxsize=8)
def _process_volume(t1_path: str, gm_path: str | None, wm_path: str | None, size: int,
                    stamp: tuple) -> dict[str, np.ndarray]:
    t1, _ = load_volume(t1_path)
    gm = _tissue_map(gm_path) if gm_path else None
    wm = _tissue_map(wm_path) if wm_path else None
    mask, labels = derive_brain_mask(t1, gm, wm, t1_path)
    images, lab, geometry, (lo, hi) = slice_brain(t1, mask, size, labels, t1_path)
    msk = lab > 0
    result = {"images": images, "masks": msk[:, None], "labels": lab,
              "fraction": msk.mean(axis=(1, 2)), "percentiles": np.array([lo, hi]), "box": np.array(geometry.box)}
    for arr in result.values():
        arr.flags.writeable = False
    return result


def _volume_specs(volumes: VolumeSpec | Sequence[VolumeSpec] | None) -> list[dict[str, Path | None]]:
    if volumes is None:
        mni = find_mni152()
        return [{"t1": mni["t1"], "gm": mni["gm"], "wm": mni["wm"]}]
    if isinstance(volumes, (str, os.PathLike)) and Path(volumes).is_dir():
        files = sorted(p for p in Path(volumes).iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if not files:
            raise FileNotFoundError(f"{volumes}: expected a folder of .nii/.nii.gz T1 volumes, found none")
        volumes = files
    elif isinstance(volumes, (str, os.PathLike, Mapping)):
        volumes = [volumes]
    specs = []
    for v in volumes:
        if isinstance(v, Mapping):
            unknown = set(v) - {"t1", "gm", "wm"}
            if "t1" not in v or unknown or (("gm" in v) != ("wm" in v)):
                raise ValueError(f"volume spec: expected keys 't1' and optionally both 'gm' and 'wm', got {sorted(v)}")
            specs.append({k: (Path(v[k]) if k in v else None) for k in ("t1", "gm", "wm")})
        else:
            specs.append({"t1": Path(v), "gm": None, "wm": None})
    return specs


def _ranges(slice_range: SliceRange | None) -> list[tuple[int, int]] | None:
    if slice_range is None:
        return None
    items = [slice_range] if len(slice_range) == 2 and all(isinstance(x, (int, np.integer)) for x in slice_range) \
        else list(slice_range)
    out = []
    for r in items:
        if len(r) != 2 or not int(r[0]) < int(r[1]):
            raise ValueError(f"slice_range: expected (lo, hi) pairs with lo < hi, got {r}")
        out.append((int(r[0]), int(r[1])))
    return out


def load_brain_slices(size: int = 64, volumes: VolumeSpec | Sequence[VolumeSpec] | None = None,
                      slice_range: SliceRange | None = None, min_brain_fraction: float = 0.05) -> BrainSlices:
    """Axial slices (image, mask, labels) of one or more T1 volumes, resized to ``size x size``.

    ``volumes``: None (MNI152 T1 + GM + WM from nilearn), a folder of ``.nii``/``.nii.gz`` T1 files,
    one path, or a list of paths / mappings ``{"t1": ..., "gm": ..., "wm": ...}``.

    Mask and labels. With GM/WM probability maps (MNI152): mask = largest connected component of
    ``(T1 > 2% of max) & dilate((GM + WM) > 0.1, 2 voxels)``, holes filled (ventricles included);
    inside it each voxel gets the argmax of (CSF = 1 - GM - WM, GM, WM) as label 1/2/3. With a T1
    alone: mask = Otsu threshold, largest component, closing, hole filling (a head mask if the
    volume is not skull-stripped), labels from 3-class multi-Otsu on intensities inside the mask
    (dark = CSF, mid = GM, bright = WM): a crude estimate.

    Geometry (:mod:`diffrep.data.slicing`, shared with volume scoring): axial slices along z of the
    RAS-reoriented volume; every slice of a volume is cut to the same square around the brain's
    bounding box (+4 voxel margin, zero padding), then resized (image: antialiased bilinear; labels:
    the one rule for label maps, antialiased one-hot then argmax, a majority vote; mask = label > 0). Intensities: the 1st..99th percentile of T1 inside the mask maps to 0..1, clipped,
    0 outside the mask. Slices are kept when the mask covers >= ``min_brain_fraction`` of the
    resized slice and z lies in ``slice_range`` ((lo, hi) half-open, or a list of them).
    Results are cached per volume file and size; returned arrays are fresh copies.
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size: expected an int >= 8, got {size!r}")
    if not 0.0 <= min_brain_fraction < 1.0:
        raise ValueError(f"min_brain_fraction: expected a value in [0, 1), got {min_brain_fraction}")
    ranges = _ranges(slice_range)
    specs = _volume_specs(volumes)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "masks", "labels", "slice_index", "volume_id")}
    meta: dict[str, Any] = {"volumes": [], "percentiles": [], "crop_boxes": [],
                            "label_method": [], "label_names": LABEL_NAMES, "size": size}
    for vid, spec in enumerate(specs):
        for p in spec.values():
            if p is not None and not p.is_file():
                raise FileNotFoundError(f"NIfTI volume not found: {p}")
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in spec.values() if p is not None)
        res = _process_volume(str(spec["t1"]), str(spec["gm"]) if spec["gm"] else None,
                              str(spec["wm"]) if spec["wm"] else None, size, stamp)
        z = np.arange(len(res["images"]))
        keep = res["fraction"] >= max(min_brain_fraction, 1e-9)
        if ranges is not None:
            keep &= np.any([(z >= lo) & (z < hi) for lo, hi in ranges], axis=0)
        for key in ("images", "masks", "labels"):
            parts[key].append(res[key][keep])
        parts["slice_index"].append(z[keep])
        parts["volume_id"].append(np.full(int(keep.sum()), vid, np.int64))
        meta["volumes"].append({k: (str(v) if v else None) for k, v in spec.items()})
        meta["percentiles"].append(tuple(float(x) for x in res["percentiles"]))
        meta["crop_boxes"].append(tuple(int(x) for x in res["box"]))
        meta["label_method"].append("tissue_maps" if spec["gm"] else "multiotsu")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if len(out["images"]) == 0:
        raise ValueError(f"expected at least one slice with brain fraction >= {min_brain_fraction} in slice_range "
                         f"{ranges}, got none (volumes: {[v['t1'] for v in meta['volumes']]})")
    return BrainSlices(out["images"], out["masks"], out["labels"], out["slice_index"].astype(np.int64),
                       out["volume_id"], meta)


def load_brain_split(split: str, size: int = 64, volumes: VolumeSpec | Sequence[VolumeSpec] | None = None,
                     min_brain_fraction: float = 0.05) -> BrainSlices:
    """The ``train``/``val``/``test`` slices of :data:`SPLITS` (z ranges in MNI152 index space).

    Meant for MNI152 (the default) or volumes registered to it with the same grid.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
    slices = load_brain_slices(size, volumes, SPLITS[split], min_brain_fraction)
    slices.source["split"] = split
    return slices

"""Score a whole 3D NIfTI volume slice by slice and write an anomaly-map NIfTI on the input's grid.

Slices are made exactly as the brain training data were (diffrep.data.brain): RAS reorientation,
1st..99th percentile of the intensities inside the brain mask -> [0, 1] (clipped, 0 outside), one
square crop around the brain for the whole volume (+4 voxel margin), antialiased bilinear resizing
to ``size x size``. Each slice's map is resized back, un-cropped, zeroed outside the brain mask and
reoriented to the input's voxel order, so the output has the input's shape, affine and header.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._atomic import atomic_path
from ..errors import check_positive_int
from ..data.brain import _crop_box, _derive, _slices
from .base import AnomalyScorer


def _load(path: Path, what: str) -> tuple[Any, np.ndarray]:
    """A NIfTI image and its voxels as float32 (X, Y, Z); an unreadable, truncated or non-3D file names the file."""
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError and friends
        raise ValueError(f"{path}: expected a readable NIfTI {what}, got an error from nibabel: {exc}") from exc
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D {what} (X, Y, Z), got shape {tuple(img.shape)}")
    try:  # nibabel reads the header eagerly and the voxels lazily: a cut .nii.gz fails only here
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:  # EOFError, zlib.error, OSError ("Expected N bytes, got M")
        raise ValueError(f"{path}: expected a complete NIfTI {what}, its voxel data could not be read (truncated or "
                         f"corrupt file?): {type(exc).__name__}: {exc}") from exc
    return img, data


def check_volume_paths(nifti_path: str | os.PathLike, out_path: str | os.PathLike,
                       mask_path: str | os.PathLike | None = None, *, overwrite: bool = False,
                       option: str = "out_path") -> None:
    """Refuse, before any work, an output that is not .nii/.nii.gz, is the input scan or the mask (also
    through a symlink or another spelling of the path), or already exists (unless ``overwrite``)."""
    from ..outputs import check_output_file

    out_path = Path(out_path)
    if not out_path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{option}: expected a .nii or .nii.gz file name, got {out_path.name!r}")
    check_output_file(out_path, {"input scan": nifti_path, "mask": mask_path}, overwrite=overwrite, option=option)
    for what, path in (("volume", nifti_path), ("mask", mask_path)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} not found: {path}")


def _read_inputs(nifti_path: Path, mask_path: Path | None) -> tuple[Any, np.ndarray, np.ndarray]:
    """(image, RAS volume, RAS brain mask) of a validated volume and mask."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    img, data = _load(nifti_path, "volume")
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise ValueError(f"{nifti_path}: expected finite intensities, got {bad} NaN/Inf voxel(s)")
    if not np.any(data):
        raise ValueError(f"{nifti_path}: expected a non-empty volume, got all-zero intensities")
    to_ras = ornt_transform(io_orientation(img.affine), axcodes2ornt(("R", "A", "S")))
    vol = apply_orientation(data, to_ras).astype(np.float32)
    if mask_path is None:
        mask, _ = _derive(vol, None, None, str(nifti_path))
        return img, vol, mask
    mask_img, mask_data = _load(mask_path, "mask")
    if mask_data.shape != data.shape:
        raise ValueError(f"{mask_path}: expected a mask of the volume's shape {data.shape}, got {mask_data.shape}")
    if not np.allclose(mask_img.affine, img.affine, rtol=0.0, atol=1e-3):
        raise ValueError(f"{mask_path}: expected a mask on the grid of {nifti_path} (affine "
                         f"{np.round(img.affine, 3).tolist()}), got affine {np.round(mask_img.affine, 3).tolist()}")
    mask = apply_orientation(np.nan_to_num(mask_data) != 0, to_ras).astype(bool)
    if not mask.any():
        raise ValueError(f"{mask_path}: expected a non-empty brain mask, got an all-zero mask")
    return img, vol, mask


def _unslices(maps: np.ndarray, box: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of brain._slices: (Z, side, side) slice maps -> (X, Y, Z) RAS volume (0 outside the box)."""
    r0, c0, side = box
    stack = np.zeros((shape[2], shape[1], shape[0]), np.float32)
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + side, stack.shape[1]), min(c0 + side, stack.shape[2])
    stack[:, rs:re, cs:ce] = maps[:, rs - r0:re - r0, cs - c0:ce - c0]
    return np.transpose(stack, (2, 1, 0))[:, ::-1, :]


def score_volume(scorer: AnomalyScorer, nifti_path: str | os.PathLike, out_path: str | os.PathLike,
                 mask_path: str | os.PathLike | None = None, size: int = 64, batch_size: int = 16,
                 progress: bool = True, overwrite: bool = False) -> Path:
    """Score every axial slice of a 3D NIfTI with a (fitted) scorer; write the anomaly map as NIfTI.

    Args:
        scorer: any AnomalyScorer (ReconstructionScorer, DAEScorer, ...), ready to ``score``.
        nifti_path: the input volume (.nii/.nii.gz), 3D (a trailing singleton 4th axis is accepted).
        out_path: where the float32 map goes (.nii/.nii.gz); written to a temporary name and renamed.
            Never the input scan or the mask; an existing file is replaced only with ``overwrite``.
        mask_path: a brain mask on the same grid (nonzero = brain). Without one, a mask is derived as
            for the training data: Otsu threshold, largest component, closing, hole filling.
        size: slice size the scorer's backbone was trained on. batch_size: slices per ``score`` call.
        progress: show a tqdm progress bar.
        overwrite: replace an existing ``out_path`` (it is refused otherwise).

    Returns the output path. Raises ValueError for an output that is an input, an unreadable or
    truncated file, a non-3D volume, NaN/Inf voxels, an all-zero volume, a mask on another grid
    (shape or affine), or a map with NaN/Inf values (nothing is written then); FileExistsError for
    an existing output without ``overwrite``.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    nifti_path, out_path = Path(nifti_path), Path(out_path)
    mask_path = Path(mask_path) if mask_path is not None else None
    check_volume_paths(nifti_path, out_path, mask_path, overwrite=overwrite)
    check_positive_int(size, "size", minimum=8)
    img, vol, mask = _read_inputs(nifti_path, mask_path)
    lo, hi = np.percentile(vol[mask], [1.0, 99.0])
    if hi <= lo:
        raise ValueError(f"{nifti_path}: expected varying intensities inside the brain mask, got 1st..99th "
                         f"percentile {lo}..{hi}")
    norm = np.clip((vol - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    norm[~mask] = 0.0
    box = _crop_box(mask)
    maps = _score_slices(scorer, norm, mask, box, size, batch_size, nifti_path, progress)

    side = box[2]
    back = F.interpolate(torch.from_numpy(maps).unsqueeze(1), size=(side, side), mode="bilinear",
                         antialias=True, align_corners=False)[:, 0].numpy()
    ras_map = _unslices(back, box, vol.shape) * mask
    out = apply_orientation(ras_map, ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(img.affine)))
    return _write_map(np.ascontiguousarray(out, dtype=np.float32).reshape(img.shape), img, out_path)


def _score_slices(scorer: AnomalyScorer, norm: np.ndarray, mask: np.ndarray, box: tuple[int, int, int], size: int,
                  batch_size: int, nifti_path: Path, progress: bool) -> np.ndarray:
    """Anomaly maps (Z, size, size) of the cropped, resized axial slices; refuses NaN/Inf maps."""
    from tqdm.auto import tqdm

    resize = dict(size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = F.interpolate(torch.from_numpy(_slices(norm, box).copy()).unsqueeze(1), **resize)
    masks = F.interpolate(torch.from_numpy(_slices(mask.astype(np.float32), box).copy()).unsqueeze(1), **resize) > 0.5
    images = images.clamp(0.0, 1.0) * masks

    maps = np.zeros((images.shape[0], size, size), np.float32)
    todo = np.flatnonzero(masks.flatten(1).any(dim=1).numpy())  # slices without brain keep a zero map
    for start in tqdm(range(0, len(todo), batch_size), desc=f"scoring {nifti_path.name}", unit="batch",
                      disable=not progress):
        index = todo[start:start + batch_size]
        batch = np.asarray(scorer.score(images[index], masks[index]).maps, dtype=np.float32)
        bad = ~np.isfinite(batch)
        if bad.any():
            slices = sorted({int(index[i]) for i in np.flatnonzero(bad.reshape(len(index), -1).any(axis=1))})
            raise ValueError(f"{nifti_path}: expected a finite anomaly map, got {int(bad.sum())} NaN/Inf value(s) in "
                             f"slice(s) {slices[:10]} (check the backbone's weights and the scorer's settings); "
                             "no map was written")
        maps[index] = batch
    return maps


def _write_map(out: np.ndarray, img: Any, out_path: Path) -> Path:
    """Write ``out`` as float32 NIfTI with ``img``'s affine and header, atomically (temporary name, rename)."""
    import nibabel as nib

    header = img.header.copy()
    header.set_data_dtype(np.float32)
    if hasattr(header, "set_slope_inter"):
        header.set_slope_inter(1.0, 0.0)
    klass = img.__class__ if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
    result = klass(out, img.affine, header=header)
    result.header["cal_min"], result.header["cal_max"] = 0.0, float(out.max())
    with atomic_path(out_path, suffix=".tmp" + "".join(out_path.suffixes[-2:])) as tmp:  # nibabel reads the suffix
        nib.save(result, tmp)
    return out_path

"""Score a whole 3D NIfTI volume slice by slice and write an anomaly-map NIfTI on the input's grid.

Slices are made exactly as the brain training data were, by the same code: the NIfTI is read by
:func:`diffrep.data.nifti.read_nifti` (RAS), sliced by :func:`diffrep.data.brain.slice_brain` (1st..99th
percentile inside the brain mask -> [0, 1], one square crop around the brain, images resized
bilinearly, the mask by majority vote). Each slice's map goes back through
:func:`diffrep.data.slicing.slices_to_volume`, is zeroed outside the brain mask and reoriented to the
input's voxel order, so the output has the input's shape, affine and header. A scorer on a 3D
backbone scores the whole volume at once through sliding windows instead (:func:`score_volume_3d`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_path
from ..data.brain import derive_brain_mask, slice_brain
from ..data.nifti import NiftiVolume, read_nifti
from ..data.slicing import slices_to_volume
from ..errors import check_positive_int
from .base import AnomalyScorer


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


def _read_inputs(nifti_path: Path, mask_path: Path | None) -> tuple[NiftiVolume, np.ndarray]:
    """(volume, RAS brain mask) of a validated volume and mask."""
    volume = read_nifti(nifti_path, "volume")
    if not np.any(volume.data):
        raise ValueError(f"{nifti_path}: expected a non-empty volume, got all-zero intensities")
    if mask_path is None:
        mask, _ = derive_brain_mask(volume.data, None, None, str(nifti_path))
        return volume, mask
    mask_img = read_nifti(mask_path, "mask", finite=False)
    if mask_img.image.shape[:3] != volume.image.shape[:3]:
        raise ValueError(f"{mask_path}: expected a mask of the volume's shape {volume.image.shape[:3]}, got "
                         f"{mask_img.image.shape[:3]}")
    if not np.allclose(mask_img.image.affine, volume.image.affine, rtol=0.0, atol=1e-3):
        raise ValueError(f"{mask_path}: expected a mask on the grid of {nifti_path} (affine "
                         f"{np.round(volume.image.affine, 3).tolist()}), got affine "
                         f"{np.round(mask_img.image.affine, 3).tolist()}")
    mask = np.nan_to_num(mask_img.data) != 0
    if not mask.any():
        raise ValueError(f"{mask_path}: expected a non-empty brain mask, got an all-zero mask")
    return volume, mask


def score_volume(scorer: AnomalyScorer, nifti_path: str | os.PathLike, out_path: str | os.PathLike,
                 mask_path: str | os.PathLike | None = None, size: int = 64, batch_size: int = 16,
                 progress: bool = True, overwrite: bool = False) -> Path:
    """Score every axial slice of a 3D NIfTI with a (fitted) scorer; write the anomaly map as NIfTI.

    A scorer on a 3D backbone scores the whole volume instead (:func:`score_volume_3d`, default windows).

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
    if getattr(getattr(scorer, "backbone", None), "spatial_dims", 2) == 3:  # a 3D U-Net: the whole volume
        return score_volume_3d(scorer, nifti_path, out_path, mask_path, progress=progress, overwrite=overwrite)
    nifti_path, out_path = Path(nifti_path), Path(out_path)
    mask_path = Path(mask_path) if mask_path is not None else None
    check_volume_paths(nifti_path, out_path, mask_path, overwrite=overwrite)
    check_positive_int(size, "size", minimum=8)
    volume, mask = _read_inputs(nifti_path, mask_path)
    images, labels, geometry, _ = slice_brain(volume.data, mask, size, name=str(nifti_path))
    maps = _score_slices(scorer, images, labels > 0, batch_size, nifti_path, progress)
    ras_map = slices_to_volume(maps, geometry) * mask
    return _write_map(volume.from_ras(ras_map).astype(np.float32), volume.image, out_path)


def _score_slices(scorer: AnomalyScorer, images: np.ndarray, masks: np.ndarray, batch_size: int, nifti_path: Path,
                  progress: bool) -> np.ndarray:
    """Anomaly maps (Z, size, size) of the slices (Z, 1, size, size) with masks (Z, size, size); refuses NaN/Inf maps."""
    from tqdm.auto import tqdm

    images, masks = torch.from_numpy(images), torch.from_numpy(masks[:, None])
    size = images.shape[-1]
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


def score_volume_3d(scorer: AnomalyScorer, nifti_path: str | os.PathLike, out_path: str | os.PathLike,
                    mask_path: str | os.PathLike | None = None, window: Any = "auto", overlap: float = 0.25,
                    blend: str = "gaussian", sw_batch_size: int = 1, memory_budget: int | float | None = None,
                    progress: bool = True, overwrite: bool = False) -> Path:
    """Score a whole 3D NIfTI with a ReconstructionScorer on a 3D backbone, through sliding windows
    (:func:`diffrep.anomaly.sliding.score_whole_volume`); write the map as NIfTI on the input's grid.

    The volume is read and masked as :func:`score_volume` does (RAS, brain mask given or derived), its
    intensities normalised as the slices' are (1st..99th percentile inside the mask -> [0, 1], 0
    outside), and the whole grid goes through the U-Net at its own resolution, window by window
    (``window``, ``overlap``, ``blend``, ``sw_batch_size``). The peak memory is estimated and checked
    against ``memory_budget`` (default: the available RAM) before any work: ``window="auto"`` picks a
    window that fits, an explicit one that does not is a MemoryBudgetError (a ValueError). The map is
    zeroed outside the mask and written with the input's shape, affine and header.
    """
    import sys

    from ..data.brain import normalise_intensities
    from ..features.memory_estimate import format_bytes
    from .sliding import score_whole_volume

    nifti_path, out_path = Path(nifti_path), Path(out_path)
    mask_path = Path(mask_path) if mask_path is not None else None
    check_volume_paths(nifti_path, out_path, mask_path, overwrite=overwrite)
    volume, mask = _read_inputs(nifti_path, mask_path)
    norm, _, _ = normalise_intensities(volume.data, mask, str(nifti_path))
    result, plan = score_whole_volume(scorer, norm[None], mask, window=window, overlap=overlap, blend=blend,
                                      sw_batch_size=sw_batch_size, memory_budget=memory_budget, progress=progress)
    del norm
    if progress:
        print(f"scored {nifti_path.name} through {plan.num_windows} windows of {'x'.join(map(str, plan.window))} "
              f"(estimated peak {format_bytes(plan.estimate.total)}, budget {format_bytes(plan.budget)})", file=sys.stderr)
    bad = ~np.isfinite(result.maps)
    if bad.any():
        raise ValueError(f"{nifti_path}: expected a finite anomaly map, got {int(bad.sum())} NaN/Inf value(s) (check the "
                         "backbone's weights and the scorer's settings); no map was written")
    return _write_map(volume.from_ras(result.maps[0] * mask).astype(np.float32), volume.image, out_path)

"""Reading 3D NIfTI volumes: the one loader (nibabel) used by the brain slice data and volume scoring.

Every refusal names the file: missing, not NIfTI, not 3D, truncated voxel data, NaN/Inf voxels.
Volumes are handed out reoriented to RAS; :meth:`NiftiVolume.from_ras` takes an array on that RAS
grid back to the file's voxel order and shape, so results can be written on the input's grid.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class NiftiVolume:
    """A loaded 3D NIfTI: the nibabel ``image`` (header, affine, shape of the file) and its voxels.

    ``data`` float32 (X, Y, Z) reoriented to RAS; ``ras_affine`` the affine of that RAS array;
    ``ornt`` the nibabel orientation transform from the file's voxel axes to RAS.
    """

    path: Path
    image: Any
    data: np.ndarray
    ras_affine: np.ndarray
    ornt: np.ndarray

    def from_ras(self, ras: np.ndarray) -> np.ndarray:
        """An array on the RAS grid of ``data`` put back in the file's voxel order and shape."""
        from nibabel.orientations import apply_orientation, ornt_transform

        if ras.shape != self.data.shape:
            raise ValueError(f"{self.path}: expected an array of the RAS volume's shape {self.data.shape}, got {ras.shape}")
        back = ornt_transform(_RAS, self.ornt)  # RAS voxel axes -> the file's
        return np.ascontiguousarray(apply_orientation(ras, back)).reshape(self.image.shape)


_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)  # axcodes2ornt(("R", "A", "S"))


def read_nifti(path: PathLike, what: str = "volume", canonical: bool = True, finite: bool = True) -> NiftiVolume:
    """Load a 3D NIfTI (a trailing singleton 4th axis is dropped) as float32, reoriented to RAS if ``canonical``.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for a file nibabel
    cannot read, a non-3D image, voxel data that cannot be read (truncated or corrupt) and NaN/Inf
    voxels (unless ``finite`` is False). ``what`` ("volume", "mask", ...) is the word the messages use.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI {what} not found: {path}")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError and friends
        raise ValueError(f"{path}: expected a readable NIfTI {what}, got an error from nibabel: {exc}") from exc
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D {what}, got shape {tuple(img.shape)}")
    try:  # nibabel reads the header eagerly and the voxels lazily: a cut .nii.gz fails only here
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:  # EOFError, zlib.error, OSError ("Expected N bytes, got M")
        raise ValueError(f"{path}: expected a complete NIfTI {what}, its voxel data could not be read (truncated or "
                         f"corrupt file?): {type(exc).__name__}: {exc}") from exc
    bad = int((~np.isfinite(data)).sum()) if finite else 0
    if bad:
        raise ValueError(f"{path}: expected finite intensities, got {bad} NaN/Inf voxel(s)")
    affine = np.asarray(img.affine, dtype=np.float64)
    ornt = io_orientation(affine) if canonical else _RAS
    to_ras = ornt_transform(ornt, _RAS)
    ras = np.ascontiguousarray(apply_orientation(data, to_ras), dtype=np.float32)
    ras_affine = affine @ inv_ornt_aff(to_ras, shape)
    return NiftiVolume(path, img, ras, ras_affine, ornt)


def load_volume(path: PathLike, canonical: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI as ``(float32 array (X, Y, Z), 4x4 affine)``, reoriented to RAS if ``canonical``.

    A trailing singleton 4th dimension is dropped; the refusals are those of :func:`read_nifti`.
    """
    volume = read_nifti(path, "volume", canonical)
    return volume.data, volume.ras_affine

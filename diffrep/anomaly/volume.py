"""Score a whole 3D NIfTI volume slice by slice and write an anomaly-map NIfTI on the input's grid.

Slices are made exactly as the brain training data were (diffrep.data.brain): RAS reorientation,
1st..99th percentile of the intensities inside the brain mask -> [0, 1] (clipped, 0 outside), one
square crop around the brain for the whole volume (+4 voxel margin), antialiased bilinear resizing
to ``size x size``. Each slice's map is resized back, un-cropped, zeroed outside the brain mask and
reoriented to the input's voxel order, so the output has the input's shape, affine and header.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.brain import _crop_box, _derive, _slices
from .base import AnomalyScorer


def _load(path: Path, what: str) -> Any:
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError and friends
        raise ValueError(f"{path}: expected a readable NIfTI {what}, got an error from nibabel: {exc}") from exc


def _as_3d(img: Any, path: Path, what: str) -> np.ndarray:
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D {what} (X, Y, Z), got shape {tuple(img.shape)}")
    return np.asarray(img.dataobj, dtype=np.float32).reshape(shape)


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
                 progress: bool = True) -> Path:
    """Score every axial slice of a 3D NIfTI with a (fitted) scorer; write the anomaly map as NIfTI.

    Args:
        scorer: any AnomalyScorer (ReconstructionScorer, DAEScorer, ...), ready to ``score``.
        nifti_path: the input volume (.nii/.nii.gz), 3D (a trailing singleton 4th axis is accepted).
        out_path: where the float32 map goes (.nii/.nii.gz); written to a temporary name and renamed.
        mask_path: a brain mask on the same grid (nonzero = brain). Without one, a mask is derived as
            for the training data: Otsu threshold, largest component, closing, hole filling.
        size: slice size the scorer's backbone was trained on. batch_size: slices per ``score`` call.
        progress: show a tqdm progress bar.

    Returns the output path. Raises ValueError for a non-3D volume, NaN/Inf voxels, an all-zero
    volume, or a mask whose shape differs from the volume's.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
    from tqdm.auto import tqdm

    nifti_path, out_path = Path(nifti_path), Path(out_path)
    if not out_path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"out_path: expected a .nii or .nii.gz file name, got {out_path.name!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size: expected an int >= 8, got {size!r}")
    img = _load(nifti_path, "volume")
    data = _as_3d(img, nifti_path, "volume")
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise ValueError(f"{nifti_path}: expected finite intensities, got {bad} NaN/Inf voxel(s)")
    if not np.any(data):
        raise ValueError(f"{nifti_path}: expected a non-empty volume, got all-zero intensities")
    to_ras = ornt_transform(io_orientation(img.affine), axcodes2ornt(("R", "A", "S")))
    vol = apply_orientation(data, to_ras).astype(np.float32)
    if mask_path is not None:
        mask_path = Path(mask_path)
        mask_data = _as_3d(_load(mask_path, "mask"), mask_path, "mask")
        if mask_data.shape != data.shape:
            raise ValueError(f"{mask_path}: expected a mask of the volume's shape {data.shape}, got {mask_data.shape}")
        mask = apply_orientation(np.nan_to_num(mask_data) != 0, to_ras).astype(bool)
        if not mask.any():
            raise ValueError(f"{mask_path}: expected a non-empty brain mask, got an all-zero mask")
    else:
        mask, _ = _derive(vol, None, None, str(nifti_path))

    lo, hi = np.percentile(vol[mask], [1.0, 99.0])
    if hi <= lo:
        raise ValueError(f"{nifti_path}: expected varying intensities inside the brain mask, got 1st..99th "
                         f"percentile {lo}..{hi}")
    norm = np.clip((vol - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    norm[~mask] = 0.0
    box = _crop_box(mask)
    resize = dict(size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = F.interpolate(torch.from_numpy(_slices(norm, box).copy()).unsqueeze(1), **resize)
    masks = F.interpolate(torch.from_numpy(_slices(mask.astype(np.float32), box).copy()).unsqueeze(1), **resize) > 0.5
    images = images.clamp(0.0, 1.0) * masks

    maps = np.zeros((images.shape[0], size, size), np.float32)
    todo = np.flatnonzero(masks.flatten(1).any(dim=1).numpy())  # slices without brain keep a zero map
    for start in tqdm(range(0, len(todo), batch_size), desc=f"scoring {nifti_path.name}", unit="batch",
                      disable=not progress):
        index = todo[start:start + batch_size]
        maps[index] = scorer.score(images[index], masks[index]).maps

    side = box[2]
    back = F.interpolate(torch.from_numpy(maps).unsqueeze(1), size=(side, side), mode="bilinear",
                         antialias=True, align_corners=False)[:, 0].numpy()
    ras_map = _unslices(back, box, vol.shape) * mask
    out = apply_orientation(ras_map, ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(img.affine)))
    out = np.ascontiguousarray(out, dtype=np.float32).reshape(img.shape)

    header = img.header.copy()
    header.set_data_dtype(np.float32)
    if hasattr(header, "set_slope_inter"):
        header.set_slope_inter(1.0, 0.0)
    klass = img.__class__ if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
    result = klass(out, img.affine, header=header)
    result.header["cal_min"], result.header["cal_max"] = 0.0, float(out.max())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".tmp-{os.getpid()}-{out_path.name}")
    try:
        nib.save(result, str(tmp))
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


# ------------------------------------------------------------------------------ CLI
def _cmd_anomaly_score(args: argparse.Namespace) -> int:
    from ..backbones import load_backbone
    from .reconstruction import ReconstructionScorer

    backbone = load_backbone(args.backbone, device=args.device)
    size = args.size or int(backbone.config.provenance.get("data", {}).get("size", 64))
    scorer = ReconstructionScorer(backbone, noise_level=args.noise_level, noise=args.noise, reverse=args.reverse,
                                  ddim_steps=args.steps, residual=args.residual, erode=args.erode,
                                  median=args.median, seed=args.seed, batch_size=args.batch_size)
    calls = scorer.unet_calls_per_image
    out = score_volume(scorer, args.input, args.out, mask_path=args.mask, size=size, batch_size=args.batch_size,
                       progress=not args.quiet)
    print(f"wrote anomaly map to {out} (reverse={args.reverse}, L={args.noise_level}, "
          f"noise level {backbone.noise_level(args.noise_level):.3f}, {calls} U-Net call(s) per slice, size {size})")
    return 0


def add_anomaly_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``anomaly score`` on an argparse subparsers object; returns the ``anomaly`` parser.

    ``diffrep anomaly score --backbone NAME_OR_DIR INPUT.nii.gz --out MAP.nii.gz [--mask MASK.nii.gz]
    [--noise-level L] [--reverse x0|ddim|ddpm] [--noise gaussian|simplex] [--steps k]``
    """
    from .reconstruction import NOISE_KINDS, RESIDUALS, REVERSE_MODES

    anomaly = subparsers.add_parser("anomaly", help="reconstruction-based anomaly maps for NIfTI volumes")
    commands = anomaly.add_subparsers(dest="anomaly_command", required=True)
    p = commands.add_parser("score", help="score a 3D NIfTI slice by slice; write an anomaly-map NIfTI")
    p.add_argument("input", help="3D NIfTI volume (.nii/.nii.gz)")
    p.add_argument("--backbone", required=True, help="checkpoint directory or shipped default name")
    p.add_argument("--out", required=True, help="output anomaly map (.nii/.nii.gz), same grid as the input")
    p.add_argument("--mask", default=None, help="brain mask on the input's grid (default: derived by Otsu)")
    p.add_argument("--noise-level", type=int, default=250, help="timestep L the input is noised to")
    p.add_argument("--reverse", choices=REVERSE_MODES, default="x0")
    p.add_argument("--noise", choices=NOISE_KINDS, default="gaussian")
    p.add_argument("--steps", type=int, default=5, help="DDIM steps k (--reverse ddim)")
    p.add_argument("--residual", choices=RESIDUALS, default="l1")
    p.add_argument("--erode", type=int, default=0, help="brain-mask erosion in pixels")
    p.add_argument("--median", type=int, default=0, help="median filter size (0 = none)")
    p.add_argument("--size", type=int, default=None, help="slice size (default: the backbone's training size, else 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_anomaly_score)
    return anomaly

"""``diffrep anomaly score``: a reconstruction anomaly map of a 3D NIfTI volume (library: ``diffrep.anomaly``)."""
from __future__ import annotations

import argparse
from typing import Any

from .options import add_threads_option, apply_threads

# The scorer's vocabularies, spelled here so that building the parser imports no torch; a test checks that
# they equal the library's (reconstruction.REVERSE_MODES and RESIDUALS, noise.EPS_NOISE_TYPES,
# noise_policy.RECONSTRUCTION_POLICIES).
REVERSE_MODES = ("ddpm", "ddim", "x0")
NOISE_TYPES = ("gaussian", "simplex")
NOISE_POLICIES = ("per_image", "per_image_ensemble(k)", "shared", "ensemble(k)")
RESIDUALS = ("l1", "l2")


def _cmd_anomaly_score(args: argparse.Namespace) -> int:
    from ..anomaly import ReconstructionScorer, score_volume
    from ..anomaly.volume import check_volume_paths
    from ..backbones import load_backbone
    from ..devices import resolve_device
    from ..features.noise_policy import RECONSTRUCTION_POLICIES, NoisePolicy

    if args.renamed_noise_level is not None:  # an old script's option: a clear error, exit 2
        raise ValueError("--noise-level was renamed --timestep (a timestep L, not sqrt(1-alpha_bar))")
    if args.noise in NOISE_TYPES:  # an old script's --noise gaussian|simplex (the distribution, now --noise-type)
        raise ValueError(f"--noise {args.noise}: --noise is the noise policy ({', '.join(NOISE_POLICIES)}); the "
                         f"noise distribution is --noise-type {args.noise}")
    NoisePolicy.parse(args.noise, RECONSTRUCTION_POLICIES)
    apply_threads(args)
    device = resolve_device(args.device)  # refusals first: nothing heavy is loaded for a bad device or --out
    check_volume_paths(args.input, args.out, args.mask, overwrite=args.overwrite, option="--out")
    backbone = load_backbone(args.backbone, device=device)
    _check_dimension_options(args, backbone.spatial_dims)
    if backbone.in_channels != 1:
        raise ValueError(f"--backbone {args.backbone}: expected a 1-channel backbone for NIfTI volumes, got "
                         f"{backbone.in_channels} input channels")
    size = args.size or int(backbone.config.provenance.get("data", {}).get("size", 64))
    multiple = backbone.config.unet.size_multiple
    if backbone.spatial_dims == 2 and (size < 8 or size % multiple):
        raise ValueError(f"--size: expected a slice size >= 8 divisible by {multiple} (what the {backbone.config.unet.levels}-"
                         f"level U-Net of {args.backbone} takes), got {size}")
    scorer = ReconstructionScorer(backbone, timestep=args.timestep, noise_type=args.noise_type, noise=args.noise,
                                  reverse=args.reverse, ddim_steps=args.steps, residual=args.residual,
                                  erode=args.erode, median=args.median, seed=args.seed, batch_size=args.batch_size)
    calls = scorer.unet_calls_per_image
    if backbone.spatial_dims == 3:  # the whole volume through sliding windows
        return _score_volume_3d(args, scorer, calls)
    out = score_volume(scorer, args.input, args.out, mask_path=args.mask, size=size, batch_size=args.batch_size,
                       progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote anomaly map to {out} (reverse={args.reverse}, timestep L={args.timestep}, "
          f"noise level {backbone.noise_level(args.timestep):.3f}, {calls} U-Net call(s) per slice, size {size})")
    return 0


def add_anomaly_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``anomaly score`` on an argparse subparsers object; returns the ``anomaly`` parser.

    ``diffrep anomaly score --backbone NAME_OR_DIR INPUT.nii.gz --out MAP.nii.gz [--mask MASK.nii.gz]
    [--timestep L] [--reverse x0|ddim|ddpm] [--noise-type gaussian|simplex] [--noise POLICY] [--steps k]
    [--overwrite]``

    An existing --out is refused unless --overwrite is given (a map is cheap to recompute, a lost
    file is not); --out can never be the input scan or the mask, whatever the flags.
    """
    anomaly = subparsers.add_parser("anomaly", help="reconstruction-based anomaly maps for NIfTI volumes")
    commands = anomaly.add_subparsers(dest="anomaly_command", required=True)
    p = commands.add_parser("score", help="score a 3D NIfTI slice by slice; write an anomaly-map NIfTI")
    p.add_argument("input", help="3D NIfTI volume (.nii/.nii.gz)")
    p.add_argument("--backbone", required=True, help="checkpoint directory or shipped default name")
    p.add_argument("--out", required=True, help="output anomaly map (.nii/.nii.gz), same grid as the input; never the "
                   "input or the mask, and not an existing file unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--mask", default=None, help="brain mask on the input's grid (default: derived by Otsu)")
    p.add_argument("--timestep", type=int, default=250, help="timestep L the input is noised to (AnoDDPM's lambda)")
    p.add_argument("--noise-level", dest="renamed_noise_level", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reverse", choices=REVERSE_MODES, default="x0")
    p.add_argument("--noise-type", choices=NOISE_TYPES, default="gaussian", help="the noise distribution")
    p.add_argument("--noise", default="per_image", help=f"the noise policy: {', '.join(NOISE_POLICIES)} (an "
                   "ensemble averages k reconstructions, k times the U-Net calls)")
    p.add_argument("--steps", type=int, default=5, help="DDIM steps k (--reverse ddim)")
    p.add_argument("--residual", choices=RESIDUALS, default="l1")
    p.add_argument("--erode", type=int, default=0, help="brain-mask erosion in pixels")
    p.add_argument("--median", type=int, default=0, help="median filter size (0 = none)")
    p.add_argument("--size", type=int, default=None, help="slice size (default: the backbone's training size, else 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--window", type=parse_window, default=None, help="3D backbones: sliding window, 'auto' (default: the largest that fits "
                   "the memory budget), N or DxHxW, multiples of the U-Net's total stride")
    p.add_argument("--overlap", type=float, default=None, help="3D backbones: window overlap in [0, 1) (default 0.25)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB", help="3D backbones: memory the run "
                   "may use, checked before any work (default: the available RAM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps; refused if absent on this machine")
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_anomaly_score)
    return anomaly


_OPTIONS_3D = ("window", "overlap", "memory_budget")


def _check_dimension_options(args: argparse.Namespace, spatial_dims: int) -> None:
    """--size is for 2D backbones (slices), --window/--overlap/--memory-budget for 3D ones (whole volumes)."""
    if spatial_dims == 3 and args.size is not None:
        raise ValueError(f"--size: {args.backbone} is a 3D backbone, which scores the whole volume (no slices); "
                         "use --window to set the sliding window")
    given = [f"--{name.replace('_', '-')}" for name in _OPTIONS_3D if getattr(args, name) is not None]
    if spatial_dims == 2 and given:
        raise ValueError(f"{', '.join(given)}: only for 3D backbones; {args.backbone} is 2D and scores slices (--size)")
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise ValueError(f"--memory-budget: expected a positive number of GB, got {args.memory_budget}")


def parse_window(text: str) -> Any:
    """--window: 'auto' -> 'auto'; 'N' -> N; 'DxHxW' -> (D, H, W) (sizes are checked against the U-Net later)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        sizes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', N or DxHxW, got {text!r}") from None
    return sizes[0] if len(sizes) == 1 else sizes


def _score_volume_3d(args: argparse.Namespace, scorer: Any, calls: int) -> int:
    from ..anomaly.volume import score_volume_3d

    budget = None if args.memory_budget is None else args.memory_budget * 2**30
    out = score_volume_3d(scorer, args.input, args.out, mask_path=args.mask, window=args.window or "auto",
                          overlap=0.25 if args.overlap is None else args.overlap, memory_budget=budget,
                          progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote anomaly map to {out} (3D backbone: the whole volume through sliding windows, reverse={args.reverse}, "
          f"{calls} U-Net call(s) per window)")
    return 0

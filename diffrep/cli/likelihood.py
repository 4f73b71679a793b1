"""``diffrep likelihood``: per-image NLL in bits/dim and the complexity-corrected score, as a CSV
(library: :class:`diffrep.anomaly.LikelihoodScorer`, pipeline: :mod:`diffrep.pipelines.likelihood`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .options import add_threads_option, apply_threads

# Spelled here so that building the parser imports no torch; a test checks that they equal
# diffrep.anomaly.likelihood_scores.METHODS.
METHODS = ("vlb", "ode")
TRACES = ("hutchinson", "exact")


def _check_options(args: argparse.Namespace) -> None:
    """Refuse bad options and outputs before anything is loaded."""
    from ..anomaly.likelihood_scores import check_tolerance
    from ..errors import check_positive_int
    from ..outputs import check_output_file

    if args.method not in METHODS:
        raise ValueError(f"--method: expected one of {list(METHODS)}, got {args.method!r}")
    if args.trace not in TRACES:
        raise ValueError(f"--trace: expected one of {list(TRACES)}, got {args.trace!r}")
    check_tolerance(args.rtol, "--rtol")
    check_tolerance(args.atol, "--atol")
    check_positive_int(args.hutchinson, "--hutchinson")
    check_positive_int(args.batch_size, "--batch-size")
    check_positive_int(args.seed, "--seed", minimum=0)
    if args.size is not None:
        check_positive_int(args.size, "--size", minimum=8)
    if Path(args.out).suffix.lower() != ".csv":
        raise ValueError(f"--out: expected a .csv file name, got {Path(args.out).name!r}")
    check_output_file(args.out, {"input": args.inputs}, overwrite=args.overwrite)
    if not Path(args.inputs).exists():
        raise FileNotFoundError(f"input: {args.inputs} does not exist; expected a .npy file, a folder of images "
                                "or a NIfTI volume")


def _cmd_likelihood(args: argparse.Namespace) -> int:
    from ..anomaly import LikelihoodScorer
    from ..backbones import load_backbone
    from ..devices import resolve_device
    from ..pipelines.likelihood import likelihood_rows, read_likelihood_inputs, write_likelihood_csv

    _check_options(args)
    apply_threads(args)
    device = resolve_device(args.device)
    backbone = load_backbone(args.backbone, device=device)
    inputs = read_likelihood_inputs(args.inputs, backbone, size=args.size)
    scorer = LikelihoodScorer(backbone, method=args.method, hutchinson=args.hutchinson, rtol=args.rtol,
                              atol=args.atol, seed=args.seed, batch_size=args.batch_size, trace=args.trace,
                              eight_bit=not args.continuous)
    scorer.fit(inputs.images[:1])  # validates the settings for this backbone (e.g. the ODE's schedule)
    rows = likelihood_rows(scorer, inputs, progress=not args.quiet)
    out = write_likelihood_csv(rows, args.out)
    mean = sum(r["nll_bits_per_dim"] for r in rows) / len(rows)
    calls = sum(r["unet_calls"] for r in rows) / len(rows)
    print(f"wrote {len(rows)} row(s) to {out}: mean NLL {mean:.4f} bits/dim ({args.method}), "
          f"{calls:.0f} U-Net call(s) per image")
    return 0


def add_likelihood_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``likelihood``: ``diffrep likelihood BACKBONE INPUTS --method vlb|ode --out scores.csv``."""
    p = subparsers.add_parser("likelihood", help="per-image NLL (bits/dim) and complexity-corrected OOD scores as CSV")
    p.add_argument("backbone", help="checkpoint directory or shipped default name")
    p.add_argument("inputs", help=".npy images (N,H,W) or (N,C,H,W), a folder of PNG/JPEG/TIFF images, or a 3D NIfTI "
                                  "volume (scored slice by slice)")
    p.add_argument("--method", required=True, help="vlb (variational bound, T calls per image) or ode "
                                                    "(probability-flow ODE, adaptive)")
    p.add_argument("--hutchinson", type=int, default=1, help="probe vectors of the ODE's trace estimator")
    p.add_argument("--trace", default="hutchinson", help="the ODE's divergence: hutchinson (probe vectors) or exact "
                                                          "(one vector-Jacobian product per dimension: tiny images)")
    p.add_argument("--continuous", action="store_true", help="the data are continuous, not 8-bit: no dequantisation "
                                                             "(ODE) and a Gaussian decoder (VLB); bits/dim lose the 8-bit offset")
    p.add_argument("--rtol", type=float, default=1e-5, help="ODE solver relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="ODE solver absolute tolerance")
    p.add_argument("--seed", type=int, default=0, help="seed of the VLB noise, dequantisation and Hutchinson probes")
    p.add_argument("--batch-size", type=int, default=32, help="images per U-Net batch (per ODE solve)")
    p.add_argument("--size", type=int, default=None, help="NIfTI slice size (default: the backbone's training size)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps; refused if absent on this machine")
    add_threads_option(p)
    p.add_argument("--out", required=True, help="output .csv, one row per image; never the input, and not an "
                                                "existing file unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_likelihood)
    return p

"""``diffrep train``: train a DDPM from a recipe (works under torchrun via ``python -m diffrep.cli``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _cmd_train(args: argparse.Namespace) -> int:
    from ..compute import ComputeOptions
    from ..devices import resolve_device
    from ..training import load_train_config, train

    device = None if args.device is None else resolve_device(args.device)  # refused before the recipe is read
    compute = ComputeOptions(autocast=args.autocast, channels_last=args.channels_last)
    config = load_train_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / config.name
    export = train(config, out, resume=args.resume, max_steps=args.max_steps, num_threads=args.threads,
                   device=device, compute=compute)
    print(f"backbone written to {export}")
    return 0


def add_train_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``diffrep train`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("train", help="train a DDPM from a recipe (works under torchrun)")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --out (needed when --out already holds one)")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this global step (the LR schedule stays the recipe's)")
    p.add_argument("--out", default=None, help="run directory (default runs/NAME)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: each process's GPU if CUDA is "
                                                  "available, else cpu); refused if absent on this machine")
    p.add_argument("--autocast", choices=("bfloat16",), default=None, help="mixed-precision training in bfloat16")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory layout (faster on GPUs)")
    p.set_defaults(func=_cmd_train)
    return p

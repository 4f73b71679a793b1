"""``diffrep train``: train a DDPM from a recipe (works under torchrun via ``python -m diffrep.cli``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _cmd_train(args: argparse.Namespace) -> int:
    from ..training import load_train_config, train

    config = load_train_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / config.name
    export = train(config, out, resume=args.resume, max_steps=args.max_steps, num_threads=args.threads)
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
    p.set_defaults(func=_cmd_train)
    return p

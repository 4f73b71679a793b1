"""``diffrep demo``: features of held-out brain MRI slices from the shipped default, summarised on stdout."""
from __future__ import annotations

import argparse
from typing import Any


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..pipelines.demo import run_demo

    print_summary(run_demo(args.out))
    return 0


def print_summary(summary: dict) -> None:
    """Print the summary of :func:`diffrep.pipelines.demo.run_demo` for a reader."""
    print(f"diffrep demo: {summary['backbone']}")
    print(f"  images      {summary['images']['count']} x {summary['images']['shape']} ({summary['images']['data']})")
    print("  nodes       " + ", ".join(f"{n['name']} ({n['channels']} ch, stride {n['stride']})" for n in summary["nodes"]))
    print("  timesteps   " + ", ".join(f"t={t['t']} (noise level {t['noise_level']})" for t in summary["timesteps"]))
    print(f"  descriptor  {summary['pixel_descriptor_dim']} values per pixel, extracted in {summary['seconds']} s")
    for name, path in summary["outputs"].items():
        print(f"  {name:<11} {path}")


def add_demo_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``diffrep demo`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("demo", help="features of held-out brain MRI slices from the shipped default")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.set_defaults(func=_cmd_demo)
    return p

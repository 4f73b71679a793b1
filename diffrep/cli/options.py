"""Options shared by the commands that run the U-Net: ``--threads``, ``--autocast``, ``--channels-last``."""
from __future__ import annotations

import argparse


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch CPU threads (default: torch's own choice)."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads`` (an integer >= 1), if given."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    from ..errors import check_positive_int

    check_positive_int(threads, "--threads")
    import torch

    torch.set_num_threads(int(threads))


def add_compute_options(p: argparse.ArgumentParser) -> None:
    """``--autocast`` and ``--channels-last`` (diffrep.compute.ComputeOptions) on a command that runs the U-Net."""
    p.add_argument("--autocast", choices=("bfloat16", "float16"), default=None,
                   help="run the U-Net under torch.autocast in this precision (float16: CUDA only); features stay float32")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory layout (faster convolutions on GPUs)")

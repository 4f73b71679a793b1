"""Ship a finished training run as a zoo default (a developer script, not part of the library).

Copies ``RUN_DIR/backbone`` into the package zoo as ``diffrep/zoo/NAME`` with fp16 weight storage (they
load as float32), and the run's reports (log, loss curve, sample grid, held-out losses, and the shipped
config.json) to ``benchmarks/results/pretraining/NAME``, where the README's pretraining tables read them.
Every file is written atomically; an existing zoo entry of that name is replaced.

    python benchmarks/ship_default.py runs/brain-ddpm brain-ddpm [--zoo-dir DIR] [--results-dir DIR]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR  # noqa: E402

from diffrep._atomic import atomic_path  # noqa: E402
from diffrep.backbones.checkpoint import load_checkpoint, save_backbone  # noqa: E402
from diffrep.backbones.zoo import ZOO_DIR  # noqa: E402

REPORT_FILES = ("log.jsonl", "loss_curve.png", "samples.png", "heldout_losses.json")
PRETRAINING_DIR = RESULTS_DIR / "pretraining"


def ship_default(run_dir: str | Path, name: str, results_dir: str | Path = PRETRAINING_DIR,
                 zoo_dir: str | Path = ZOO_DIR) -> Path:
    """Copy ``run_dir/backbone`` into ``zoo_dir/name`` (fp16 storage) and the run's reports to
    ``results_dir/name``; returns the zoo entry."""
    run_dir = Path(run_dir)
    backbone = load_checkpoint(run_dir / "backbone")
    target = Path(zoo_dir) / name
    save_backbone(backbone, target, dtype="float16")
    reports = Path(results_dir) / name
    reports.mkdir(parents=True, exist_ok=True)
    for source in [run_dir / f for f in REPORT_FILES if (run_dir / f).is_file()] + [target / "config.json"]:
        with atomic_path(reports / source.name) as tmp:
            shutil.copy2(source, tmp)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished `diffrep train` run directory (holds backbone/ and the reports)")
    p.add_argument("name", help="the zoo name, e.g. brain-ddpm")
    p.add_argument("--zoo-dir", default=str(ZOO_DIR), help="the package zoo (default diffrep/zoo)")
    p.add_argument("--results-dir", default=str(PRETRAINING_DIR), help="where the reports go, under NAME/")
    args = p.parse_args(argv)
    target = ship_default(args.run_dir, args.name, args.results_dir, args.zoo_dir)
    print(f"shipped {args.run_dir} as {target} (fp16 weights); reports in {Path(args.results_dir) / args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

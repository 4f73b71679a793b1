"""Validation-only check of two linear-probe levers on Fashion-MNIST: pooling grid and noise ensembles.

The full benchmark (classification.py) pools each node by global average, as DDAE does. On 28x28 images
position carries class information, so this script also scores 2x2 and 4x4 average grids, and a noise
ensemble (features averaged over 4 seeded draws) against one shared draw. A stratified-free random
subset of the training images is split into a fit part and a validation part; the test set is not used.

    python benchmarks/classification_levers.py [--backbone fmnist-ddpm] [--fit 3000] [--val 2000] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, Stopwatch, finish_metadata, run_metadata, write_json  # noqa: E402

from diffrep import FeatureExtractor, load_backbone, pool  # noqa: E402
from diffrep.heads import LinearProbe  # noqa: E402
from diffrep.pipelines.probe import load_probe_dataset  # noqa: E402


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="fmnist-ddpm")
    p.add_argument("--nodes", nargs="+", default=["down.1", "mid", "up.0", "up.1"])
    p.add_argument("--timestep", type=int, default=11)
    p.add_argument("--grids", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--noises", nargs="+", default=["shared", "ensemble(4)"])
    p.add_argument("--fit", type=int, default=3000)
    p.add_argument("--val", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=None, help="suffix of the output name, e.g. 'long' -> classification_fmnist_levers_long.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = run_metadata(vars(args), args.seed)
    watch = Stopwatch()
    backbone = load_backbone(args.backbone)
    xtr, ytr, _, _, info = load_probe_dataset("fmnist", backbone)
    order = np.random.default_rng(args.seed).permutation(len(ytr))
    fit, val = order[:args.fit], order[args.fit:args.fit + args.val]
    rows = []
    for noise in args.noises:
        with watch(f"features {noise}"):
            extractor = FeatureExtractor(backbone, args.nodes, [args.timestep], noise=noise, seed=args.seed)
            fit_features, val_features = extractor(xtr[fit]), extractor(xtr[val])
        for key in fit_features:
            for grid in args.grids:
                with watch("probes"):
                    probe = LinearProbe().fit(pool(fit_features, [key], grid=grid).numpy(), ytr[fit])
                    acc = probe.score(pool(val_features, [key], grid=grid).numpy(), ytr[val])
                rows.append({"noise": noise, "node": key.node, "timestep": key.timestep, "pool_grid": grid,
                             "dim": int(probe.n_features_in_), "val_acc": float(acc)})
                print(f"{noise:12s} {key.node:7s} t={key.timestep} grid {grid}: val acc {acc:.4f}", flush=True)
    payload = {**finish_metadata(meta, watch), "data": info,
               "split": f"random {args.fit} fit / {args.val} validation images of the training set (seed {args.seed})",
               "probe": LinearProbe().get_params(), "rows": rows}
    write_json(payload, RESULTS_DIR / f"classification_fmnist_levers{'_' + args.tag if args.tag else ''}.json")
    return payload


if __name__ == "__main__":
    main()

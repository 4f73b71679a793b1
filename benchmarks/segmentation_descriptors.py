"""Validation-only check: does appending intensity + coordinates to the diffusion descriptor help?

The full segmentation benchmark (segmentation_brain.py) found the 3-feature trivial baseline (intensity +
pixel coordinates) ahead of both the trained and the random-init U-Net on MNI152 tissue labels. This
script fits the same pixel MLP ensemble (5 members, 5 epochs, like the benchmark's selection grid) on the
seed-0 N=5 labelled slices and scores the validation slices, for a few node/timestep sets, with and
without the 3 trivial channels appended. Test slices are not touched.

    python benchmarks/segmentation_descriptors.py [--backbone brain-ddpm] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import segmentation_brain as seg  # noqa: E402
from common import RESULTS_DIR, Stopwatch, finish_metadata, random_init_control, run_metadata, write_json  # noqa: E402

from diffrep import FeatureExtractor, upsample_concat  # noqa: E402
from diffrep.data.brain import NUM_CLASSES, load_brain_split  # noqa: E402
from diffrep.heads import PixelClassifier  # noqa: E402

CONFIGS = [(["down.0", "down.1", "down.2", "down.3"], [10, 50, 100]), (["up.2", "up.3"], [0]),
           (["up.2", "up.3"], [50, 150, 250])]


def descriptors(backbone, nodes: list[str], timesteps: list[int], images, seed: int) -> torch.Tensor:
    features = FeatureExtractor(backbone, nodes, timesteps, noise="shared", seed=seed)(torch.from_numpy(images))
    return upsample_concat(features, images.shape[-2:])


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="brain-ddpm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = run_metadata(vars(args), args.seed)
    watch = Stopwatch()
    train, val = load_brain_split("train"), load_brain_split("val")
    idx = seg.labelled_indices(args.seed, seg.SELECT_N, len(train))
    backbone = seg.get_backbone(args.backbone)
    rows = []
    for name, bb in (("diffrep", backbone), ("control: random-init U-Net", random_init_control(backbone, 0))):
        for nodes, ts in CONFIGS:
            with watch(name):
                fit_x, val_x = (descriptors(bb, nodes, ts, x, args.seed) for x in (train.images[idx], val.images))
                for appended in (False, True):
                    fx, vx = fit_x, val_x
                    if appended:
                        fx = torch.cat([fx, seg.trivial_descriptors(train.images[idx])], 1)
                        vx = torch.cat([vx, seg.trivial_descriptors(val.images)], 1)
                    clf = PixelClassifier(num_classes=NUM_CLASSES, n_members=5, epochs=5, max_pixels_in_memory=50_000,
                                          seed=args.seed).fit(fx, train.labels[idx])
                    miou = 100 * seg.scores(clf.predict(vx), val.labels)["miou"]
                    rows.append({"backbone": name, "nodes": nodes, "timesteps": ts, "plus_intensity_coords": appended,
                                 "val_miou": miou})
                    print(f"{name:28s} {'+'.join(nodes):28s} t={ts} {'+trivial' if appended else '':8s} {miou:.1f}",
                          flush=True)
    payload = {**finish_metadata(meta, watch), "split": "fit: seed-0 N=5 train slices; score: validation slices",
               "head": "PixelClassifier, 5 members, 5 epochs, 50k pixels", "rows": rows}
    write_json(payload, RESULTS_DIR / "segmentation_brain_descriptors.json")
    return payload


if __name__ == "__main__":
    main()

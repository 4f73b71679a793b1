"""Extraction overhead, early exit and timestep batching, measured side by side.

Writes benchmarks/results/extraction_speed.json with three ratios, each the median over rounds of the ratio
of two variants timed back to back in the same round (rounds alternate the order; quartiles reported):
- extractor time / bare U-Net forward time on the same batch (target <= 1.05);
- early-exit extraction of encoder-only nodes / full forward (target <= 0.6);
- k timesteps batched in one forward / k separate forwards.

    python benchmarks/extraction_speed.py [--backbone NAME_OR_DIR] [--batch 32] [--repeats 15]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, interleaved_medians, paired_ratio, run_metadata, write_json  # noqa: E402

from diffrep import FeatureExtractor, load_backbone  # noqa: E402
from diffrep.backbones import Backbone, zoo_names  # noqa: E402
from diffrep.training.config import load_train_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def get_backbone(name: str) -> tuple[Backbone, str]:
    if name in zoo_names() or Path(name).is_dir():
        return load_backbone(name), name
    recipe = REPO / "configs" / "train" / f"{name}.yaml"
    torch.manual_seed(0)
    return Backbone(copy.deepcopy(load_train_config(recipe).backbone)), f"{name} architecture, random init (timing only)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="fmnist-ddpm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=None, help="image size (default: the recipe's data size)")
    parser.add_argument("--k", type=int, default=3, help="timesteps for the batching comparison")
    parser.add_argument("--repeats", type=int, default=41, help="rounds (each times every variant once)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR / "extraction_speed.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    backbone, source = get_backbone(args.backbone)
    size = args.size or (28 if "fmnist" in args.backbone else 64)
    images = torch.rand((args.batch, backbone.in_channels, size, size), generator=torch.Generator().manual_seed(args.seed))
    t = 100
    timesteps = torch.full((args.batch,), t)
    x_t = backbone.schedule.add_noise(backbone.to_model_range(images), torch.randn_like(images), timesteps)
    nodes_all = backbone.node_names
    encoder = [n for n in nodes_all if n.startswith("down.")][:2]
    decoder = [n for n in nodes_all if n.startswith("up.")]
    ts = [50 + 100 * i for i in range(args.k)]

    def bare() -> None:
        with torch.inference_mode():
            backbone(x_t, timesteps)

    def bare_k() -> None:
        for step in ts:
            with torch.inference_mode():
                backbone(x_t, torch.full((args.batch,), step))

    extract_all = FeatureExtractor(backbone, nodes_all, [t], batch_size=args.batch, early_exit=False)
    extract_early = FeatureExtractor(backbone, encoder, [t], batch_size=args.batch)
    batched = FeatureExtractor(backbone, decoder, ts, batch_size=args.batch)
    separate = FeatureExtractor(backbone, decoder, ts, batch_size=args.batch, batch_timesteps=False)
    timings = interleaved_medians({
        "bare_forward": bare,
        "extractor_all_nodes": lambda: extract_all(images),
        "extractor_encoder_early_exit": lambda: extract_early(images),
        "bare_forward_x_k": bare_k,
        "extractor_k_batched": lambda: batched(images),
        "extractor_k_separate": lambda: separate(images),
    }, repeats=args.repeats, alternate=True)
    pairs = {"extractor_over_bare_forward": ("extractor_all_nodes", "bare_forward"),
             "early_exit_over_full_forward": ("extractor_encoder_early_exit", "bare_forward"),
             "k_batched_over_k_separate": ("extractor_k_batched", "extractor_k_separate"),
             "k_separate_extractor_over_k_bare_forwards": ("extractor_k_separate", "bare_forward_x_k")}
    paired = {name: paired_ratio(timings, *pair) for name, pair in pairs.items()}
    ratios = {name: value["median"] for name, value in paired.items()}
    ratio_of_medians = {name: timings[a]["median_s"] / timings[b]["median_s"] for name, (a, b) in pairs.items()}
    payload = {
        **run_metadata({"backbone": source, "batch": args.batch, "size": size, "k": args.k, "timestep": t,
                        "timesteps_k": ts, "repeats": args.repeats, "threads": args.threads,
                        "nodes_all": nodes_all, "nodes_encoder": encoder, "nodes_decoder": decoder}, args.seed),
        "timings": timings,
        "ratios": ratios,
        "ratio_quartiles": paired,
        "ratio_of_medians": ratio_of_medians,
        "targets": {"extractor_over_bare_forward": {"target": "<= 1.05", "met": ratios["extractor_over_bare_forward"] <= 1.05},
                    "early_exit_over_full_forward": {"target": "<= 0.6", "met": ratios["early_exit_over_full_forward"] <= 0.6}},
    }
    path = write_json(payload, args.out)
    for name, value in ratios.items():
        print(f"{name:<45} {value:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

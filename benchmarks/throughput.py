"""Throughput on a device: feature-extraction images/s and training steps/s, per precision and memory layout.

The prepared GPU benchmark (issue 14): run it on a machine with an accelerator,

    python benchmarks/throughput.py --device cuda        # writes benchmarks/results/throughput_cuda.json

and on CPU it is the reference (``--device cpu`` -> throughput_cpu.json). Every run also measures
float32 rows on ``reference_device`` (the CPU by default) on the same machine, so each JSON carries its own
side-by-side baseline: ``speedup_vs_reference`` = this row's rate / the reference row's rate of the model.

Rows, for each model x variant (``float32``, ``bfloat16`` autocast, ``channels_last``, both; see
diffrep.compute):
- extraction: ``FeatureExtractor`` over every node at ``timesteps`` (one forward per chunk holds all of
  them), ``extract_batch`` images per chunk: median seconds per chunk over ``extract_repeats`` chunks after
  one warm-up -> images/s;
- training: the step of ``diffrep train`` (noise a batch at random timesteps, eps-MSE, backward, clip to
  norm 1, AdamW, EMA update with timm's ModelEmaV3) on ``train_batch`` random images: median seconds per
  step over ``train_steps`` steps after two warm-ups -> steps/s and images/s.

Models: the shipped defaults (their weights) and ``ddpm-cifar10-32``, the DDPM CIFAR-10 architecture of
google/ddpm-cifar10-32 (Ho et al. 2020: 128 channels, multipliers 1,2,2,2, two residual blocks per level,
attention at 16 x 16; 35.7M parameters) as a diffusers UNet2DModel with random weights: throughput does not
depend on the weights, and no weights can be downloaded here. It needs ``diffusers`` (the [dev] extra).

Settings: configs/benchmarks/throughput.yaml (``full``; ``quick`` over it with ``--quick``).

    python benchmarks/throughput.py [--device cuda] [--quick] [--models fmnist-ddpm ...] [--out PATH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, Stopwatch, finish_metadata, load_settings, merge_settings, run_metadata, write_json  # noqa: E402

from diffrep import FeatureExtractor, load_backbone  # noqa: E402
from diffrep._atomic import atomic_write_json  # noqa: E402
from diffrep.backbones import Backbone  # noqa: E402
from diffrep.compute import ComputeOptions  # noqa: E402
from diffrep.devices import resolve_device  # noqa: E402

FULL, QUICK = load_settings("throughput")
VARIANTS = {"float32": ComputeOptions(), "bfloat16": ComputeOptions(autocast="bfloat16"),
            "channels_last": ComputeOptions(channels_last=True),
            "bfloat16+channels_last": ComputeOptions(autocast="bfloat16", channels_last=True)}
CIFAR_NAME = "ddpm-cifar10-32"
CIFAR_UNET = {"sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
              "block_out_channels": [128, 256, 256, 256],
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
              "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": 1e-6, "act_fn": "silu",
              "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
              "time_embedding_type": "positional", "center_input_sample": False}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="a smoke run (the quick section of the settings)")
    p.add_argument("--models", nargs="+", default=None, help=f"shipped default names or {CIFAR_NAME}")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/throughput_<device>[_quick].json)")
    args = p.parse_args(argv)
    args.settings = merge_settings(FULL, QUICK, args.quick, {"models": args.models, "variants": args.variants})
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = resolve_device(name)  # refused before any work if absent
    return args


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median, min and max wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def cifar_folder(root: Path, seed: int) -> Path:
    """A diffusers pipeline folder with the ddpm-cifar10-32 architecture and random weights (seeded)."""
    import diffusers

    folder = root / CIFAR_NAME
    if not (folder / "model_index.json").is_file():
        torch.manual_seed(seed)
        diffusers.UNet2DModel(**CIFAR_UNET).save_pretrained(folder / "unet")
        diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
        atomic_write_json(folder / "model_index.json", {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                        "scheduler": ["diffusers", "DDPMScheduler"]})
    return folder


def make_backbone(name: str, device: torch.device, root: Path, seed: int) -> Backbone:
    """A fresh copy of the model (variants convert weights in place, so every row loads its own)."""
    return load_backbone(cifar_folder(root, seed) if name == CIFAR_NAME else name, device=device)


def images_for(backbone: Backbone, batch: int, seed: int) -> torch.Tensor:
    """``batch`` random images in the backbone's data range at its training size."""
    size = backbone.trained_image_size or (32,) * backbone.spatial_dims
    norm = backbone.config.normalisation
    x = torch.rand((batch, backbone.in_channels, *size), generator=torch.Generator().manual_seed(seed))
    return x * (norm.high - norm.low) + norm.low


def extraction_row(backbone: Backbone, options: ComputeOptions, s: dict, repeats: int, device: torch.device,
                   seed: int) -> dict:
    """Images/s of FeatureExtractor over every node at the settings' timesteps."""
    images = images_for(backbone, s["extract_batch"], seed).to(device)
    extractor = FeatureExtractor(backbone, backbone.node_names, s["timesteps"], batch_size=s["extract_batch"],
                                 seed=seed, compute=options)
    timing = median_seconds(lambda: extractor(images), repeats, 1, device)
    return {**timing, "images_per_s": s["extract_batch"] / timing["median_s"]}


def training_row(backbone: Backbone, options: ComputeOptions, s: dict, repeats: int, device: torch.device,
                 seed: int) -> dict:
    """Steps/s of diffrep train's optimiser step (eps-MSE, backward, clip, AdamW, EMA) on random images."""
    from timm.utils import ModelEmaV3

    model = options.prepare_module(backbone.unet, backbone.spatial_dims).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = ModelEmaV3(model, decay=0.999)
    x0 = backbone.to_model_range(images_for(backbone, s["train_batch"], seed).to(device))
    generator = torch.Generator().manual_seed(seed)

    def step() -> None:
        t = torch.randint(0, backbone.num_timesteps, (x0.shape[0],), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        x_t = backbone.schedule.add_noise(x0, noise, t)
        with options.autocast_context(device):
            loss = F.mse_loss(model(options.prepare_input(x_t), t).float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)

    timing = median_seconds(step, repeats, 2, device)
    return {**timing, "steps_per_s": 1.0 / timing["median_s"], "images_per_s": s["train_batch"] / timing["median_s"]}


def measure(name: str, variant: str, device: torch.device, repeats: dict[str, int], s: dict, root: Path,
            seed: int) -> dict:
    """One row: extraction and training throughput of model ``name`` with ``variant`` on ``device``."""
    options = VARIANTS[variant]
    probe = make_backbone(name, device, root, seed)
    row = {"model": name, "variant": variant, "device": str(device), "compute": options.describe(),
           "parameters": probe.num_parameters(), "image_size": list(probe.trained_image_size or ()),
           "nodes": len(probe.node_names)}
    row["extraction"] = extraction_row(probe, options, s, repeats["extract"], device, seed)
    row["training"] = training_row(make_backbone(name, device, root, seed), options, s, repeats["train"], device, seed)
    return row


def add_speedups(rows: list[dict], reference: list[dict]) -> None:
    """``speedup_vs_reference`` of every row against the float32 reference row of its model."""
    base = {r["model"]: r for r in reference}
    for row in rows:
        ref = base.get(row["model"])
        if ref is not None:
            row["speedup_vs_reference"] = {
                "extraction": row["extraction"]["images_per_s"] / ref["extraction"]["images_per_s"],
                "training": row["training"]["steps_per_s"] / ref["training"]["steps_per_s"]}


def run_rows(args: argparse.Namespace, root: Path, watch: Stopwatch) -> tuple[list[dict], list[dict]]:
    """The device's rows (every model x variant) and the reference rows (float32 on the reference device)."""
    s, device = args.settings, args.device
    reference_device = resolve_device(s["reference_device"])
    with watch("reference rows"):
        reference = [measure(m, "float32", reference_device, {"extract": s["reference_repeats"],
                                                              "train": s["reference_repeats"]}, s, root, args.seed)
                     for m in s["models"]]
    with watch("device rows"):
        rows = [measure(m, v, device, {"extract": s["extract_repeats"], "train": s["train_steps"]}, s, root, args.seed)
                for m in s["models"] for v in s["variants"]]
    add_speedups(rows, reference)
    return rows, reference


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.settings
    meta = run_metadata({**s, "device": str(args.device)}, args.seed)
    if args.device.type == "cuda":
        meta["machine"]["gpu"] = torch.cuda.get_device_name(args.device)
    watch = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="diffrep-throughput-") as tmp:
        rows, reference = run_rows(args, Path(tmp), watch)
    out = Path(args.out) if args.out else RESULTS_DIR / f"throughput_{args.device.type}{'_quick' if args.quick else ''}.json"
    payload = {**finish_metadata(meta, watch), "quick": args.quick, "rows": rows, "reference_rows": reference,
               "columns": {"extraction.images_per_s": "extract_batch / median seconds per chunk (all nodes, all timesteps)",
                           "training.steps_per_s": "1 / median seconds per optimiser step of train_batch images",
                           "speedup_vs_reference": "rate / the float32 reference row's rate of the same model"}}
    path = write_json(payload, out)
    for row in rows:
        sp = row.get("speedup_vs_reference", {})
        print(f"{row['model']:<18} {row['variant']:<24} extract {row['extraction']['images_per_s']:9.1f} img/s "
              f"(x{sp.get('extraction', float('nan')):.2f})  train {row['training']['steps_per_s']:7.2f} steps/s "
              f"(x{sp.get('training', float('nan')):.2f})")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

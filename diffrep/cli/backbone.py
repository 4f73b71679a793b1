"""``diffrep nodes``, ``extract``, ``zoo`` and ``import-monai``: the commands about a backbone itself."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .options import add_compute_options, add_threads_option, apply_threads


def _cmd_nodes(args: argparse.Namespace) -> int:
    from ..backbones import load_backbone

    backbone = load_backbone(args.checkpoint)
    infos = backbone.feature_info()
    if args.json:
        print(json.dumps([{"name": i.name, "channels": i.channels, "stride": i.stride, "stage": i.stage} for i in infos], indent=2))
        return 0
    print(f"{'node':<8} {'stage':<5} {'channels':>8} {'stride':>6}")
    for i in infos:
        print(f"{i.name:<8} {i.stage:<5} {i.channels:>8} {i.stride:>6}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    import warnings

    from ..backbones import load_backbone
    from ..backbones.backbone import ImageSizeWarning
    from ..compute import ComputeOptions
    from ..features.io import extract_to_file, image_names, read_images

    import torch

    from ..devices import resolve_device
    from ..distributed import init_distributed, shutdown

    device = None if args.device is None else resolve_device(args.device)  # a refusal before any work
    apply_threads(args)
    compute = ComputeOptions(autocast=args.autocast, channels_last=args.channels_last)
    compute.check_device(device or torch.device("cpu"))
    context = init_distributed(device)  # under torchrun: every process extracts its share of the chunks
    if device is None:  # torchrun ranks keep the device they were given (their GPU under nccl); else the CPU
        device = context.device if context.world_size > 1 else torch.device("cpu")
    backbone = load_backbone(args.checkpoint, device=device)
    with warnings.catch_warnings():
        if not args.allow_other_size:  # refused below instead of warned about
            warnings.simplefilter("ignore", ImageSizeWarning)
        images = backbone.check_images(read_images(args.input, backbone), name=f"input {args.input}")
        backbone.check_image_size(tuple(images.shape[2:]), refuse=not args.allow_other_size, name=f"input {args.input}")
        out = extract_to_file(backbone, images, args.nodes, args.timesteps, Path(args.out), noise=args.noise,
                              seed=args.seed, batch_size=args.batch_size, dtype=args.dtype, progress=True,
                              compute=compute, files=image_names(args.input))
    shutdown(context)
    if context.is_main:
        print(f"wrote features of {images.shape[0]} image(s) to {out}")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from ..backbones import zoo_entries

    entries = zoo_entries()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print("no shipped defaults installed")
    for e in entries:
        prov = e["provenance"]
        losses = prov.get("heldout_loss", {})
        print(f"{e['name']}: channels={e['unet']['channels']} steps={prov.get('steps')} "
              f"complete={prov.get('complete')} data={prov.get('data', {}).get('dataset')} "
              f"heldout_loss={ {k: round(v, 4) for k, v in losses.items()} }")
    return 0


def _cmd_import_monai(args: argparse.Namespace) -> int:
    from ..backbones import import_monai_state_dict, save_backbone
    from ..config import load_yaml

    backbone = import_monai_state_dict(args.state_dict, load_yaml(args.arch))
    out = save_backbone(backbone, args.out)
    print(f"imported {args.state_dict} -> {out} ({backbone.num_parameters():,} parameters, nodes {backbone.node_names})")
    return 0


def add_nodes_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``diffrep nodes`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("nodes", help="list a backbone's feature nodes")
    p.add_argument("checkpoint", help="checkpoint directory, shipped default name or Hub id owner/name[@revision]")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_nodes)
    return p


def add_extract_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``diffrep extract`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("extract", help="extract features of images (.npy or an image folder) to a .safetensors file")
    p.add_argument("checkpoint")
    p.add_argument("input", help=".npy array (N,C,H,W)/(N,H,W) or a folder of PNG/JPEG/TIFF files (8/16-bit, grey or RGB)")
    p.add_argument("--nodes", nargs="+", required=True)
    p.add_argument("--timesteps", nargs="+", type=int, required=True)
    p.add_argument("--noise", default="shared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per U-Net forward (each with all --timesteps)")
    p.add_argument("--out", required=True, help="the .safetensors file, written chunk by chunk; an interrupted run "
                                                "leaves OUT.partial and resumes from it when rerun with the same settings")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype of the features")
    p.add_argument("--allow-other-size", action="store_true",
                   help="extract from images of another size than the backbone was trained on (refused by default)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps; refused if absent on this machine "
                                                  "(default: cpu, or each torchrun rank's GPU under nccl)")
    add_compute_options(p)
    add_threads_option(p)
    p.set_defaults(func=_cmd_extract)
    return p


def add_import_monai_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``diffrep import-monai`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("import-monai", help="turn a MONAI DiffusionModelUNet state dict into a diffrep checkpoint")
    p.add_argument("state_dict", help="file written by torch.save(unet.state_dict(), path)")
    p.add_argument("--arch", required=True, help="YAML with unet: (DiffusionModelUNet args), optional schedule:, normalisation:")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.set_defaults(func=_cmd_import_monai)
    return p


def add_zoo_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``diffrep zoo`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("zoo", help="list the shipped pretrained defaults")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_zoo)
    return p

"""The ``diffrep`` command: thin wrappers over library calls."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def _cmd_nodes(args: argparse.Namespace) -> int:
    from .backbones import load_backbone

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

    from .backbones import load_backbone
    from .backbones.backbone import ImageSizeWarning
    from .features.io import extract_to_file, read_images

    backbone = load_backbone(args.checkpoint)
    with warnings.catch_warnings():
        if not args.allow_other_size:  # refused below instead of warned about
            warnings.simplefilter("ignore", ImageSizeWarning)
        images = backbone.check_images(read_images(args.input, backbone), name=f"input {args.input}")
        backbone.check_image_size(tuple(images.shape[2:]), refuse=not args.allow_other_size, name=f"input {args.input}")
        out = extract_to_file(backbone, images, args.nodes, args.timesteps, Path(args.out), noise=args.noise,
                              seed=args.seed, batch_size=args.batch_size)
    print(f"wrote features of {images.shape[0]} image(s) to {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import load_train_config, train

    config = load_train_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / config.name
    export = train(config, out, resume=args.resume, max_steps=args.max_steps, num_threads=args.threads)
    print(f"backbone written to {export}")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from .backbones import zoo_entries

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
    from .backbones import import_monai_state_dict, save_backbone
    from .config import load_yaml

    backbone = import_monai_state_dict(args.state_dict, load_yaml(args.arch))
    out = save_backbone(backbone, args.out)
    print(f"imported {args.state_dict} -> {out} ({backbone.num_parameters():,} parameters, nodes {backbone.node_names})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import print_summary, run_demo

    print_summary(run_demo(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("nodes", help="list a backbone's feature nodes")
    p.add_argument("checkpoint", help="checkpoint directory or shipped default name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_nodes)

    p = sub.add_parser("extract", help="extract features of images (.npy or an image folder) to a .safetensors file")
    p.add_argument("checkpoint")
    p.add_argument("input", help=".npy array (N,C,H,W)/(N,H,W) or a folder of PNG/JPEG/TIFF files (8/16-bit, grey or RGB)")
    p.add_argument("--nodes", nargs="+", required=True)
    p.add_argument("--timesteps", nargs="+", type=int, required=True)
    p.add_argument("--noise", default="shared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--allow-other-size", action="store_true",
                   help="extract from images of another size than the backbone was trained on (refused by default)")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("train", help="train a DDPM from a recipe (works under torchrun)")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --out (needed when --out already holds one)")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this global step (the LR schedule stays the recipe's)")
    p.add_argument("--out", default=None, help="run directory (default runs/NAME)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("import-monai", help="turn a MONAI DiffusionModelUNet state dict into a diffrep checkpoint")
    p.add_argument("state_dict", help="file written by torch.save(unet.state_dict(), path)")
    p.add_argument("--arch", required=True, help="YAML with unet: (DiffusionModelUNet args), optional schedule:, normalisation:")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.set_defaults(func=_cmd_import_monai)

    p = sub.add_parser("demo", help="features of held-out brain MRI slices from the shipped default")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.set_defaults(func=_cmd_demo)

    from .anomaly.volume import add_anomaly_cli
    from .probe_cli import add_probe_cli
    from .segment_cli import add_segment_cli

    add_anomaly_cli(sub)
    add_probe_cli(sub)
    add_segment_cli(sub)

    p = sub.add_parser("zoo", help="list the shipped pretrained defaults")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as err:  # bad input: a message, exit 2 (OSError: unreadable/missing files)
        print(f"diffrep {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Every bad input to every command, in one table (issue 11).

Each row builds its inputs in a temporary folder and runs the command in-process. The command must
exit 2 with a message that names the offending file or value and what was expected, print no
traceback, change no file that existed before the call, and (unless the row says it may) write
nothing: a refusal comes before any work.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from diffrep.backbones import save_backbone
from diffrep.cli import main

from .conftest import make_backbone


@dataclass(frozen=True)
class Case:
    """One bad input: ``make(tmp, checkpoint)`` writes the inputs under ``tmp`` and returns argv."""

    id: str
    make: Callable[[Path, Path], list[str]]
    match: str                 # regex the error message must contain
    may_write: bool = False    # the command may leave new files (never change existing ones)


def _npy(tmp: Path, array: np.ndarray, name: str = "x.npy") -> str:
    np.save(tmp / name, array)
    return str(tmp / name)


# ----------------------------------------------------------------------------------------- nodes
def _broken_ckpt(tmp: Path, ckpt: Path, damage: Callable[[Path], None], name: str = "broken") -> str:
    """A copy of the test checkpoint under ``tmp/name``, then ``damage(copy)``."""
    import shutil

    shutil.copytree(ckpt, tmp / name)
    damage(tmp / name)
    return str(tmp / name)


def _edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        change(state)
        save_file(state, str(folder / "model.safetensors"))
    return damage


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_first(state: dict) -> None:
    state["conv_in.conv.weight"].view(-1)[0] = float("nan")


def _diffusers_truncated(tmp: Path, ckpt: Path) -> list[str]:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is in the dev extra")
    model = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                  layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                  up_block_types=("UpBlock2D",) * 2)
    model.save_pretrained(tmp / "dm")
    _truncate(tmp / "dm" / "diffusion_pytorch_model.safetensors")
    return ["nodes", str(tmp / "dm")]


CASES_NODES = [
    Case("nodes-missing-checkpoint", lambda tmp, ckpt: ["nodes", str(tmp / "nowhere")],
         r"nowhere.*neither a checkpoint directory, a shipped default nor a Hub id"),
    Case("nodes-garbled-config", lambda tmp, ckpt: ["nodes", _broken_ckpt(
        tmp, ckpt, lambda d: (d / "config.json").write_text('{"format": "diffrep-backbone", "unet": {'))],
         r"broken/config\.json is not valid JSON"),
    Case("nodes-missing-weights", lambda tmp, ckpt: ["nodes", _broken_ckpt(
        tmp, ckpt, lambda d: (d / "model.safetensors").unlink())], r"broken/model\.safetensors is missing"),
    Case("nodes-truncated-weights", lambda tmp, ckpt: ["nodes", _broken_ckpt(
        tmp, ckpt, lambda d: _truncate(d / "model.safetensors"))],
         r"broken/model\.safetensors is not a readable safetensors file"),
    Case("nodes-int8-weights", lambda tmp, ckpt: ["nodes", _broken_ckpt(tmp, ckpt, _edit_weights(
        lambda s: s.update({k: v.to(torch.int8) for k, v in s.items()})))],
         r"broken/model\.safetensors holds \d+ non-float weight tensor.*int8"),
    Case("nodes-nan-weight", lambda tmp, ckpt: ["nodes", _broken_ckpt(tmp, ckpt, _edit_weights(_nan_first))],
         r"broken/model\.safetensors holds NaN/Inf values in 1 tensor.*conv_in\.conv\.weight"),
    Case("nodes-truncated-diffusers-weights", _diffusers_truncated,
         r"could not read the UNet weights \['diffusion_pytorch_model\.safetensors'\] in .*dm"),
]

# --------------------------------------------------------------------------------------- extract
def _extract(tmp: Path, ckpt: Path, *extra: str, input: str | None = None) -> list[str]:
    """argv of a valid extract call on 16x16 images in [0, 1], with ``extra`` options overriding."""
    input = input or _npy(tmp, np.full((2, 16, 16), 0.5, np.float32))
    options = {"--nodes": "mid", "--timesteps": "1", "--out": str(tmp / "o.safetensors")}
    options.update(dict(zip(extra[::2], extra[1::2])))
    return ["extract", str(ckpt), input] + [item for pair in options.items() for item in pair]


def _folder(tmp: Path, files: dict | None = None) -> str:
    """A folder ``tmp/imgs`` holding ``files``: arrays are written as images, bytes as they are."""
    from PIL import Image

    (tmp / "imgs").mkdir()
    for name, content in (files or {}).items():
        if isinstance(content, bytes):
            (tmp / "imgs" / name).write_bytes(content)
        else:
            Image.fromarray(content).save(tmp / "imgs" / name)
    return str(tmp / "imgs")


def _trained_on_16(folder: Path) -> None:
    import json

    payload = json.loads((folder / "config.json").read_text())
    payload["provenance"] = {**payload.get("provenance", {}), "image_size": 16}
    (folder / "config.json").write_text(json.dumps(payload))


CASES_EXTRACT = [
    Case("extract-missing-input", lambda tmp, ckpt: ["extract", str(ckpt), str(tmp / "missing.npy"), "--nodes", "mid",
                                                     "--timesteps", "1", "--out", str(tmp / "o.safetensors")],
         r"missing\.npy does not exist"),
    Case("extract-unknown-node", lambda tmp, ckpt: ["extract", str(ckpt), _npy(tmp, np.zeros((2, 16, 16), np.float32)),
                                                    "--nodes", "bogus", "--timesteps", "1",
                                                    "--out", str(tmp / "o.safetensors")],
         r"bogus.*valid names are"),
    Case("extract-timestep-out-of-range", lambda tmp, ckpt: _extract(tmp, ckpt, "--timesteps", "1000"),
         r"timesteps: expected integers in 0\.\.999 .*got 1000"),
    Case("extract-batch-size-0", lambda tmp, ckpt: _extract(tmp, ckpt, "--batch-size", "0"),
         r"batch_size: expected an integer >= 1, got 0"),
    Case("extract-unknown-noise", lambda tmp, ckpt: _extract(tmp, ckpt, "--noise", "gaussian"),
         r"noise: expected 'shared', 'ensemble\(k\)'.*got 'gaussian'"),
    Case("extract-empty-folder", lambda tmp, ckpt: _extract(tmp, ckpt, input=_folder(tmp)),
         r"images in .*imgs, found none"),
    Case("extract-npy-wrong-rank", lambda tmp, ckpt: _extract(tmp, ckpt, input=_npy(tmp, np.zeros((4, 16), np.float32))),
         r"x\.npy: expected a tensor of rank 4"),
    Case("extract-npy-nan", lambda tmp, ckpt: _extract(tmp, ckpt, input=_npy(tmp, np.full((2, 16, 16), np.nan, np.float32))),
         r"x\.npy: expected finite values"),
    Case("extract-float-0-255", lambda tmp, ckpt: _extract(tmp, ckpt, input=_npy(
        tmp, np.linspace(0, 255, 2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16))),
         r"x\.npy: values span \[0, 255\], far outside the backbone's data range \[0, 1\].*Backbone\.normalise"),
    Case("extract-rgb-into-grey-model", lambda tmp, ckpt: _extract(tmp, ckpt, input=_folder(
        tmp, {"colour.png": np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 2
                                     + [np.zeros((16, 16), np.uint8)], axis=-1)})),
         r"colour\.png is RGB but the backbone takes 1 channel"),
    Case("extract-other-files-in-folder", lambda tmp, ckpt: _extract(tmp, ckpt, input=_folder(
        tmp, {"a.png": np.zeros((16, 16), np.uint8), "notes.txt": b"x", "b.gif": b"GIF89a"})),
         r"2 entries that are not .*\['b\.gif', 'notes\.txt'\]"),
    Case("extract-corrupt-png", lambda tmp, ckpt: _extract(tmp, ckpt, input=_folder(
        tmp, {"a.png": np.zeros((16, 16), np.uint8), "bad.png": b"\x89PNG\r\n\x1a\n truncated"})),
         r"bad\.png is not a readable image"),
    Case("extract-other-size", lambda tmp, ckpt: _extract(
        tmp, Path(_broken_ckpt(tmp, ckpt, _trained_on_16)), input=_npy(tmp, np.zeros((2, 32, 32), np.float32))),
         r"x\.npy: spatial size \(32, 32\) differs from the size this backbone was trained on \(16, 16\)"
         r".*--allow-other-size"),
    Case("extract-device-absent", lambda tmp, ckpt: _extract(tmp, ckpt, "--device", "cuda:99"),
         r"device 'cuda:99': expected a (usable CUDA GPU|GPU index)"),
    Case("extract-threads-0", lambda tmp, ckpt: _extract(tmp, ckpt, "--threads", "0"),
         r"--threads: expected an integer >= 1, got 0"),
    Case("extract-autocast-float16-on-cpu", lambda tmp, ckpt: _extract(tmp, ckpt, "--autocast", "float16"),
         r"autocast 'float16': expected a CUDA device, got 'cpu'; use 'bfloat16' on CPU"),
]

# ----------------------------------------------------------------------------------------- train
def _recipe(tmp: Path, changes: dict | None = None, name: str = "r.yaml") -> str:
    """A tiny synthetic training recipe written as YAML under ``tmp``; ``changes`` maps 'a.b' keys to values."""
    import yaml

    recipe = {"name": "tiny", "max_steps": 4, "checkpoint_every": 2, "log_every": 2, "sample_steps": 2,
              "eval_timesteps": [10, 500], "data": {"dataset": "synthetic", "size": 16, "synthetic_count": 24},
              "backbone": {"unet": {"channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 8,
                                    "num_head_channels": 8}},
              "optim": {"batch_size": 4, "warmup_steps": 2}}
    for dotted, value in (changes or {}).items():
        *parents, key = dotted.split(".")
        node = recipe
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    (tmp / name).write_text(yaml.safe_dump(recipe))
    return str(tmp / name)


def _train_argv(tmp: Path, changes: dict | None = None, *extra: str) -> list[str]:
    return ["train", "--config", _recipe(tmp, changes), "--out", str(tmp / "run"), *extra]


def _fake_run(tmp: Path, finished: bool) -> list[str]:
    """A run directory as `diffrep train` leaves it (finished: with backbone/); the harness checks it is unchanged."""
    run = tmp / "run"
    run.mkdir()
    (run / "train_state.pt").write_bytes(b"state of the earlier run")
    (run / "log.jsonl").write_text('{"step": 2, "loss": 0.5}\n')
    if finished:
        (run / "backbone").mkdir()
        (run / "backbone" / "config.json").write_text("{}")
    return _train_argv(tmp)


def _write(tmp: Path, content: bytes, name: str = "r.yaml") -> str:
    (tmp / name).write_bytes(content)
    return str(tmp / name)


CASES_TRAIN = [
    Case("train-missing-config", lambda tmp, ckpt: ["train", "--config", str(tmp / "none.yaml"), "--out", str(tmp / "run")],
         r"config file not found: \S*none\.yaml"),
    Case("train-config-is-a-folder", lambda tmp, ckpt: ["train", "--config", str(tmp), "--out", str(tmp / "run")],
         r"config file: expected a YAML file, got the directory"),
    Case("train-config-not-a-mapping", lambda tmp, ckpt: ["train", "--config", _write(tmp, b"- a\n- b\n")],
         r"r\.yaml: expected a YAML mapping at the top level, got list"),
    Case("train-garbled-yaml", lambda tmp, ckpt: ["train", "--config", _write(tmp, b"name: [tiny\nmax_steps: 4\n")],
         r"r\.yaml: not valid YAML"),
    Case("train-undecodable-config", lambda tmp, ckpt: ["train", "--config", _write(tmp, b"name: \xff\xfe\x00\x81")],
         r"r\.yaml: expected a UTF-8 YAML text file"),
    Case("train-unknown-key", lambda tmp, ckpt: _train_argv(tmp, {"optim.learning_rate": 0.1}),
         r"r\.yaml: recipe\.optim: unknown key\(s\) \['learning_rate'\] for OptimConfig; valid keys are"),
    Case("train-unknown-dataset", lambda tmp, ckpt: _train_argv(tmp, {"data.dataset": "cifar"}),
         r"r\.yaml: data\.dataset: expected 'fmnist', 'brain', 'folder' or 'synthetic', got 'cifar'"),
    Case("train-folder-without-path", lambda tmp, ckpt: _train_argv(tmp, {"data.dataset": "folder"}),
         r"r\.yaml: data\.path: expected the folder of training images for data\.dataset 'folder', got none"),
    Case("train-folder-missing", lambda tmp, ckpt: _train_argv(tmp, {"data.dataset": "folder", "data.path": str(tmp / "pngs")}),
         r"image folder \S*pngs: expected a folder of \.png/\.jpg/\.jpeg/\.tif/\.tiff images, found no such folder"),
    Case("train-folder-with-another-file", lambda tmp, ckpt: _train_argv(tmp, {"data.dataset": "folder", "data.path": _folder(
        tmp, {"a.png": np.zeros((16, 16), np.uint8), "b.png": np.zeros((16, 16), np.uint8), "notes.txt": b"x"})}),
         r"image folder \S*: 1 file\(s\) are not \.png/\.jpg/\.jpeg/\.tif/\.tiff images: \['notes\.txt'\]"),
    Case("train-folder-rgb-into-grey-unet", lambda tmp, ckpt: _train_argv(tmp, {"data.dataset": "folder", "data.path": _folder(
        tmp, {"a.png": np.zeros((16, 16), np.uint8), "c.png": np.dstack([np.zeros((16, 16), np.uint8),
                                                                           np.full((16, 16), 9, np.uint8),
                                                                           np.zeros((16, 16), np.uint8)])})}),
         r"c\.png is RGB but the backbone takes 1 channel\(s\) \(grey\); convert the image first"),
    Case("train-max-steps-0", lambda tmp, ckpt: _train_argv(tmp, None, "--max-steps", "0"),
         r"--max-steps\): expected an integer >= 1, got 0"),
    Case("train-device-absent", lambda tmp, ckpt: _train_argv(tmp, None, "--device", "cuda:99"),
         r"device 'cuda:99': expected a (usable CUDA GPU|GPU index)"),
    Case("train-device-garbled", lambda tmp, ckpt: _train_argv(tmp, None, "--device", "gpu0"),
         r"device: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu0'"),
    Case("train-threads-0", lambda tmp, ckpt: _train_argv(tmp, None, "--threads", "0"),
         r"--threads\): expected an integer >= 1, got 0"),
    Case("train-log-every-0", lambda tmp, ckpt: _train_argv(tmp, {"log_every": 0}),
         r"r\.yaml: log_every: expected an integer >= 1, got 0"),
    Case("train-checkpoint-every-0", lambda tmp, ckpt: _train_argv(tmp, {"checkpoint_every": 0}),
         r"r\.yaml: checkpoint_every: expected an integer >= 1, got 0"),
    Case("train-eval-timesteps-out-of-range", lambda tmp, ckpt: _train_argv(tmp, {"eval_timesteps": [10, 1000]}),
         r"r\.yaml: eval_timesteps: expected a non-empty list of timesteps in 0\.\.999 .*got \[10, 1000\]"),
    Case("train-lr-negative", lambda tmp, ckpt: _train_argv(tmp, {"optim.lr": -0.001}),
         r"r\.yaml: optim\.lr: expected a finite number > 0, got -0\.001"),
    Case("train-lr-a-word", lambda tmp, ckpt: _train_argv(tmp, {"optim.lr": "fast"}),
         r"r\.yaml: recipe\.optim\.lr: expected a number, got 'fast' \(str\)"),
    Case("train-channels-a-string", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.channels": "16,32"}),
         r"recipe\.backbone\.unet\.channels: expected a list of integers, got '16,32' \(str\)"),
    Case("train-steps-not-an-integer", lambda tmp, ckpt: _train_argv(tmp, {"max_steps": 1.5}),
         r"recipe\.max_steps: expected an integer, got 1\.5 \(float\)"),
    Case("train-boolean-for-an-integer", lambda tmp, ckpt: _train_argv(tmp, {"optim.batch_size": True}),
         r"recipe\.optim\.batch_size: expected an integer, got True \(bool\)"),
    Case("train-attention-levels-wrong-length", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.attention_levels": [False]}),
         r"r\.yaml: attention_levels: expected 2 entries \(one per channels entry\), got 1"),
    Case("train-norm-groups-0", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.norm_num_groups": 0}),
         r"r\.yaml: norm_num_groups: expected integers >= 1, got 0"),
    Case("train-res-blocks-wrong-length", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.num_res_blocks": [1, 1, 1]}),
         r"r\.yaml: num_res_blocks: expected one integer or 2 \(one per channels entry\), got \(1, 1, 1\)"),
    Case("train-size-the-unet-cannot-take", lambda tmp, ckpt: _train_argv(tmp, {"data.size": 15}),
         r"r\.yaml: data \(synthetic, 15x15, 1 channel\): the image size must be divisible by 2"),
    Case("train-channels-the-data-lacks", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.in_channels": 3}),
         r"r\.yaml: backbone\.unet\.in_channels: expected 1 for data \(synthetic, 16x16, 1 channel\), got 3"),
    Case("train-finished-run-without-resume", lambda tmp, ckpt: _fake_run(tmp, finished=True),
         r"run already holds a training run \(train_state\.pt, log\.jsonl, backbone\); pass --resume .*another --out"),
    Case("train-interrupted-run-without-resume", lambda tmp, ckpt: _fake_run(tmp, finished=False),
         r"run already holds a training run \(train_state\.pt, log\.jsonl\); pass --resume"),
    Case("train-resume-without-a-state", lambda tmp, ckpt: _train_argv(tmp, None, "--resume"),
         r"--resume: no training state at \S*run/train_state\.pt"),
    Case("train-diverges", lambda tmp, ckpt: _train_argv(tmp, {"optim.lr": 1e6, "max_steps": 40}),
         r"training diverged at step \d+: loss nan.*train_state\.pt \(step \d+\), is kept; no backbone was exported",
         may_write=True),
]

# ---------------------------------------------------------------------------------- import-monai
_MONAI_ARCH = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [8, 16],
               "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 8}


def _import(tmp: Path, arch: dict, state: object = "model") -> list[str]:
    """argv of import-monai with ``arch`` as arch.yaml; ``state`` is "model" (weights of _MONAI_ARCH),
    raw bytes, or a state dict to torch.save."""
    import yaml
    from monai.networks.nets import DiffusionModelUNet

    if isinstance(state, bytes):
        (tmp / "unet.pt").write_bytes(state)
    else:
        torch.save(DiffusionModelUNet(**_MONAI_ARCH).state_dict() if state == "model" else state, tmp / "unet.pt")
    (tmp / "arch.yaml").write_text(yaml.safe_dump(arch))
    return ["import-monai", str(tmp / "unet.pt"), "--arch", str(tmp / "arch.yaml"), "--out", str(tmp / "imported")]


def _int8_state() -> dict:
    from monai.networks.nets import DiffusionModelUNet

    return {k: v.to(torch.int8) for k, v in DiffusionModelUNet(**_MONAI_ARCH).state_dict().items()}


CASES_IMPORT: list[Case] = [
    Case("import-monai-unknown-unet-key", lambda tmp, ckpt: _import(tmp, {"unet": {**_MONAI_ARCH, "channel": [8, 16]}}),
         r"architecture\.unet: unknown DiffusionModelUNet argument\(s\) \['channel'\]"),
    Case("import-monai-unknown-top-key", lambda tmp, ckpt: _import(tmp, {"unet": _MONAI_ARCH, "sched": {}}),
         r"architecture: unknown key\(s\) \['sched'\]"),
    Case("import-monai-missing-required-key", lambda tmp, ckpt: _import(
        tmp, {"unet": {k: v for k, v in _MONAI_ARCH.items() if k != "spatial_dims"}}),
         r"missing required DiffusionModelUNet argument\(s\) \['spatial_dims'\]"),
    Case("import-monai-unreproducible-argument", lambda tmp, ckpt: _import(
        tmp, {"unet": {**_MONAI_ARCH, "with_conditioning": True}}),
         r"with_conditioning': True\}; such a model cannot be reproduced"),
    Case("import-monai-arch-does-not-match-weights", lambda tmp, ckpt: _import(
        tmp, {"unet": {**_MONAI_ARCH, "channels": [16, 16], "norm_num_groups": 8}}),
         r"unet\.pt does not match its config: .*shape mismatch"),
    Case("import-monai-omitted-norm-groups-is-monais-32", lambda tmp, ckpt: _import(
        tmp, {"unet": {k: v for k, v in _MONAI_ARCH.items() if k != "norm_num_groups"}}),
         r"channels: every entry must be divisible by norm_num_groups=32"),  # MONAI's default, not diffrep's 16
    Case("import-monai-int8-weights", lambda tmp, ckpt: _import(tmp, {"unet": _MONAI_ARCH}, _int8_state()),
         r"unet\.pt holds \d+ non-float weight tensor"),
    Case("import-monai-garbled-state-dict", lambda tmp, ckpt: _import(tmp, {"unet": _MONAI_ARCH}, b"not a torch file"),
         r"unet\.pt is not a weights-only torch file"),
]

# --------------------------------------------------------------------------------------- anomaly
def _nifti(tmp: Path, name: str = "scan.nii.gz", shape: tuple[int, int, int] = (24, 24, 6), mask: bool = False,
           shift: float = 0.0) -> str:
    """A small ellipsoid 'brain' volume (or its mask) as NIfTI under tmp; ``shift`` moves the affine's origin."""
    import nibabel as nib

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.8
    data = inside.astype(np.uint8) if mask else ((100 + 50 * grid[0]) * inside).astype(np.int16)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = shift
    nib.save(nib.Nifti1Image(data, affine), str(tmp / name))
    return str(tmp / name)


def _cut(tmp: Path, name: str, keep: float = 0.6) -> str:
    """A valid NIfTI whose bytes were cut: nibabel reads its header, then fails on the voxels."""
    full = Path(_nifti(tmp, "full_" + name))
    (tmp / name).write_bytes(full.read_bytes()[: int(full.stat().st_size * keep)])
    return str(tmp / name)


def _bytes(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _symlink(tmp: Path, target: str, name: str = "link.nii.gz") -> str:
    (tmp / name).symlink_to(target)
    return str(tmp / name)


def _nan_checkpoint(tmp: Path, ckpt: Path) -> str:
    """A copy of the checkpoint with one NaN weight written straight into model.safetensors (save_backbone
    refuses non-finite weights), refused at load."""
    import shutil

    shutil.copytree(ckpt, tmp / "nan_ckpt")
    _edit_weights(_nan_first)(tmp / "nan_ckpt")
    return str(tmp / "nan_ckpt")


def _two_channel_checkpoint(tmp: Path) -> str:
    from diffrep.backbones import Backbone, BackboneConfig, UNetConfig

    config = UNetConfig(spatial_dims=2, in_channels=2, out_channels=2, channels=(8, 16), attention_levels=(False, False),
                        norm_num_groups=8, num_head_channels=8)
    save_backbone(Backbone(BackboneConfig(unet=config)), tmp / "rgbish")
    return str(tmp / "rgbish")


def _score(ckpt: Path, scan: str, out: str, *extra: str) -> list[str]:
    return ["anomaly", "score", "--backbone", str(ckpt), scan, "--out", out, "--size", "16", "--quiet", *extra]


CASES_ANOMALY = [
    Case("anomaly-out-is-the-input", lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "scan.nii.gz")),
         r"--out .*scan\.nii\.gz: expected a new output file, got the input scan"),
    Case("anomaly-out-is-the-input-even-with-overwrite",
         lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "scan.nii.gz"), "--overwrite"),
         r"got the input scan .*scan\.nii\.gz itself"),
    Case("anomaly-out-is-the-input-via-symlink",
         lambda tmp, ckpt: _score(ckpt, _nifti(tmp), _symlink(tmp, str(tmp / "scan.nii.gz")), "--overwrite"),
         r"--out .*link\.nii\.gz: expected a new output file, got the input scan"),
    Case("anomaly-out-is-the-input-via-relative-path",
         lambda tmp, ckpt: _score(ckpt, _nifti(tmp), os.path.relpath(tmp / "scan.nii.gz"), "--overwrite"),
         r"expected a new output file, got the input scan"),
    Case("anomaly-out-is-the-mask",
         lambda tmp, ckpt: _score(ckpt, _nifti(tmp), _nifti(tmp, "mask.nii.gz", mask=True), "--overwrite",
                                  "--mask", str(tmp / "mask.nii.gz")),
         r"--out .*mask\.nii\.gz: expected a new output file, got the mask"),
    Case("anomaly-out-exists-without-overwrite",
         lambda tmp, ckpt: _score(ckpt, _nifti(tmp), _nifti(tmp, "old_map.nii.gz")),
         r"--out .*old_map\.nii\.gz: expected a new file, but it already exists; replace it with --overwrite"),
    Case("anomaly-out-not-nifti", lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "map.npy")),
         r"--out: expected a \.nii or \.nii\.gz file name, got 'map\.npy'"),
    Case("anomaly-missing-scan", lambda tmp, ckpt: _score(ckpt, str(tmp / "nowhere.nii.gz"), str(tmp / "m.nii.gz")),
         r"volume not found: .*nowhere\.nii\.gz"),
    Case("anomaly-truncated-nii-gz", lambda tmp, ckpt: _score(ckpt, _cut(tmp, "cut.nii.gz"), str(tmp / "m.nii.gz")),
         r"cut\.nii\.gz: expected a complete NIfTI volume, its voxel data could not be read \(truncated"),
    Case("anomaly-truncated-mask", lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"), "--mask",
                                                            _cut(tmp, "cutmask.nii", keep=0.8)),
         r"cutmask\.nii: expected a complete NIfTI mask"),
    Case("anomaly-not-a-nifti-file",
         lambda tmp, ckpt: _score(ckpt, _bytes(tmp, "scan.nii.gz", b"P5 4 4 255\n" + bytes(16)), str(tmp / "m.nii.gz")),
         r"scan\.nii\.gz: expected a readable NIfTI volume"),
    Case("anomaly-mask-of-another-shape",
         lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"), "--mask",
                                  _nifti(tmp, "mask.nii.gz", shape=(24, 24, 5), mask=True)),
         r"mask\.nii\.gz: expected a mask of the volume's shape \(24, 24, 6\), got \(24, 24, 5\)"),
    Case("anomaly-mask-on-another-grid",
         lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"), "--mask",
                                  _nifti(tmp, "mask.nii.gz", mask=True, shift=10.0)),
         r"mask\.nii\.gz: expected a mask on the grid of .*scan\.nii\.gz \(affine"),
    Case("anomaly-device-garbled", lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"), "--device", "gpu0"),
         r"device: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu0'"),
    Case("anomaly-threads-0", lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"), "--threads", "0"),
         r"--threads: expected an integer >= 1, got 0"),
    Case("anomaly-device-absent", lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"), "--device", "cuda:99"),
         r"device 'cuda:99': expected a (usable CUDA GPU|GPU index)"),
    Case("anomaly-size-the-unet-cannot-take",
         lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"), "--size", "18"),
         r"--size: expected a slice size >= 8 divisible by 4 .*got 18"),
    Case("anomaly-backbone-with-two-channels",
         lambda tmp, ckpt: _score(_two_channel_checkpoint(tmp), _nifti(tmp), str(tmp / "m.nii.gz")),
         r"--backbone .*rgbish: expected a 1-channel backbone for NIfTI volumes, got 2"),
    Case("anomaly-renamed-noise-level", lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"),
                                                                  "--noise-level", "250"),
         r"--noise-level was renamed --timestep \(a timestep L, not sqrt\(1-alpha_bar\)\)"),
    Case("anomaly-noise-type-given-as-noise", lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"),
                                                                        "--noise", "simplex"),
         r"--noise simplex: --noise is the noise policy \(per_image, .*\); the noise distribution is --noise-type simplex"),
    Case("anomaly-unknown-noise-policy", lambda tmp, ckpt: _score(ckpt, _nifti(tmp), str(tmp / "m.nii.gz"),
                                                                   "--noise", "none"),
         r"noise: expected 'per_image', 'per_image_ensemble\(k\)', 'shared' or 'ensemble\(k\)' \(k >= 1\), got 'none'"),
    Case("anomaly-nan-weight-gives-no-map",
         lambda tmp, ckpt: _score(_nan_checkpoint(tmp, ckpt), _nifti(tmp), str(tmp / "m.nii.gz")),
         r"(nan_ckpt.*(NaN|non-finite|finite))|(scan\.nii\.gz: expected a finite anomaly map, got \d+ NaN/Inf)"),
]

# --------------------------------------------------------------------------------------- segment
def _fit(tmp: Path, ckpt: Path, labels: np.ndarray, *extra: str, images: np.ndarray | None = None) -> list[str]:
    """``segment fit`` on two 16x16 images (or ``images``) with the given label maps; a flag repeated in
    ``extra`` (e.g. ``--out``) replaces the default, as argparse keeps the last one."""
    x = images if images is not None else np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    return ["segment", "fit", str(ckpt), "--images", _npy(tmp, x, "x.npy"), "--labels", _npy(tmp, labels, "y.npy"),
            "--nodes", "up.2", "--timesteps", "5", "--members", "2", "--epochs", "1", "--out", str(tmp / "head"), *extra]


def _labels(values: list[int], n: int = 2, size: tuple[int, int] = (16, 16), dtype=np.int64) -> np.ndarray:
    """Label maps whose pixels cycle through ``values``."""
    return np.resize(np.asarray(values, dtype=dtype), (n, *size))


def _head(tmp: Path, ckpt: Path, nan: bool = False) -> str:
    """A head folder as `segment fit` writes it (descriptors of node up.2: 8 features), fitted on random data."""
    import torch

    from diffrep.heads import PixelClassifier

    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    clf = PixelClassifier(num_classes=2, n_members=2, epochs=1, max_pixels_in_memory=64).fit(x, _labels([0, 1]))
    if nan:
        with torch.no_grad():
            clf.ensemble_.weights[0][0, 0, 0] = float("nan")
    clf.save(tmp / "head", metadata={"backbone": str(ckpt), "nodes": ["up.2"], "timesteps": [5], "noise": "shared",
                                     "seed": 0})
    return str(tmp / "head")


def _garbled_head(tmp: Path, ckpt: Path) -> str:
    head = _head(tmp, ckpt)
    (Path(head) / "config.json").write_text("{garbled")
    return head


def _predict(head: str, images: str, out: str, *extra: str) -> list[str]:
    return ["segment", "predict", head, "--images", images, "--out", out, *extra]


def _images(tmp: Path, channels: int | None = None) -> str:
    shape = (2, 16, 16) if channels is None else (2, channels, 16, 16)
    return _npy(tmp, np.random.default_rng(1).random(shape).astype(np.float32), "x.npy")


CASES_SEGMENT = [
    Case("segment-fit-labels-10-to-13", lambda tmp, ckpt: _fit(tmp, ckpt, _labels([10, 11, 12, 13])),
         r"--labels .*y\.npy: expected labels 0..C-1 .*found labels \[10, 11, 12, 13\].*--num-classes"),
    Case("segment-fit-label-255-without-ignore-index", lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0, 1, 255])),
         r"y\.npy: expected labels 0..C-1 .*found labels \[0, 1, 255\].*--ignore-index"),
    Case("segment-fit-labels-beyond-num-classes",
         lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0, 1, 2, 3]), "--num-classes", "3"),
         r"y\.npy: expected labels in 0..2 \(--num-classes 3\), found labels \[0, 1, 2, 3\], out of range: \[3\]"),
    Case("segment-fit-num-classes-1", lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0]), "--num-classes", "1"),
         r"--num-classes: expected an integer >= 2 \(the number of classes\), got 1"),
    Case("segment-fit-every-pixel-ignored",
         lambda tmp, ckpt: _fit(tmp, ckpt, _labels([255]), "--ignore-index", "255"),
         r"y\.npy: expected at least one labelled pixel, got none \(every pixel is --ignore-index 255\)"),
    Case("segment-fit-empty-label-set", lambda tmp, ckpt: _fit(tmp, ckpt, np.zeros((0, 16, 16), np.int64)),
         r"y\.npy: expected at least one label map \(N >= 1\), got N = 0"),
    Case("segment-fit-labels-of-another-size", lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0, 1], size=(16, 12))),
         r"y\.npy: expected label maps of the image size \(16, 16\), got \(16, 12\)"),
    Case("segment-fit-float-labels", lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0.0, 1.0], dtype=np.float32)),
         r"y\.npy: expected an integer label map, got dtype torch\.float32"),
    Case("segment-fit-labels-not-npy",
         lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0, 1]), "--labels", str(tmp / "y.txt")),
         r"--labels: expected a \.npy file of label maps \(N, H, W\), got .*y\.txt"),
    Case("segment-fit-labels-corrupt",
         lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0, 1]), "--labels", _bytes(tmp, "bad.npy", b"\x93NUMPY garbage")),
         r"--labels .*bad\.npy: expected a readable \.npy array"),
    Case("segment-fit-images-the-unet-cannot-take",
         lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0, 1], size=(18, 18)),
                                images=np.zeros((2, 18, 18), np.float32)),
         r"--images .*x\.npy: every spatial size must be divisible by 4"),
    Case("segment-fit-head-already-fitted",
         lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0, 1]), "--out", _head(tmp, ckpt)),
         r"--out .*head: expected a folder without a fitted head, it already holds config\.json, state\.safetensors; "
         r"pass --overwrite"),
    Case("segment-fit-out-is-a-file",
         lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0, 1]), "--out", str(tmp / "x.npy")),
         r"--out .*x\.npy: expected a folder for state\.safetensors \+ config\.json, got an existing file"),
    Case("segment-predict-missing-head",
         lambda tmp, ckpt: _predict(str(tmp / "nohead"), _images(tmp), str(tmp / "pred.npy")),
         r"expected .*nohead/config\.json \(or an earlier head\.json\), it does not exist"),
    Case("segment-predict-garbled-head",
         lambda tmp, ckpt: _predict(_garbled_head(tmp, ckpt), _images(tmp), str(tmp / "pred.npy")),
         r"head/config\.json: expected the JSON written by save_fitted"),
    Case("segment-predict-nan-head", lambda tmp, ckpt: _predict(_head(tmp, ckpt, nan=True), _images(tmp),
                                                                str(tmp / "pred.npy")),
         r"head/state\.safetensors: expected finite values, got NaN/Inf"),
    Case("segment-predict-wrong-channel-count",
         lambda tmp, ckpt: _predict(_head(tmp, ckpt), _images(tmp, channels=3), str(tmp / "pred.npy")),
         r"--images .*x\.npy: expected 1 channel\(s\) in dim 1, got 3"),
    Case("segment-predict-out-is-the-input",
         lambda tmp, ckpt: _predict(_head(tmp, ckpt), _images(tmp), str(tmp / "x.npy"), "--overwrite"),
         r"--out .*x\.npy: expected a new output file, got the input images"),
    Case("segment-predict-out-is-the-head",
         lambda tmp, ckpt: _predict(_head(tmp, ckpt), _images(tmp), str(tmp / "head" / "config.json"), "--overwrite"),
         r"--out .*config\.json: expected a new output file, got the head config"),
    Case("segment-predict-uncertainty-is-out",
         lambda tmp, ckpt: _predict(_head(tmp, ckpt), _images(tmp), str(tmp / "p.npy"), "--uncertainty",
                                    str(tmp / "p.npy")),
         r"--out .*p\.npy: expected a new output file, got the --uncertainty output"),
    Case("segment-predict-out-exists",
         lambda tmp, ckpt: _predict(_head(tmp, ckpt), _images(tmp), _npy(tmp, _labels([0, 1]), "truth.npy")),
         r"--out .*truth\.npy: expected a new file, but it already exists"),
    Case("segment-fit-device-absent", lambda tmp, ckpt: _fit(tmp, ckpt, _labels([0, 1]), "--device", "cuda:99"),
         r"device 'cuda:99': expected a (usable CUDA GPU|GPU index)"),
    Case("segment-predict-device-absent",
         lambda tmp, ckpt: _predict(_head(tmp, ckpt), _images(tmp), str(tmp / "p.npy"), "--device", "cuda:99"),
         r"device 'cuda:99': expected a (usable CUDA GPU|GPU index)"),
]

# ----------------------------------------------------------------------------------------- probe
def _probe(tmp: Path, ckpt: Path, *extra: str) -> list[str]:
    """argv of a probe run; every row is refused before the Fashion-MNIST files are needed."""
    options = {"--dataset": "fmnist", "--cache-dir": str(tmp / "cache"), "--timesteps": "1", "--quiet": None}
    options.update(dict(zip(extra[::2], extra[1::2])))
    argv = ["probe", "--backbone", str(ckpt)]
    for key, value in options.items():
        argv += [key] if value is None else [key, value]
    return argv


def _a_file(tmp: Path) -> str:
    (tmp / "cache-file").write_text("not a folder")
    return str(tmp / "cache-file")


CASES_PROBE: list[Case] = [
    Case("probe-pool-grid-too-large", lambda tmp, ckpt: _probe(tmp, ckpt, "--pool-grid", "100"),
         r"pool grid: expected at most 7, .*node 'down\.2' gives 7x7 maps for 28x28 images.*got 100"),
    Case("probe-pool-grid-zero", lambda tmp, ckpt: _probe(tmp, ckpt, "--pool-grid", "0"),
         r"pool grid: expected an integer >= 1, got 0"),
    Case("probe-cache-dir-is-a-file", lambda tmp, ckpt: _probe(tmp, ckpt, "--cache-dir", _a_file(tmp)),
         r"--cache-dir: .*cache-file is an existing file; expected a directory"),
    Case("probe-timestep-out-of-range", lambda tmp, ckpt: _probe(tmp, ckpt, "--timesteps", "-1"),
         r"timesteps: expected integers in 0\.\.999 .*got -1"),
    Case("probe-unknown-noise", lambda tmp, ckpt: _probe(tmp, ckpt, "--noise", "ensemble(0)"),
         r"noise: expected .*got 'ensemble\(0\)'"),
    Case("probe-batch-size-0", lambda tmp, ckpt: _probe(tmp, ckpt, "--batch-size", "0"),
         r"--batch-size: expected an integer >= 1, got 0"),
    Case("probe-unknown-node", lambda tmp, ckpt: _probe(tmp, ckpt, "--nodes", "up.9"),
         r"unknown node name\(s\) \['up\.9'\]; valid names are"),
    Case("probe-out-is-a-file", lambda tmp, ckpt: _probe(tmp, ckpt, "--out", _a_file(tmp)),
         r"--out: .*cache-file is an existing file; expected a directory"),
    Case("probe-val-fraction-out-of-range", lambda tmp, ckpt: _probe(tmp, ckpt, "--val-fraction", "1.5"),
         r"--val-fraction: expected a number in \(0, 1\), got 1\.5"),
    Case("probe-device-absent", lambda tmp, ckpt: _probe(tmp, ckpt, "--device", "cuda:99"),
         r"device 'cuda:99': expected a (usable CUDA GPU|GPU index)"),
]

# ------------------------------------------------------------------------------------- likelihood
def _likelihood(tmp: Path, ckpt: Path | str, *extra: str, input: str | None = None) -> list[str]:
    """argv of a valid likelihood call on two 16x16 images in [0, 1], with ``extra`` options overriding."""
    input = input or _npy(tmp, np.full((2, 16, 16), 0.5, np.float32))
    options = {"--method": "vlb", "--out": str(tmp / "s.csv")}
    options.update(dict(zip(extra[::2], extra[1::2])))
    return ["likelihood", str(ckpt), input, "--quiet"] + [item for pair in options.items() for item in pair]


def _existing_csv(tmp: Path) -> str:
    (tmp / "s.csv").write_text("image,index\nold,0\n")
    return str(tmp / "s.csv")


CASES_LIKELIHOOD = [
    Case("likelihood-unknown-method", lambda tmp, ckpt: _likelihood(tmp, ckpt, "--method", "flow"),
         r"--method: expected one of \['vlb', 'ode'\], got 'flow'"),
    Case("likelihood-negative-tolerance", lambda tmp, ckpt: _likelihood(tmp, ckpt, "--method", "ode") + ["--rtol=-1e-5"],
         r"--rtol: expected a finite number > 0, got -1e-05"),
    Case("likelihood-hutchinson-0", lambda tmp, ckpt: _likelihood(tmp, ckpt, "--method", "ode", "--hutchinson", "0"),
         r"--hutchinson: expected an integer >= 1, got 0"),
    Case("likelihood-out-exists-without-overwrite", lambda tmp, ckpt: _likelihood(tmp, ckpt, "--out", _existing_csv(tmp)),
         r"--out .*s\.csv: expected a new file, but it already exists; replace it with --overwrite"),
    Case("likelihood-out-is-the-input", lambda tmp, ckpt: _likelihood(
        tmp, ckpt, "--out", _existing_csv(tmp), "--overwrite", input=str(tmp / "s.csv")),
         r"--out .*s\.csv: expected a new output file, got the input .*s\.csv itself"),
    Case("likelihood-out-not-csv", lambda tmp, ckpt: _likelihood(tmp, ckpt, "--out", str(tmp / "s.npy")),
         r"--out: expected a \.csv file name, got 's\.npy'"),
    Case("likelihood-missing-input", lambda tmp, ckpt: _likelihood(tmp, ckpt, input=str(tmp / "missing.npy")),
         r"missing\.npy does not exist; expected a \.npy file, a folder of images or a NIfTI volume"),
    Case("likelihood-images-of-another-size", lambda tmp, ckpt: _likelihood(
        tmp, _broken_ckpt(tmp, ckpt, _trained_on_16), input=_npy(tmp, np.zeros((2, 32, 32), np.float32))),
         r"x\.npy: expected images of the size the backbone was trained on \(16, 16\), got \(32, 32\)"),
    Case("likelihood-three-channel-npy", lambda tmp, ckpt: _likelihood(
        tmp, ckpt, input=_npy(tmp, np.zeros((2, 3, 16, 16), np.float32))),
         r"x\.npy: expected 1 channel\(s\) in dim 1, got 3"),
    Case("likelihood-rgb-into-grey-model", lambda tmp, ckpt: _likelihood(tmp, ckpt, input=_folder(
        tmp, {"colour.png": np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 2
                                     + [np.zeros((16, 16), np.uint8)], axis=-1)})),
         r"colour\.png is RGB but the backbone takes 1 channel"),
    Case("likelihood-nifti-without-a-slice-size", lambda tmp, ckpt: _likelihood(tmp, ckpt, input=_nifti(tmp)),
         r"scan\.nii\.gz: slicing a NIfTI needs a slice size; the backbone records no training size, expected --size"),
    Case("likelihood-nifti-into-two-channel-model", lambda tmp, ckpt: _likelihood(
        tmp, _two_channel_checkpoint(tmp), "--size", "16", input=_nifti(tmp)),
         r"scan\.nii\.gz: NIfTI slices are 1-channel 2D images; expected a 1-channel 2D backbone, got 2 channel"),
    Case("likelihood-threads-0", lambda tmp, ckpt: _likelihood(tmp, ckpt, "--threads", "0"),
         r"--threads: expected an integer >= 1, got 0"),
    Case("likelihood-device-garbled", lambda tmp, ckpt: _likelihood(tmp, ckpt, "--device", "gpu0"),
         r"device: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu0'"),
]

CASES = (CASES_NODES + CASES_EXTRACT + CASES_TRAIN + CASES_IMPORT + CASES_ANOMALY + CASES_SEGMENT + CASES_PROBE
         + CASES_LIKELIHOOD)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_clear_message_and_changes_nothing(case: Case, tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "ckpt"
    save_backbone(make_backbone("2d-3level-attn"), checkpoint)
    argv = case.make(tmp_path, checkpoint)
    before = _snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"{case.id}: exit {code}, stderr:\n{err}"
    assert re.search(case.match, err, flags=re.S), f"{case.id}: message does not match {case.match!r}:\n{err}"
    assert "Traceback" not in err
    after = _snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before, f"{case.id}: an existing file was changed or removed"
    if not case.may_write:
        assert set(after) == set(before), f"{case.id}: wrote {sorted(set(after) - set(before))}"


def test_the_table_covers_every_command() -> None:
    """At least 40 bad inputs, and every command of the CLI has rows."""
    from diffrep.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices) - {"zoo", "demo"}
    uncovered = {cmd for cmd in commands if not any(c.id.startswith(cmd + "-") for c in CASES)}
    assert len(CASES) >= 40, f"only {len(CASES)} rows"
    assert not uncovered, f"commands without rows: {sorted(uncovered)}"

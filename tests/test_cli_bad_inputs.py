"""Every bad input to every command, in one table (issue 11).

Each row builds its inputs in a temporary folder and runs the command in-process. The command must
exit 2 with a message that names the offending file or value and what was expected, print no
traceback, change no file that existed before the call, and (unless the row says it may) write
nothing: a refusal comes before any work.
"""
from __future__ import annotations

import hashlib
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
         r"nowhere.*neither a checkpoint directory nor a shipped default"),
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
         r"batch_size: expected a positive integer, got 0"),
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
]

# ----------------------------------------------------------------------------------------- train
CASES_TRAIN: list[Case] = []

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
CASES_ANOMALY: list[Case] = []

# --------------------------------------------------------------------------------------- segment
CASES_SEGMENT: list[Case] = []

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
         r"pool grid: expected a positive integer .*got 0"),
    Case("probe-cache-dir-is-a-file", lambda tmp, ckpt: _probe(tmp, ckpt, "--cache-dir", _a_file(tmp)),
         r"--cache-dir: .*cache-file is an existing file; expected a directory"),
    Case("probe-timestep-out-of-range", lambda tmp, ckpt: _probe(tmp, ckpt, "--timesteps", "-1"),
         r"timesteps: expected integers in 0\.\.999 .*got -1"),
    Case("probe-unknown-noise", lambda tmp, ckpt: _probe(tmp, ckpt, "--noise", "ensemble(0)"),
         r"noise: expected .*got 'ensemble\(0\)'"),
    Case("probe-batch-size-0", lambda tmp, ckpt: _probe(tmp, ckpt, "--batch-size", "0"),
         r"--batch-size: expected a positive integer, got 0"),
    Case("probe-unknown-node", lambda tmp, ckpt: _probe(tmp, ckpt, "--nodes", "up.9"),
         r"unknown node name\(s\) \['up\.9'\]; valid names are"),
    Case("probe-out-is-a-file", lambda tmp, ckpt: _probe(tmp, ckpt, "--out", _a_file(tmp)),
         r"--out: .*cache-file is an existing file; expected a directory"),
    Case("probe-val-fraction-out-of-range", lambda tmp, ckpt: _probe(tmp, ckpt, "--val-fraction", "1.5"),
         r"--val-fraction: expected a number in \(0, 1\), got 1\.5"),
]

CASES = CASES_NODES + CASES_EXTRACT + CASES_TRAIN + CASES_IMPORT + CASES_ANOMALY + CASES_SEGMENT + CASES_PROBE


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

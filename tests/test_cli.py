"""The diffrep command: nodes, extract (.npy and PNG folders), zoo, and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffrep.backbones import save_backbone
from diffrep.cli import main

from .conftest import make_backbone


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    save_backbone(make_backbone("2d-3level-attn"), path)
    return path


def test_nodes_table_and_json(checkpoint, capsys):
    assert main(["nodes", str(checkpoint)]) == 0
    table = capsys.readouterr().out
    assert "down.0" in table and "mid" in table and "up.2" in table
    assert main(["nodes", str(checkpoint), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["down.0", "down.1", "down.2", "mid", "up.0", "up.1", "up.2"]
    assert rows[1] == {"name": "down.1", "channels": 16, "stride": 2, "stage": "down"}


def test_extract_npy_writes_features_and_metadata(checkpoint, tmp_path):
    images = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "feats.safetensors"
    assert main(["extract", str(checkpoint), str(tmp_path / "x.npy"), "--nodes", "mid", "up.1",
                 "--timesteps", "10", "100", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as handle:
        assert sorted(handle.keys()) == ["mid@10", "mid@100", "up.1@10", "up.1@100"]
        assert tuple(handle.get_tensor("up.1@10").shape) == (3, 16, 16, 16)
        meta = json.loads(handle.metadata()["diffrep"])
    assert meta["noise"] == "shared" and {k["timestep"] for k in meta["keys"]} == {10, 100}
    assert all(0 < k["noise_level"] < 1 for k in meta["keys"])


def test_extract_png_folder(checkpoint, tmp_path):
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((16, 16)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(checkpoint), str(folder), "--nodes", "down.0", "--timesteps", "0", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as handle:
        assert tuple(handle.get_tensor("down.0@0").shape) == (2, 8, 16, 16)


def test_cli_errors_are_clear(checkpoint, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 16, 16), np.float32))
    assert main(["extract", str(checkpoint), str(tmp_path / "x.npy"), "--nodes", "bogus", "--timesteps", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "valid names are" in capsys.readouterr().err
    assert main(["extract", str(checkpoint), str(tmp_path / "missing.npy"), "--nodes", "mid", "--timesteps", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["nodes", str(tmp_path / "nowhere")]) == 2
    assert "neither a checkpoint directory, a shipped default nor a Hub id" in capsys.readouterr().err


# The shipped defaults with what the README records for them: training steps of the shipped run and
# the held-out eps-MSE at t = 10 (README "Shipped defaults" tables, 4 decimals).
SHIPPED = {"brain-ddpm": {"steps": 7000, "dataset": "mni152-2009a-axial", "loss_t10": 0.5037},
           "fmnist-ddpm": {"steps": 4000, "dataset": "fashion-mnist", "loss_t10": 0.3489},
           "fmnist-ddpm-long": {"steps": 2000, "dataset": "fashion-mnist", "loss_t10": 0.3451}}


def test_zoo_lists_entries(capsys):
    assert main(["zoo", "--json"]) == 0
    entries = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert sorted(entries) == sorted(SHIPPED)
    for name, expected in SHIPPED.items():
        entry, provenance = entries[name], entries[name]["provenance"]
        assert sorted(p.name for p in Path(entry["path"]).iterdir()) == ["config.json", "model.safetensors"]
        assert provenance["complete"] is True and provenance["weights"] == "EMA"
        assert provenance["recipe"]["name"] == name and provenance["steps"] == expected["steps"]
        assert provenance["data"]["dataset"] == expected["dataset"]
        assert set(provenance["heldout_loss"]) == {"10", "100", "250", "500", "900"}
        assert round(provenance["heldout_loss"]["10"], 4) == expected["loss_t10"]
        assert all(0.95 < v < 1.05 for v in provenance["heldout_loss_fresh_init"].values())
        assert {"torch", "monai", "python"} <= set(provenance["versions"])
    assert entries["fmnist-ddpm-long"]["provenance"]["recipe"]["init_from"] == "runs/fmnist-ddpm/train_state.pt"


def test_extract_float16_streams_to_one_file(checkpoint, tmp_path):
    images = np.random.default_rng(1).random((5, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "f16.safetensors"
    assert main(["extract", str(checkpoint), str(tmp_path / "x.npy"), "--nodes", "mid", "--timesteps", "10",
                 "--batch-size", "2", "--dtype", "float16", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as handle:
        assert handle.get_tensor("mid@10").dtype == torch.float16 and handle.get_tensor("mid@10").shape[0] == 5
    assert not list(tmp_path.glob("*.partial*"))

"""``diffrep likelihood``: the CSV's rows are the library's values, for arrays, image folders and NIfTI slices."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrep.anomaly import LikelihoodScorer
from diffrep.backbones import Backbone, BackboneConfig, load_backbone, save_backbone
from diffrep.backbones.config import ScheduleConfig
from diffrep.cli import main
from diffrep.pipelines.likelihood import CSV_COLUMNS, read_likelihood_inputs

from .conftest import TINY_CONFIGS, informative_init_


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny U-Net with a 20-step schedule (the VLB costs 20 calls) that records its training size, 16."""
    torch.manual_seed(0)
    config = BackboneConfig(unet=TINY_CONFIGS["2d-2level"], provenance={"image_size": 16},
                            schedule=ScheduleConfig(num_train_timesteps=20, beta_start=1e-3, beta_end=0.3))
    backbone = Backbone(config)
    informative_init_(backbone.unet)
    save_backbone(backbone, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and tuple(rows[0]) == CSV_COLUMNS
    return rows


def _library(checkpoint: Path, images: torch.Tensor, **params) -> dict[str, np.ndarray]:
    return LikelihoodScorer(load_backbone(checkpoint), **params).nll_table(images)


def _assert_rows_match(rows: list[dict[str, str]], table: dict[str, np.ndarray], method: str, seed: int) -> None:
    for i, row in enumerate(rows):
        assert int(row["index"]) == i and row["method"] == method and int(row["seed"]) == seed
        for column in ("nll_bits_per_dim", "png_bits_per_dim", "corrected_bits_per_dim"):
            assert float(row[column]) == table[column][i], (i, column)  # written at repr precision
        assert int(row["unet_calls"]) == table["unet_calls"][i]


def test_npy_rows_are_the_library_values_and_overwrite_replaces(tmp_path, checkpoint, capsys):
    x = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = ["likelihood", str(checkpoint), str(tmp_path / "x.npy"), "--method", "vlb", "--seed", "2",
            "--out", str(tmp_path / "s.csv"), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 row(s)" in printed and "20 U-Net call(s) per image" in printed
    rows = _read(tmp_path / "s.csv")
    assert [r["image"] for r in rows] == ["x.npy[0]", "x.npy[1]", "x.npy[2]"]
    _assert_rows_match(rows, _library(checkpoint, torch.from_numpy(x[:, None]), seed=2), "vlb", 2)
    assert main(argv) == 2  # an existing output is kept...
    assert main(argv[:-1] + ["--seed", "3", "--overwrite", "--quiet"]) == 0  # ...unless --overwrite
    assert int(_read(tmp_path / "s.csv")[0]["seed"]) == 3


def test_folder_rows_are_named_by_file_and_the_ode_reports_its_calls(tmp_path, checkpoint):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(1)
    for name in ("b.png", "a.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "imgs" / name)
    argv = ["likelihood", str(checkpoint), str(tmp_path / "imgs"), "--method", "ode", "--hutchinson", "2",
            "--rtol", "1e-2", "--atol", "1e-2", "--out", str(tmp_path / "s.csv"), "--quiet"]
    assert main(argv) == 0
    rows = _read(tmp_path / "s.csv")
    assert [r["image"] for r in rows] == ["a.png", "b.png"]
    images = read_likelihood_inputs(tmp_path / "imgs", load_backbone(checkpoint)).images
    table = _library(checkpoint, images, method="ode", hutchinson=2, rtol=1e-2, atol=1e-2)
    _assert_rows_match(rows, table, "ode", 0)
    assert int(rows[0]["unet_calls"]) > 0


def test_nifti_slices_are_scored_as_the_brain_slices_are_made(tmp_path, checkpoint):
    import nibabel as nib

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (24, 24, 6)], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.8
    nib.save(nib.Nifti1Image(((100 + 50 * grid[0]) * inside).astype(np.int16), np.eye(4)), str(tmp_path / "scan.nii.gz"))
    assert main(["likelihood", str(checkpoint), str(tmp_path / "scan.nii.gz"), "--method", "vlb",
                 "--out", str(tmp_path / "s.csv"), "--quiet"]) == 0
    rows = _read(tmp_path / "s.csv")
    inputs = read_likelihood_inputs(tmp_path / "scan.nii.gz", load_backbone(checkpoint))
    assert inputs.images.shape[2:] == (16, 16) and [r["image"] for r in rows] == inputs.names
    assert all(name.startswith("scan.nii.gz:z=") for name in inputs.names)
    _assert_rows_match(rows, _library(checkpoint, inputs.images), "vlb", 0)


def test_the_command_is_registered_and_its_vocabulary_is_the_library_one():
    from diffrep.anomaly import likelihood_scores
    from diffrep.cli import build_parser
    from diffrep.cli import likelihood as cli

    assert cli.METHODS == likelihood_scores.METHODS and cli.TRACES == likelihood_scores.TRACES
    assert "likelihood" in build_parser()._subparsers._group_actions[0].choices


def test_continuous_data_reach_the_library(tmp_path, checkpoint):
    x = np.random.default_rng(3).random((2, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = ["likelihood", str(checkpoint), str(tmp_path / "x.npy"), "--method", "vlb", "--continuous",
            "--out", str(tmp_path / "s.csv"), "--quiet"]
    assert main(argv) == 0
    table = _library(checkpoint, torch.from_numpy(x[:, None]), eight_bit=False)
    _assert_rows_match(_read(tmp_path / "s.csv"), table, "vlb", 0)
    eight_bit = _library(checkpoint, torch.from_numpy(x[:, None]))
    assert not np.allclose(eight_bit["nll_bits_per_dim"], table["nll_bits_per_dim"])  # the flag changed the model
    assert main(argv[:-3] + ["--trace", "sparse", "--out", str(tmp_path / "t.csv")]) == 2


@pytest.mark.slow
def test_the_exact_trace_reaches_the_library(tmp_path, checkpoint):
    """The exact divergence (one vector-Jacobian product per dimension, ~30 s here): one image, loose tolerances."""
    x = np.random.default_rng(3).random((2, 16, 16)).astype(np.float32)
    exact = ["likelihood", str(checkpoint), str(tmp_path / "x.npy"), "--method", "ode", "--trace", "exact",
             "--rtol", "0.1", "--atol", "0.1", "--out", str(tmp_path / "e.csv"), "--quiet"]
    np.save(tmp_path / "x.npy", x[:1])
    assert main(exact) == 0
    table = _library(checkpoint, torch.from_numpy(x[:1, None]), method="ode", trace="exact", rtol=0.1, atol=0.1)
    _assert_rows_match(_read(tmp_path / "e.csv"), table, "ode", 0)

"""benchmarks/likelihood.py in quick mode on tiny U-Nets with a 20-step schedule (real Fashion-MNIST and MNI152)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrep.backbones import Backbone, BackboneConfig
from diffrep.backbones.config import ScheduleConfig

from .conftest import TINY_CONFIGS, informative_init_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import likelihood as bench  # noqa: E402
import ood_sets  # noqa: E402


def _available() -> bool:
    try:
        from diffrep.data.brain import find_mni152
        from diffrep.data.fashion_mnist import find_fashion_mnist

        find_fashion_mnist()
        find_mni152()
    except (FileNotFoundError, ModuleNotFoundError):
        return False
    return True


needs_data = pytest.mark.skipif(not _available(), reason="Fashion-MNIST IDX files or nilearn's MNI152 not installed")


def _tiny(folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    config = BackboneConfig(unet=TINY_CONFIGS["2d-2level"],
                            schedule=ScheduleConfig(num_train_timesteps=20, beta_start=1e-3, beta_end=0.3))
    backbone = Backbone(config)
    informative_init_(backbone.unet)
    backbone.save(folder)
    return str(folder)


def test_settings_follow_the_quick_full_scheme_and_the_target_is_declared():
    assert bench.parse_args([]).settings == bench.FULL
    assert bench.parse_args(["--quick"]).settings == {**bench.FULL, **bench.QUICK}
    assert bench.parse_args(["--quick", "--ood-images", "7"]).settings["ood_images"] == 7
    assert bench.TARGET["score"] in bench.SCORES and bench.TARGET["method"] in ("vlb", "ode")
    assert bench.FULL["ood_method"] == bench.TARGET["method"]


def test_ood_sets_are_seeded_8_bit_and_of_the_size_asked():
    for name, make in ood_sets.SETS.items():
        if name in ("brain", "fashion") and not _available():
            continue
        images = make(3, 28, 5)
        assert images.shape == (3, 1, 28, 28) and images.dtype == np.float32, name
        np.testing.assert_array_equal(images, make(3, 28, 5))
        np.testing.assert_allclose(images * 255, np.rint(images * 255), atol=1e-4)
        assert images.min() >= 0 and images.max() <= 1


@needs_data
def test_quick_benchmark_writes_every_section(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BRAIN_SIZE", 32)  # the tiny U-Net takes any size: keep the brain part fast
    out = tmp_path / "likelihood.json"
    payload = bench.main(["--quick", "--backbone", _tiny(tmp_path / "f", 0), "--brain-backbone", _tiny(tmp_path / "b", 1),
                          "--reconstruction-timestep", "10", "--out", str(out), "--quiet"])
    on_disk = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    for key in ("command", "config", "seed", "versions", "bits_per_dim", "ood", "targets", "wall_seconds"):
        assert key in on_disk, key
    bpd = on_disk["bits_per_dim"]
    assert bpd["vlb"]["unet_calls_per_image"] == 20 and bpd["ode"]["unet_calls_per_image"] > 0
    for method in ("vlb", "ode"):
        assert np.isfinite(bpd[method]["bits_per_dim"]["mean"]) and bpd[method]["noise"]["per_image_std_mean"] > 0
    assert set(on_disk["ood"]) == {"fmnist-ddpm", "brain-ddpm"}
    for model, sets in (("fmnist-ddpm", bench.FMNIST_SETS), ("brain-ddpm", bench.BRAIN_SETS)):
        section = on_disk["ood"][model]
        assert set(section["pairs"]) == set(sets)
        for pair in section["pairs"].values():
            assert set(pair["image_auroc"]) == set(bench.SCORES)
            assert all(0.0 <= v <= 1.0 for v in pair["image_auroc"].values())
            assert all(g is None or 0.0 <= g["auroc"] <= 1.0 for g in pair["typicality_groups"])
    # the in-distribution scores of the OOD part are part 1's VLB table, not a second computation
    assert on_disk["ood"]["fmnist-ddpm"]["sets"]["test"]["nll_bits_per_dim"] == pytest.approx(bpd["vlb"]["bits_per_dim"]["mean"])
    targets = on_disk["targets"]
    assert len(targets["pairs"]) == len(bench.FMNIST_SETS) + len(bench.BRAIN_SETS)
    assert targets["all_pass"] == (targets["failing"] == [])
    assert all("why" in row for row in targets["failing"])
    assert payload["targets"] == targets

"""benchmarks/throughput.py (the prepared GPU benchmark) runs on CPU and writes rows with their reference."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import throughput  # noqa: E402


def test_quick_cpu_run_writes_rows_and_speedups(tmp_path):
    out = tmp_path / "t.json"
    throughput.main(["--quick", "--device", "cpu", "--variants", "float32", "channels_last", "--threads", "1",
                     "--out", str(out)])
    payload = json.loads(out.read_text())
    assert [(r["model"], r["variant"]) for r in payload["rows"]] == [("fmnist-ddpm", "float32"),
                                                                      ("fmnist-ddpm", "channels_last")]
    assert [r["model"] for r in payload["reference_rows"]] == ["fmnist-ddpm"]
    for row in payload["rows"]:
        assert row["device"] == "cpu" and row["image_size"] == [28, 28] and row["nodes"] == 7
        assert row["extraction"]["repeats"] == 2 and row["training"]["repeats"] == 2
        ext, ref = row["extraction"], payload["reference_rows"][0]["extraction"]
        assert ext["images_per_s"] == pytest.approx(4 / ext["median_s"])
        assert row["speedup_vs_reference"]["extraction"] == pytest.approx(ext["images_per_s"] / ref["images_per_s"])
    assert payload["rows"][1]["compute"] == {"autocast": None, "channels_last": True}
    assert payload["config"]["device"] == "cpu" and "command" in payload and "versions" in payload


def test_the_cifar_architecture_is_ddpm_cifar10_32s_size():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DModel(**throughput.CIFAR_UNET)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307  # google/ddpm-cifar10-32: 35.7M


def test_an_absent_device_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"device 'cuda:99': expected a (usable CUDA GPU|GPU index)"):
        throughput.parse_args(["--device", "cuda:99"])

"""Streaming extraction to one safetensors file: equal to the in-memory path, resumable, bounded by a chunk."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffrep import FeatureExtractor
from diffrep.compute import ComputeOptions
from diffrep.features.io import extract_to_file, save_features

from .conftest import free_port, make_backbone, make_images

NODES, TIMESTEPS = ["down.1", "mid", "up.2"], [10, 300]


def _read(path):
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, json.loads(handle.metadata()["diffrep"])


def test_streamed_file_equals_the_in_memory_file_bit_for_bit(tmp_path):
    backbone = make_backbone("2d-3level-attn")
    images = make_images(backbone, n=7)
    streamed = extract_to_file(backbone, images, NODES, TIMESTEPS, tmp_path / "s.safetensors", seed=2, batch_size=4)
    reference = save_features(FeatureExtractor(backbone, NODES, TIMESTEPS, seed=2, batch_size=4)(images),
                              tmp_path / "r.safetensors")
    (a, meta_a), (b, meta_b) = _read(streamed), _read(reference)
    assert sorted(a) == sorted(b) == sorted(f"{n}@{t}" for n in NODES for t in TIMESTEPS)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    by_key = lambda meta: {(k["node"], k["timestep"]): k for k in meta["keys"]}  # noqa: E731
    assert by_key(meta_a) == by_key(meta_b) and meta_a["seed"] == 2 and meta_a["noise"] == "shared"
    assert not list(tmp_path.glob("*.partial*"))


def test_memory_mapped_npy_and_float16(tmp_path):
    backbone = make_backbone("2d-2level")
    images = make_images(backbone, n=5).numpy()
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    out = extract_to_file(backbone, mapped, ["mid"], [50], tmp_path / "f16", batch_size=2, dtype=torch.float16)
    assert out.name == "f16.safetensors"
    values, _ = _read(out)
    full = FeatureExtractor(backbone, ["mid"], [50], batch_size=2)(torch.from_numpy(images))[("mid", 50)]
    assert values["mid@50"].dtype == torch.float16
    torch.testing.assert_close(values["mid@50"], full.half())


def test_a_killed_run_resumes_with_only_the_missing_chunks_and_identical_bytes(tmp_path, monkeypatch):
    backbone = make_backbone("2d-2level")
    images = make_images(backbone, n=9)
    target = tmp_path / "out.safetensors"
    clean = extract_to_file(backbone, images, NODES[:2], TIMESTEPS, tmp_path / "clean.safetensors", batch_size=2)

    calls = []
    original = FeatureExtractor.__call__

    def dies_at_third(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill between chunks would
        return original(self, batch)

    monkeypatch.setattr(FeatureExtractor, "__call__", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(backbone, images, NODES[:2], TIMESTEPS, target, batch_size=2)
    assert not target.exists() and (tmp_path / "out.safetensors.partial").is_file()
    calls.clear()
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, batch: calls.append(len(batch)) or original(self, batch))
    extract_to_file(backbone, images, NODES[:2], TIMESTEPS, target, batch_size=2)
    assert calls == [2, 2, 1]  # chunks of batch_size = 2 images (x 2 timesteps per forward): only chunks 2, 3, 4 again
    assert target.read_bytes() == clean.read_bytes()
    assert not list(tmp_path.glob("*.partial*"))


@pytest.mark.parametrize("other", [{"seed": 1}, {"compute": ComputeOptions(autocast="bfloat16")}],
                         ids=["another-seed", "bfloat16-autocast"])
def test_a_partial_file_from_other_settings_is_not_reused(other, tmp_path, monkeypatch):
    backbone = make_backbone("2d-2level")
    images = make_images(backbone, n=4)
    target = tmp_path / "o.safetensors"
    original = FeatureExtractor.__call__
    state = {"n": 0}

    def dies_at_second(self, batch):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(FeatureExtractor, "__call__", dies_at_second)
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(backbone, images, ["mid"], [10], target, seed=0, batch_size=2)
    monkeypatch.setattr(FeatureExtractor, "__call__", original)
    extract_to_file(backbone, images, ["mid"], [10], target, batch_size=2, **other)  # other settings: starts over
    fresh = extract_to_file(backbone, images, ["mid"], [10], tmp_path / "fresh.safetensors", batch_size=2, **other)
    assert target.read_bytes() == fresh.read_bytes()


def test_bad_images_are_refused_before_any_file_is_written(tmp_path):
    backbone = make_backbone("2d-2level")
    images = make_images(backbone, n=6)
    images[5, 0, 0, 0] = float("nan")  # in the last chunk
    with pytest.raises(ValueError, match="NaN/Inf"):
        extract_to_file(backbone, images, ["mid"], [10], tmp_path / "x.safetensors", batch_size=2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="non-empty"):
        extract_to_file(backbone, images[:0], ["mid"], [10], tmp_path / "x.safetensors")


def test_torchrun_two_processes_write_the_same_file_and_finish_a_single_process_partial(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node=2 -m diffrep.cli extract` (gloo, one thread each): the same bytes as one
    process; and it finishes a partial file left by a killed single-process run (resumed per chunk)."""
    import os
    import subprocess
    import sys

    from diffrep.backbones import save_backbone

    backbone = make_backbone("2d-3level-attn")
    save_backbone(backbone, tmp_path / "ckpt")
    images = make_images(backbone, n=9)
    np.save(tmp_path / "x.npy", images.numpy())
    args = ["extract", str(tmp_path / "ckpt"), str(tmp_path / "x.npy"), "--nodes", "down.1", "mid",
            "--timesteps", "10", "300", "--batch-size", "2"]  # 5 chunks of 2 images
    from diffrep.cli import main

    assert main(args + ["--out", str(tmp_path / "one.safetensors")]) == 0

    original = FeatureExtractor.__call__
    calls = []

    def dies_at_third(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(FeatureExtractor, "__call__", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(backbone, images, ["down.1", "mid"], [10, 300], tmp_path / "resumed.safetensors", batch_size=2)
    monkeypatch.setattr(FeatureExtractor, "__call__", original)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for name in ("two.safetensors", "resumed.safetensors"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "diffrep.cli", *args, "--out", str(tmp_path / name)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / name).read_bytes() == (tmp_path / "one.safetensors").read_bytes(), name
    assert not list(tmp_path.glob("*.partial*"))

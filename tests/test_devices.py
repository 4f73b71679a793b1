"""resolve_device: garbled, unsupported or absent devices are refused with a message naming them."""
from __future__ import annotations

import pytest
import torch

from diffrep.devices import resolve_device


def test_cpu_resolves():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu0", "", "CUDA", "cuda:-1"])
def test_garbled_device_strings_are_refused(name):
    with pytest.raises(ValueError, match=rf"device: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}"):
        resolve_device(name)


def test_unsupported_device_type_is_refused():
    with pytest.raises(ValueError, match=r"device 'meta': expected .* got device type 'meta'"):
        resolve_device("meta")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda': expected a usable CUDA GPU, but torch sees none"):
        resolve_device("cuda")


def test_cuda_index_beyond_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"device 'cuda:2': expected a GPU index in 0..1 \(2 visible\), got 2"):
        resolve_device("cuda:2")


def test_mps_without_apple_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'mps': expected an available Apple MPS device"):
        resolve_device("mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_gpu_resolves():
    assert resolve_device("cuda").type == "cuda"
    assert resolve_device(f"cuda:{torch.cuda.device_count() - 1}").type == "cuda"

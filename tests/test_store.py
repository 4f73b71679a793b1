"""FeatureStore: atomic chunks, resume after interruption, fingerprint keys that never read stale data."""
from __future__ import annotations

import pytest
import torch

from diffrep.features.store import FeatureStore


def test_fill_resumes_after_interruption(tmp_path):
    fingerprint = {"checkpoint": "abc", "nodes": ["mid"], "timesteps": [10], "seed": 0}
    calls = []

    def compute(i):
        calls.append(i)
        if i == 2 and len(calls) == 3:
            raise KeyboardInterrupt  # interrupted while computing chunk 2
        return {"x": torch.full((2, 3), float(i))}

    store = FeatureStore(tmp_path, fingerprint)
    with pytest.raises(KeyboardInterrupt):
        store.fill(4, compute)
    assert store.chunk_ids() == [0, 1]
    assert not list(store.path.glob("*.tmp"))
    calls.clear()
    FeatureStore(tmp_path, fingerprint).fill(4, compute)
    assert calls == [2, 3]
    values = torch.cat([store.read(i)["x"] for i in store.chunk_ids()])
    torch.testing.assert_close(values[:, 0], torch.tensor([0.0, 0, 1, 1, 2, 2, 3, 3]))


def test_different_fingerprint_never_reads_stale_chunks(tmp_path):
    a = FeatureStore(tmp_path, {"seed": 0}).fill(1, lambda i: {"x": torch.zeros(1)})
    b = FeatureStore(tmp_path, {"seed": 1})
    assert a.path != b.path and b.chunk_ids() == []
    with pytest.raises(KeyError, match="has not been written"):
        b.read(0)


def test_truncated_chunk_is_an_error_naming_the_chunk_file(tmp_path):
    store = FeatureStore(tmp_path, {"seed": 0}).fill(2, lambda i: {"x": torch.randn(50, 8)})
    chunk = store.path / "chunk-000001.safetensors"
    chunk.write_bytes(chunk.read_bytes()[:100])
    torch.testing.assert_close(store.read(0)["x"].shape, torch.Size([50, 8]))
    with pytest.raises(ValueError, match=r"chunk .*chunk-000001\.safetensors is unreadable .*delete that file"):
        store.read(1)
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON"):
        FeatureStore(tmp_path, {"seed": 0})


def test_a_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "cache").write_text("a file")
    with pytest.raises(ValueError, match=r"cache dir: .*cache is an existing file; expected a directory"):
        FeatureStore(tmp_path / "cache", {"seed": 0})
    assert (tmp_path / "cache").read_text() == "a file"

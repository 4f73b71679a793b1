"""PixelStore and BalancedPixelSampler: resume after interruption, balanced samples, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrep import FeatureExtractor
from diffrep.features.pixel_store import (ArrayPixels, BalancedPixelSampler, PixelStore, balanced_quotas,
                                          build_pixel_store)

from .conftest import make_backbone, make_images


class CountingExtractor(FeatureExtractor):
    """Records how many images each call computes; raises KeyboardInterrupt on call ``fail_on``."""

    def __init__(self, *args, fail_on: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []
        self.fail_on = fail_on

    def __call__(self, images):
        self.calls.append(int(images.shape[0]))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt
        return super().__call__(images)


def _extractor(**kwargs):
    return CountingExtractor(make_backbone("2d-2level"), ["down.1", "up.1"], [10, 200], seed=3,
                             dtype=torch.float16, **kwargs)


def _data(n=5):
    images = make_images(make_backbone("2d-2level"), n=n, size=16)
    labels = torch.randint(0, 3, (n, 16, 16), generator=torch.Generator().manual_seed(0))
    return images, labels


def test_interrupted_fill_resumes_and_computes_only_missing_images(tmp_path):
    images, labels = _data(5)
    interrupted = _extractor(fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        build_pixel_store(tmp_path / "a", interrupted, images, labels, num_classes=3, batch_size=2)
    assert interrupted.calls == [2, 2]  # first batch written, second interrupted
    resumed = _extractor()
    store = build_pixel_store(tmp_path / "a", resumed, images, labels, num_classes=3, batch_size=2)
    assert resumed.calls == [2, 1]  # only images 2, 3, 4
    assert store.complete() and not list(store.path.glob("*.tmp"))

    fresh = build_pixel_store(tmp_path / "b", _extractor(), images, labels, num_classes=3, batch_size=5)
    assert store.num_features == fresh.num_features == 16 * 2 + 8 * 2
    for i in range(5):
        (xa, ya), (xb, yb) = store.read(i), fresh.read(i)
        assert xa.dtype == torch.float16 and xa.shape == (48, 16, 16)
        torch.testing.assert_close(xa, xb, atol=2e-3, rtol=2e-3)
        assert torch.equal(ya, yb) and torch.equal(ya, labels[i])
        assert torch.equal(store.read_labels(i), labels[i])


def test_store_fingerprint_separates_data_and_rejects_unwritten_reads(tmp_path):
    images, labels = _data(3)
    a = build_pixel_store(tmp_path, _extractor(), images, labels, num_classes=3)
    b = PixelStore(tmp_path, dict(a.fingerprint, data="other"))
    assert a.path != b.path and b.missing() == [0, 1, 2]
    with pytest.raises(KeyError, match="has not been written"):
        b.read(0)


def test_balanced_quotas_give_small_classes_all_their_pixels():
    assert balanced_quotas(np.array([1000, 10, 1000]), 300).tolist() == [145, 10, 145]
    assert balanced_quotas(np.array([5, 0, 7]), 100).tolist() == [5, 0, 7]
    assert balanced_quotas(np.array([50, 50, 50]), 31).sum() == 31


def test_sampler_is_balanced_bounded_and_reproducible():
    labels = torch.zeros(6, 8, 8, dtype=torch.long)
    labels[:, :2, :2] = 1  # class 1: 4 pixels per image, class 0: 60
    x = torch.arange(6 * 8 * 8, dtype=torch.float32).reshape(6, 1, 8, 8).repeat(1, 3, 1, 1)
    sampler = BalancedPixelSampler(ArrayPixels(x, labels), num_classes=2, max_pixels=40, seed=1)
    xs, ys = sampler.sample(0)
    assert xs.shape == (40, 3) and xs.dtype == torch.float16
    assert (ys == 1).sum() == 20 and (ys == 0).sum() == 20
    # each sampled descriptor is the descriptor of a pixel with that label
    flat_x, flat_y = x[:, 0].reshape(-1), labels.reshape(-1)
    for value, label in zip(xs[:, 0].float().tolist(), ys.tolist()):
        assert flat_y[int(value)] == label and flat_x[int(value)] == value
    xs2, ys2 = BalancedPixelSampler(ArrayPixels(x, labels), 2, 40, seed=1).sample(0)
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)
    assert not torch.equal(sampler.sample(1)[0], xs)  # a new draw each epoch
    assert sampler.peak_bytes_ <= 40 * 3 * 2 + x[0].nbytes


@pytest.mark.parametrize("labels, match", [
    (torch.zeros(3, 8, 9, dtype=torch.long), r"expected label maps of the image size \(8, 8\), got \(8, 9\)"),
    (torch.zeros(2, 8, 8, dtype=torch.long), r"expected 3 label map\(s\), one per image, got 2"),
])
def test_array_pixels_bad_shapes(labels, match):
    with pytest.raises(ValueError, match=match):
        ArrayPixels(torch.zeros(3, 4, 8, 8), labels)


def test_store_rejects_out_of_range_labels_and_empty_input(tmp_path):
    images, labels = _data(2)
    labels[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"expected values in 0..2, got out-of-range value\(s\) \[7\]"):
        build_pixel_store(tmp_path, _extractor(), images, labels, num_classes=3)
    with pytest.raises(ValueError, match="N = 0"):
        ArrayPixels(torch.zeros(0, 4, 8, 8), torch.zeros(0, 8, 8, dtype=torch.long))


def test_truncated_pixel_chunk_is_an_error_naming_the_chunk_file(tmp_path):
    images, labels = _data(2)
    store = build_pixel_store(tmp_path, _extractor(), images, labels, num_classes=3)
    chunk = store.path / "chunk-000001.safetensors"
    chunk.write_bytes(chunk.read_bytes()[:64])
    store.read_labels(0)
    for read in (store.read, store.read_labels):
        with pytest.raises(ValueError, match=r"chunk-000001\.safetensors is unreadable"):
            read(1)


def test_other_feature_code_gets_another_store(tmp_path, monkeypatch):
    """The store is keyed by the code that computes descriptors: after an edit it is recomputed."""
    import diffrep.features.pixel_store as pixel_store_module

    images, labels = _data(2)
    first = build_pixel_store(tmp_path, _extractor(), images, labels, num_classes=3, batch_size=2)
    again = _extractor()
    assert build_pixel_store(tmp_path, again, images, labels, num_classes=3, batch_size=2).path == first.path
    assert again.calls == []
    monkeypatch.setattr(pixel_store_module, "feature_code_digest", lambda: "other-code")
    other = _extractor()
    assert build_pixel_store(tmp_path, other, images, labels, num_classes=3, batch_size=2).path != first.path
    assert other.calls == [2]

"""benchmarks/noise_seeds.py: the chosen keys under other noise seeds, and the spread's two parts."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from diffrep._types import FeatureKey
from diffrep.features.cache import cached_pooled_features

from .conftest import make_backbone, make_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from noise_seeds import chosen_keys, features_at_noise_seed, seed_stats, spread_parts  # noqa: E402


def test_spread_parts_match_a_hand_computation():
    values = {(0, 0): 0.1, (0, 1): 0.3, (1, 0): 0.5, (1, 1): 0.9, (2, 0): 0.2, (2, 1): 0.2}
    means = [0.2, 0.7, 0.2]
    noise = [np.std([0.1, 0.3], ddof=1), np.std([0.5, 0.9], ddof=1), 0.0]
    parts = spread_parts(values)
    assert parts["label_seeds"] == pytest.approx(np.std(means, ddof=1))
    assert parts["noise_seeds"] == pytest.approx(np.mean(noise))
    stats = seed_stats(values)
    assert stats["mean"] == pytest.approx(np.mean(list(values.values())))
    assert stats["std"] == pytest.approx(np.std(list(values.values()), ddof=1)) and stats["n"] == 6
    assert [(p["label_seed"], p["noise_seed"]) for p in stats["pairs"]] == list(values)
    assert spread_parts({(0, None): 0.5, (1, None): 0.7})["noise_seeds"] is None
    with pytest.raises(ValueError, match="at least one"):
        seed_stats({})


def test_chosen_keys_are_distinct_in_first_seen_order():
    a, b, c = FeatureKey("mid", 1), FeatureKey("up.0", 1), FeatureKey("mid", 5)
    assert chosen_keys((a,), (a, b), None, (c, b)) == [a, b, c]


def test_features_at_a_noise_seed_are_the_cached_extraction_with_that_seed(tmp_path):
    backbone = make_backbone("2d-2level", seed=1)
    train, test = make_images(backbone, n=6), make_images(backbone, n=3)
    keys = [FeatureKey("mid", 50), FeatureKey("up.0", 10)]
    common = dict(noise="shared", cache_dir=tmp_path, chunk_size=4, batch_size=2, progress=False, pool_grid=1)
    got = {n: features_at_noise_seed(backbone, keys, train, test, n, count=5, dataset_id="d", **common) for n in (0, 1)}
    for n in (0, 1):
        ref_train = cached_pooled_features(backbone, train, ["mid", "up.0"], [10, 50], count=5, seed=n,
                                           dataset_id="ref", **common)
        ref_test = cached_pooled_features(backbone, test, ["mid", "up.0"], [10, 50], seed=n, dataset_id="ref", **common)
        for k in keys:
            assert got[n][0][k].shape[0] == 5 and np.array_equal(got[n][0][k], ref_train[k])
            assert np.array_equal(got[n][1][k], ref_test[k])
    assert not np.array_equal(got[0][0][keys[0]], got[1][0][keys[0]])  # another seed, other noise

"""Node x timestep selection (validation only), label subsets, the pooled-feature cache and the probe run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffrep import FeatureExtractor, FeatureKey, pool
from diffrep.features import cache as cache_mod
from diffrep.features.cache import backbone_identity, cached_pooled_features
from diffrep.heads import (
    LinearProbe, carve_validation, default_concatenations, key_name, parse_key_name, sample_per_class,
    select_node_timestep,
)

from diffrep.backbones import Backbone, BackboneConfig

from .conftest import TINY_CONFIGS, make_backbone, make_images

A, B, C = FeatureKey("up.0", 5), FeatureKey("up.1", 5), FeatureKey("mid", 50)


def _informative(y, rng, strength):
    """Features whose class signal has the given strength (0 = pure noise)."""
    centres = np.eye(3, 4) * 3.0
    return (strength * centres[y] + rng.normal(size=(y.size, 4))).astype(np.float32)


def test_selection_uses_validation_only_and_never_test():
    rng = np.random.default_rng(0)
    y_tr, y_val, y_te = rng.integers(0, 3, 300), rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    # A is informative on train and validation; B is informative on train and *test* only.
    tr = {A: _informative(y_tr, rng, 1.0), B: _informative(y_tr, rng, 1.0), C: _informative(y_tr, rng, 0.0)}
    val = {A: _informative(y_val, rng, 1.0), B: _informative(y_val, rng, 0.0), C: _informative(y_val, rng, 0.0)}
    test = {A: _informative(y_te, rng, 0.0), B: _informative(y_te, rng, 1.0), C: _informative(y_te, rng, 0.0)}
    result = select_node_timestep(tr, y_tr, val, y_val, concat_candidates=[(A, B)],
                                  noise_levels={5: 0.03, 50: 0.2})
    assert result.best_single == (A,)
    by_key = {r["key"]: r for r in result.table}
    assert by_key["up.0@5"]["val_acc"] > 0.8 > by_key["up.1@5"]["val_acc"]
    assert by_key["up.0@5+up.1@5"]["kind"] == "concat" and by_key["up.0@5"]["noise_levels"] == [0.03]
    assert result.best_val_acc == max(r["val_acc"] for r in result.table)
    # on the test set B would have won: the selection must not have looked at it
    test_scores = {k: LinearProbe().fit(tr[k], y_tr).score(test[k], y_te) for k in (A, B)}
    assert test_scores[B] > test_scores[A]
    assert json.loads(json.dumps(result.to_dict()))["best_single"] == "up.0@5"


def test_concatenation_callable_and_default_concatenations():
    rng = np.random.default_rng(1)
    y_tr, y_val = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    tr = {k: _informative(y_tr, rng, s) for k, s in ((A, 0.6), (B, 0.6), (C, 0.3))}
    val = {k: _informative(y_val, rng, s) for k, s in ((A, 0.6), (B, 0.6), (C, 0.3))}
    result = select_node_timestep(tr, y_tr, val, y_val, concat_candidates=default_concatenations)
    concat_keys = [r["key"] for r in result.table if r["kind"] == "concat"]
    assert concat_keys and len(set(concat_keys)) == len(concat_keys)
    assert result.best_concat is not None and len(result.best_concat) >= 2
    assert parse_key_name(key_name(result.best_concat)) == result.best_concat


def test_selection_bad_input():
    y = np.array([0, 1] * 10)
    feats = {A: np.random.default_rng(0).normal(size=(20, 3))}
    with pytest.raises(ValueError, match="missing; available keys are"):
        select_node_timestep(feats, y, feats, y, candidates=[B])
    with pytest.raises(ValueError, match="expected 19 rows"):
        select_node_timestep(feats, y[:19], feats, y)
    with pytest.raises(ValueError, match="two or more keys"):
        select_node_timestep(feats, y, feats, y, concat_candidates=[(A,)])


def test_carve_validation_is_stratified_seeded_and_disjoint():
    y = np.repeat(np.arange(4), 25)
    fit, val = carve_validation(y.size, 0.2, seed=3, stratify=y)
    assert val.size == 20 and fit.size == 80 and not np.intersect1d(fit, val).size
    np.testing.assert_array_equal(np.bincount(y[val]), [5, 5, 5, 5])
    np.testing.assert_array_equal(carve_validation(y.size, 0.2, seed=3, stratify=y)[1], val)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        carve_validation(10, 1.5)


def test_sample_per_class_exact_counts_and_errors():
    y = np.repeat(np.arange(3), [5, 7, 9])
    idx = sample_per_class(y, 4, seed=0)
    np.testing.assert_array_equal(np.bincount(y[idx]), [4, 4, 4])
    assert np.unique(idx).size == idx.size
    np.testing.assert_array_equal(idx, sample_per_class(y, 4, seed=0))
    with pytest.raises(ValueError, match=r"at least 6 samples.*\{0: 5\}"):
        sample_per_class(y, 6)
    with pytest.raises(ValueError, match=r"labels_per_class: expected an integer >= 1, got 0"):
        sample_per_class(y, 0)


# ------------------------------------------------------------------------------------------- cache
@pytest.fixture
def tiny():
    backbone = make_backbone("2d-2level")
    return backbone, make_images(backbone, n=10, size=8)


def _counting(monkeypatch, fail_on_call=None):
    calls = []
    original = cache_mod._extract_pooled

    def wrapped(extractor, images, grid=1):
        calls.append(images.shape[0])
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        return original(extractor, images, grid)

    monkeypatch.setattr(cache_mod, "_extract_pooled", wrapped)
    return calls


def test_cache_matches_extractor_and_hits_without_recomputation(tmp_path, tiny, monkeypatch):
    backbone, images = tiny
    calls = _counting(monkeypatch)
    kwargs = dict(nodes=["down.1", "up.1"], timesteps=[3, 7], cache_dir=tmp_path, chunk_size=4, progress=False)
    first = cached_pooled_features(backbone, images, **kwargs)
    assert len(calls) == 2 * 3  # 2 timesteps x ceil(10 / 4) chunks
    direct = FeatureExtractor(backbone, ["down.1", "up.1"], [3, 7])(images)
    for key in direct:
        assert first[key].dtype == np.float16 and first[key].shape == (10, direct[key].shape[1])
        np.testing.assert_allclose(first[key], pool(direct, [key]).numpy(), atol=2e-3, rtol=2e-3)
    calls.clear()
    second = cached_pooled_features(backbone, images, **kwargs)
    assert calls == []
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    # a prefix reads the same chunks; asking for more later continues from there
    part = cached_pooled_features(backbone, images, count=3, **kwargs)
    assert calls == [] and part[FeatureKey("up.1", 3)].shape[0] == 3


def test_cache_key_changes_with_seed_timesteps_noise_weights_and_data(tmp_path, tiny, monkeypatch):
    backbone, images = tiny
    calls = _counting(monkeypatch)
    base = dict(nodes=["mid"], timesteps=[3], noise="shared", seed=0)
    cached_pooled_features(backbone, images, cache_dir=tmp_path, progress=False, **base)
    assert len(calls) == 1
    variants = [dict(base, seed=1), dict(base, timesteps=[4]), dict(base, noise="ensemble(2)"),
                dict(base, nodes=["mid", "up.0"]), dict(base, pool_grid=2)]
    for i, variant in enumerate(variants, start=2):
        cached_pooled_features(backbone, images, cache_dir=tmp_path, progress=False, **variant)
        assert len(calls) == i, variant
    other_weights = make_backbone("2d-2level", seed=1)
    assert backbone_identity(other_weights) != backbone_identity(backbone)
    cached_pooled_features(other_weights, images, cache_dir=tmp_path, progress=False, **base)
    cached_pooled_features(backbone, images.flip(0), cache_dir=tmp_path, progress=False, **base)
    assert len(calls) == len(variants) + 3
    assert len(list(tmp_path.iterdir())) == len(variants) + 3  # one store each, none reused wrongly
    # other feature code (an edit of diffrep.features / backbones / diffusion): recomputed, never reused
    import diffrep.features.cache as cache_module

    monkeypatch.setattr(cache_module, "feature_code_digest", lambda: "other-code")
    cached_pooled_features(backbone, images, cache_dir=tmp_path, progress=False, **base)
    assert len(calls) == len(variants) + 4


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_pool_grid_matches_a_hand_computed_grid(grid):
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 6, 6)
    expected = maps.reshape(2, 3, grid, 6 // grid, grid, 6 // grid).mean(dim=(3, 5)).flatten(1)
    np.testing.assert_allclose(pool({A: maps}, grid=grid).numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    assert pool({A: maps, B: maps[:, :2]}, grid=grid).shape == (2, 5 * grid * grid)


def test_pool_grid_bad_input():
    for grid in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="pool grid: expected an integer >= 1, got "):
            pool({A: torch.zeros(1, 2, 4, 4)}, grid=grid)


def test_cache_with_pool_grid_matches_extractor(tmp_path, tiny):
    backbone, images = tiny
    got = cached_pooled_features(backbone, images, nodes=["down.1"], timesteps=[3], cache_dir=tmp_path,
                                 progress=False, pool_grid=2)
    direct = FeatureExtractor(backbone, ["down.1"], [3])(images)
    key = FeatureKey("down.1", 3)
    assert got[key].shape == (10, direct[key].shape[1] * 4)
    np.testing.assert_allclose(got[key], pool(direct, [key], grid=2).numpy(), atol=2e-3, rtol=2e-3)


def test_cache_fill_resumes_after_interruption(tmp_path, tiny, monkeypatch):
    backbone, images = tiny
    kwargs = dict(nodes=["down.0", "up.1"], timesteps=[5], chunk_size=3, progress=False)  # 4 chunks
    reference = cached_pooled_features(backbone, images, cache_dir=tmp_path / "clean", **kwargs)
    calls = _counting(monkeypatch, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        cached_pooled_features(backbone, images, cache_dir=tmp_path / "resumed", **kwargs)
    (store,) = (tmp_path / "resumed").iterdir()
    assert sorted(p.name for p in store.glob("chunk-*")) == ["chunk-000000.safetensors", "chunk-000001.safetensors"]
    assert not list(store.glob("*.tmp"))
    calls.clear()
    resumed = cached_pooled_features(backbone, images, cache_dir=tmp_path / "resumed", **kwargs)
    assert calls == [3, 1]  # only chunks 2 (3 images) and 3 (1 image) were computed
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key])


def test_cache_bad_input(tmp_path, tiny):
    backbone, images = tiny
    with pytest.raises(ValueError, match="unknown node name.*valid names are"):
        cached_pooled_features(backbone, images, nodes=["up.9"], cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="count: expected at most the 10 images"):
        cached_pooled_features(backbone, images, nodes=["mid"], count=11, cache_dir=tmp_path, progress=False)
    with pytest.raises(TypeError, match="uint8"):
        cached_pooled_features(backbone, (images * 255).to(torch.uint8), cache_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------------------- probe run
def test_run_probe_end_to_end_and_labels_per_class(tmp_path):
    from diffrep.pipelines.probe import run_probe

    backbone = make_backbone("2d-2level")
    gen = torch.Generator().manual_seed(0)
    y = np.repeat(np.arange(3), 20)
    yt = np.repeat(np.arange(3), 6)
    # class-dependent brightness, so a probe can learn something
    x = torch.rand((60, 1, 8, 8), generator=gen) * 0.5 + torch.from_numpy(y).float().view(-1, 1, 1, 1) * 0.25
    xt = torch.rand((18, 1, 8, 8), generator=gen) * 0.5 + torch.from_numpy(yt).float().view(-1, 1, 1, 1) * 0.25
    common = dict(nodes=["down.1", "mid"], timesteps=[1, 20], cache_dir=tmp_path, chunk_size=16, progress=False,
                  val_fraction=0.25, grid_fit=30)
    run = run_probe(backbone, x, y, xt, yt, **common)
    rep = run.report
    assert rep["n_val"] == 15 and rep["n_grid_fit"] == 30 and rep["n_train"] == 60 and rep["n_test"] == 18
    assert len([r for r in rep["selection_table"] if r["kind"] == "single"]) == 4
    assert set(rep["choices"]) == {"single", "concat"} and rep["best"] in rep["choices"]
    np.testing.assert_array_equal(run.order[:15], run.val_idx)
    assert json.loads(json.dumps(rep))["test_acc"] == rep["test_acc"]
    low = run_probe(backbone, x, y, xt, yt, labels_per_class=5, **common).report
    assert low["n_train"] == 15 and low["n_grid_fit"] == 15 and low["labels_per_class"] == 5
    with pytest.raises(ValueError, match="labels_per_class"):
        run_probe(backbone, x, y, xt, yt, labels_per_class=50, **common)


# ------------------------------------------------------------------------------ CLI and benchmark
def _fmnist_available() -> bool:
    try:
        from diffrep.data.fashion_mnist import find_fashion_mnist

        find_fashion_mnist()
    except FileNotFoundError:
        return False
    return True


needs_fmnist = pytest.mark.skipif(not _fmnist_available(), reason="Fashion-MNIST IDX files not installed")


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny-backbone"
    make_backbone("2d-2level", seed=5).save(path)
    return path


@needs_fmnist
def test_probe_cli_writes_report(tmp_path, tiny_dir, capsys):
    import argparse

    from diffrep.cli.probe import add_probe_cli

    parser = argparse.ArgumentParser()
    add_probe_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["probe", "--backbone", str(tiny_dir), "--dataset", "fmnist", "--labels-per-class", "4",
                              "--limit-train", "120", "--limit-test", "30", "--timesteps", "1", "--nodes", "mid", "up.0",
                              "--val-fraction", "0.25", "--out", str(tmp_path / "out"), "--cache-dir",
                              str(tmp_path / "cache"), "--quiet", "--threads", "1", "--pool-grid", "2"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "out" / "probe_fmnist_k4.json").read_text())
    assert report["pool_grid"] == 2
    # a 2x2 grid gives 4 values per channel (the tiny U-Net's mid and up.0 each have 16 channels)
    assert {row["dim"] for row in report["selection_table"] if row["kind"] == "single"} == {64}
    assert report["n_train"] == 40 and report["n_test"] == 30 and report["data"]["dataset"] == "fashion-mnist"
    assert "chosen single" in capsys.readouterr().out


def test_probe_cli_defaults_come_from_the_pipeline(tmp_path, tiny_dir, monkeypatch, capsys):
    """Without --timesteps and --cache-dir the command searches DEFAULT_TIMESTEPS and caches in DEFAULT_CACHE_DIR
    (the parser leaves them None so that building it needs no torch); the report is written (synthetic data)."""
    import diffrep.pipelines.probe as pipeline
    from diffrep.cli import main
    from diffrep.features.cache import DEFAULT_CACHE_DIR

    def fake_dataset(name, backbone, limit_train=None, limit_test=None):
        size = pipeline.probe_image_size(name, backbone)
        gen = torch.Generator().manual_seed(0)
        y, yt = np.repeat(np.arange(2), 12), np.repeat(np.arange(2), 4)
        x, xt = (torch.rand((len(v), 1, size, size), generator=gen) * 0.5
                 + 0.5 * torch.from_numpy(v).float().view(-1, 1, 1, 1) for v in (y, yt))  # in [0, 1], by class
        return x, y, xt, yt, {"dataset": "synthetic", "n_train": 24, "n_test": 8}

    monkeypatch.setattr(pipeline, "load_probe_dataset", fake_dataset)
    monkeypatch.chdir(tmp_path)
    argv = ["probe", "--backbone", str(tiny_dir), "--dataset", "fmnist", "--nodes", "mid", "--no-concat",
            "--val-fraction", "0.25", "--quiet", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "probe_fmnist.json").read_text())
    assert report["grid"]["timesteps"] == list(pipeline.DEFAULT_TIMESTEPS) and report["data"]["dataset"] == "synthetic"
    assert (tmp_path / DEFAULT_CACHE_DIR).is_dir() and any((tmp_path / DEFAULT_CACHE_DIR).iterdir())
    assert "chosen single: mid@" in capsys.readouterr().out


@needs_fmnist
def test_benchmark_writes_json_and_heatmap(tmp_path, tiny_dir):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "classification.py"
    spec = importlib.util.spec_from_file_location("classification_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--backbone", str(tiny_dir), "--quick", "--limit-train", "160", "--limit-test", "40", "--grid-fit", "60",
            "--val-fraction", "0.25", "--timesteps", "1", "5", "--nodes", "mid", "up.0", "--labels-per-class", "2",
            "--seeds", "0", "1", "--cnn-epochs", "1", "--threads", "1", "--quiet",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    untrained = tmp_path / "untrained-backbone"
    torch.manual_seed(5)
    Backbone(BackboneConfig(unet=TINY_CONFIGS["2d-2level"])).save(untrained)  # plain seed-5 initialisation
    untrained_argv = [str(untrained) if a == str(tiny_dir) else a for a in argv]
    with pytest.raises(ValueError, match="untrained"):
        bench.main(untrained_argv + ["--random-init-seed", "5"])  # the control would equal the backbone
    payload = bench.main(argv + ["--random-init-seed", "0"])
    saved = json.loads((tmp_path / "out" / "classification_fmnist_quick.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"]))
    for field in ("command", "config", "seed", "versions", "timestamp", "rows", "selection_table", "targets"):
        assert field in saved
    assert isinstance(saved["targets"]["met"], bool)
    methods = {r["method"] for r in saved["rows"]}
    assert {"diffrep: best (node, t)", "control: raw pixels", "reference: supervised CNN (end to end)",
            "control: random-init U-Net: best (node, t)"} <= methods
    low = [r for r in saved["rows"] if r["labels_per_class"] == 2]
    assert low and all(r["seeds"] == [0, 1] for r in low)
    for r in low:  # U-Net rows: label seeds x noise seeds (quick: [0, 1]); raw pixels: label seeds only
        pairs = {(p["label_seed"], p["noise_seed"]) for p in r["test_acc"]["pairs"]}
        noisy = r["method"] != "control: raw pixels"
        assert pairs == ({(s, n) for s in (0, 1) for n in (0, 1)} if noisy else {(0, None), (1, None)})
        assert (r["test_acc"]["spread"]["noise_seeds"] is not None) == noisy
    full = {r["method"]: r for r in saved["rows"] if r["labels_per_class"] is None}
    single = full["diffrep: best (node, t)"]
    assert single["noise_seeds"] == [0, 1] and single["test_acc"]["pairs"][0]["noise_seed"] == 0
    assert single["test_acc"]["pairs"][0]["value"] == payload["rows"][0]["test_acc"]["pairs"][0]["value"]
    png = (tmp_path / "out" / "classification_fmnist_quick_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # a lever run: tagged output names, no random-init rows, the diffrep rows reuse the cached features
    lever = bench.main(argv + ["--random-init-seed", "0", "--skip-random-control", "--skip-cnn", "--tag", "lever"])
    saved = json.loads((tmp_path / "out" / "classification_fmnist_lever_quick.json").read_text())
    assert saved["random_control"] == {"skipped": "--skip-random-control"}
    assert not any("random-init" in r["method"] for r in saved["rows"])
    assert {r["method"]: r["test_accs"] for r in lever["rows"] if r["method"].startswith("diffrep")} == \
        {r["method"]: r["test_accs"] for r in payload["rows"] if r["method"].startswith("diffrep")}
    assert (tmp_path / "out" / "classification_fmnist_lever_quick_heatmap.png").is_file()


def test_pool_grid_is_bounded_by_the_smallest_feature_map(tmp_path, tiny):
    backbone, images = tiny  # 8x8 images: down.1 and mid give 4x4 maps
    with pytest.raises(ValueError, match=r"pool grid: expected at most 4, .*spatial size \(4, 4\)\), got 5"):
        pool({A: torch.zeros(1, 2, 4, 4)}, grid=5)
    with pytest.raises(ValueError, match=r"expected at most 4, .*node 'down.1' gives 4x4 maps for 8x8 images.*got 100"):
        cached_pooled_features(backbone, images, nodes=["down.0", "down.1"], timesteps=[3], cache_dir=tmp_path,
                               progress=False, pool_grid=100)
    assert not list(tmp_path.iterdir())  # refused before any store was made
    got = cached_pooled_features(backbone, images, nodes=["down.0"], timesteps=[3], cache_dir=tmp_path,
                                 progress=False, pool_grid=8)  # down.0 keeps the image size
    assert got[FeatureKey("down.0", 3)].shape == (10, 8 * 64)

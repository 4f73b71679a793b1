"""Sliding-window 3D features and anomaly maps (issue 14): what the stitching guarantees, refusals, memory.

What holds and is tested: a window covering the whole (padded) volume gives exactly the extractor's
features (and the scorer's map); with overlapping windows, every stitched voxel is the blend of the
features the U-Net computes for the windows covering it (constant blending: their mean; Gaussian:
a convex combination), at every node's stride. What does not hold, and is not tested: agreement of a
window's features with the whole volume's features in the window's interior (GroupNorm statistics and
the middle block's attention span the window).
"""
from __future__ import annotations

import argparse
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from diffrep._types import FeatureKey
from diffrep.anomaly import ReconstructionScorer, score_volume
from diffrep.anomaly.sliding import plan_reconstruction, score_whole_volume
from diffrep.cli.anomaly import add_anomaly_cli
from diffrep.features import FeatureExtractor
from diffrep.features import sliding as sliding_module
from diffrep.features.hooks import StopForward, capture_nodes
from diffrep.features.memory_estimate import RUNTIME_ALLOWANCE, MemoryBudgetError, _tracked_forward, forward_peak_bytes
from diffrep.features.sliding import SlidingWindowExtractor
from diffrep.features.windows import window_starts
from tests.conftest import make_backbone

NODES = ["up.1", "mid", "down.0", "down.1"]  # strides 1, 2, 1, 2; not in forward order


@pytest.fixture(scope="module")
def bb3d():
    return make_backbone("3d-2level")


def _volume(shape=(12, 16, 14), seed=0):
    return torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("noise", ["shared", "ensemble(2)", "none"])
def test_a_window_covering_the_volume_gives_the_extractors_features_exactly(bb3d, noise):
    vol = _volume()
    ref = FeatureExtractor(bb3d, NODES, [5, 400], noise=noise, seed=3, batch_timesteps=False)(vol)
    out = SlidingWindowExtractor(bb3d, NODES, [5, 400], window=(12, 16, 14), blend="constant", noise=noise, seed=3)(vol)
    assert list(out) == list(ref) and out.window_plan.num_windows == 1
    for key in ref:
        assert torch.equal(out[key], ref[key]), key
    batched = FeatureExtractor(bb3d, NODES, [5, 400], noise=noise, seed=3)(vol)  # timesteps in one forward
    for key in ref:
        torch.testing.assert_close(out[key], batched[key], atol=1e-5, rtol=1e-5)
    assert out.metadata() == ref.metadata()


def test_stitched_maps_cover_the_padded_volume_at_each_nodes_stride(bb3d):
    vol = _volume((13, 22, 17))
    out = SlidingWindowExtractor(bb3d, NODES, [10], window=8, overlap=0.5)(vol)
    plan = out.window_plan
    assert plan.padded == (14, 22, 18) and plan.window == (8, 8, 8) and plan.step == (4, 4, 4)
    info = {i.name: i for i in bb3d.feature_info()}
    for node in NODES:
        assert tuple(out[FeatureKey(node, 10)].shape) == info[node].shape(1, plan.padded)
    starts = window_starts(plan.window, plan.step, plan.padded)
    assert len(starts) == plan.num_windows and all(s % 2 == 0 for start in starts for s in start)


def _window_reference(bb, x_t, plan, nodes, t):
    """Per node: every window's features placed on the node's grid ((windows, C, *grid), NaN outside the window),
    computed here by running the U-Net on each crop of the noised volume."""
    info = {i.name: i for i in bb.feature_info()}
    starts = window_starts(plan.window, plan.step, plan.padded)
    out = {n: torch.full((len(starts), info[n].channels, *(p // info[n].stride for p in plan.padded)), float("nan"))
           for n in nodes}
    for w, start in enumerate(starts):
        crop = x_t[(slice(None), slice(None), *(slice(s, s + k) for s, k in zip(start, plan.window)))]
        with torch.no_grad(), capture_nodes({n: bb.node_module(n) for n in nodes}) as captured:
            bb(crop, torch.tensor([t]))
        for n in nodes:
            s = info[n].stride
            out[n][(w, slice(None), *(slice(a // s, (a + k) // s) for a, k in zip(start, plan.window)))] = captured[n][0]
    return out


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_overlapping_windows_blend_the_features_of_the_windows_covering_each_voxel(bb3d, blend):
    vol, t = _volume((8, 16, 12)), 100
    out = SlidingWindowExtractor(bb3d, NODES, [t], window=(8, 8, 8), overlap=0.5, blend=blend, seed=4)(vol)
    plan = out.window_plan
    assert plan.num_windows == 3 * 2 and plan.step == (8, 4, 4)
    eps = FeatureExtractor(bb3d, NODES, [t], seed=4).noise.draw(0, 4, (1, *plan.padded))
    x_t = bb3d.schedule.add_noise(bb3d.to_model_range(vol), eps[None], torch.tensor([t]))
    windows = _window_reference(bb3d, x_t, plan, NODES, t)
    for node in NODES:
        stitched, per_window = out[FeatureKey(node, t)][0], windows[node]
        if blend == "constant":  # the mean over the covering windows
            torch.testing.assert_close(stitched, per_window.nanmean(dim=0), atol=1e-5, rtol=1e-5)
        else:  # a convex combination of them: between their smallest and largest value
            lo = torch.where(per_window.isnan(), torch.inf, per_window).amin(dim=0)
            hi = torch.where(per_window.isnan(), -torch.inf, per_window).amax(dim=0)
            assert bool(((stitched >= lo - 1e-5) & (stitched <= hi + 1e-5)).all()), node
        assert not torch.allclose(stitched, per_window[0].nan_to_num(0.0))  # more than one window contributed


def test_same_seed_same_features_other_seed_other_features(bb3d):
    vol = _volume()
    make = lambda seed: SlidingWindowExtractor(bb3d, ["mid"], [200], window=8, seed=seed)(vol)[FeatureKey("mid", 200)]
    first = make(1)
    assert torch.equal(first, make(1))
    assert not torch.allclose(first, make(2))


def _hook_count(bb):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bb.unet.modules())


def test_hooks_are_removed_after_a_run_and_after_a_failure(bb3d):
    before = _hook_count(bb3d)
    SlidingWindowExtractor(bb3d, NODES, [10], window=8)(_volume())
    assert _hook_count(bb3d) == before
    broken = make_backbone("3d-2level")
    with torch.no_grad():
        broken.unet.conv_in.conv.weight[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"node 'up.1' at timestep 10 has .* NaN/Inf"):
        SlidingWindowExtractor(broken, ["up.1"], [10], window=8)(_volume())
    assert _hook_count(broken) == 0


# --------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("window", [7, (8, 9, 8), (8, 8), 0])
def test_a_window_that_is_not_a_multiple_of_the_total_stride_is_refused(bb3d, window):
    with pytest.raises(ValueError, match=r"window: expected 3 sizes \(or one\), each a positive multiple of 2, the total "
                                         r"stride of the 2-level U-Net"):
        SlidingWindowExtractor(bb3d, ["mid"], [10], window=window)(_volume())


def test_bad_overlap_and_blend_are_refused(bb3d):
    with pytest.raises(ValueError, match=r"overlap: expected a number in \[0, 1\), got 1.0"):
        SlidingWindowExtractor(bb3d, ["mid"], [10], window=8, overlap=1.0)(_volume())
    with pytest.raises(ValueError, match=r"blend: expected one of \['gaussian', 'constant'\]"):
        SlidingWindowExtractor(bb3d, ["mid"], [10], blend="linear")


def _count_real_forwards(bb, monkeypatch):
    """Real (non-meta) U-Net forwards counted by a pre-hook; ``slide`` made to fail if reached."""
    calls = []
    handle = bb.unet.register_forward_pre_hook(lambda _m, args: calls.append(args[0].device.type)
                                               if args[0].device.type != "meta" else None)

    def no_slide(*_args, **_kwargs):
        raise AssertionError("sliding_window_inference was reached")

    monkeypatch.setattr(sliding_module, "slide", no_slide)
    return calls, handle


def test_the_memory_refusal_comes_before_any_work(bb3d, monkeypatch):
    calls, handle = _count_real_forwards(bb3d, monkeypatch)
    try:
        with pytest.raises(MemoryBudgetError, match=r"needs an estimated [\d.]+ MiB \(window batch .*over the budget of "
                                                    r"1.0 MiB \(memory_budget\); nothing was run"):
            SlidingWindowExtractor(bb3d, NODES, [10], window=8, memory_budget=2**20)(_volume())
        with pytest.raises(ValueError, match=r"over the budget of 1.0 MiB"):  # a MemoryBudgetError is a ValueError
            score_whole_volume(ReconstructionScorer(bb3d, 50), _volume()[0], window=8, memory_budget=2**20)
    finally:
        handle.remove()
    assert calls == []


def test_auto_window_shrinks_to_fit_and_an_explicit_window_over_budget_names_one_that_fits(bb3d):
    shape = (32, 32, 32)
    big = SlidingWindowExtractor(bb3d, ["mid"], [10], window=32).plan(shape)
    small = SlidingWindowExtractor(bb3d, ["mid"], [10], window=16).plan(shape)
    budget = (big.estimate.total + small.estimate.total) // 2
    auto = SlidingWindowExtractor(bb3d, ["mid"], [10], window="auto", sw_batch_size=4, memory_budget=budget).plan(shape)
    assert auto.estimate.total <= budget < big.estimate.total and auto.window < (32, 32, 32)
    assert auto.window == (25 // 2 * 2,) * 3 or auto.sw_batch_size < 4
    with pytest.raises(MemoryBudgetError, match=r"with window 32x32x32 and sw_batch_size 1, over the budget .*; nothing "
                                                r"was run\. window=\d+x\d+x\d+ with sw_batch_size=1 fits"):
        SlidingWindowExtractor(bb3d, ["mid"], [10], window=32, memory_budget=budget).plan(shape)
    with pytest.raises(MemoryBudgetError, match=r"even with the smallest window tried, window 4x4x4 and sw_batch_size 1"):
        SlidingWindowExtractor(bb3d, ["mid"], [10], memory_budget=2**20).plan(shape)


# --------------------------------------------------------------------------------------- memory
def test_the_meta_forward_peak_is_the_real_forwards_tracked_peak(bb3d):
    """The estimate runs on the meta device; the same tracker on a real forward finds the same peak."""
    shape = (2, 1, 16, 16, 24)
    for nodes, early in ((None, True), (["down.1"], True), (["down.1", "up.0"], False)):
        meta = forward_peak_bytes(bb3d, shape, nodes, early)
        modules = {n: bb3d.node_module(n) for n in nodes or []}
        stop = nodes[-1] if nodes and early else None
        real = _tracked_forward(bb3d.unet, modules, stop, shape, torch.device("cpu"), None)
        assert abs(meta - real) <= 0.02 * real, (nodes, meta, real)
    assert forward_peak_bytes(bb3d, shape, ["down.0"]) < forward_peak_bytes(bb3d, shape)  # early exit holds less


def test_the_tracker_counts_new_storages_only():
    from diffrep.features.memory_estimate import _LivePeak

    x = torch.zeros(1000)
    with torch.inference_mode(), _LivePeak() as tracker:
        x.add_(1.0), x.view(10, 100), x[:10]  # in place and views: nothing allocated
        assert tracker.peak == 0
        y = x * 2  # 4000 bytes, alive
        del y
        z = torch.ones(500)  # the first storage freed: 2000 alive, the peak stays
        assert (tracker.current, tracker.peak) == (2000, 4000)
        del z


def _status_bytes(field):
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1)) * 1024


def test_the_estimate_bounds_the_measured_peak_rss_within_a_factor(bb3d):
    """Peak RSS above the baseline of a real whole-volume reconstruction (VmHWM, reset before the run) is
    between 0.5x and 1.1x the estimate. The run is sized so that the window's activations dominate (32^3
    windows: the middle block's attention holds 3 x 128 MB), not the fixed runtime allowance."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    scorer, vol = ReconstructionScorer(bb3d, 50), _volume((32, 32, 48))
    plan = plan_reconstruction(scorer, (32, 32, 48), window=32, overlap=0.5)
    assert plan.num_windows == 2 and plan.estimate.window > 2 * RUNTIME_ALLOWANCE
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    baseline = _status_bytes("VmRSS")
    score_whole_volume(scorer, vol[0], window=32, overlap=0.5)
    measured = _status_bytes("VmHWM") - baseline
    assert 0.5 * plan.estimate.total <= measured <= 1.1 * plan.estimate.total, (measured, plan.estimate.as_dict())


# --------------------------------------------------------------------------------------- anomaly maps
@pytest.mark.parametrize("reverse", ["x0", "ddim"])
def test_a_window_covering_the_volume_gives_the_scorers_map_exactly(bb3d, reverse):
    from tests.test_anomaly_scorers import live_backbone

    bb = live_backbone("3d-2level")
    scorer = ReconstructionScorer(bb, 100, reverse=reverse, ddim_steps=3, seed=2)
    vol = _volume((12, 16, 14))
    result, plan = score_whole_volume(scorer, vol[0], window=(12, 16, 14), blend="constant")
    assert plan.num_windows == 1
    np.testing.assert_array_equal(result.maps, scorer.raw_maps(vol))
    np.testing.assert_array_equal(result.scores, scorer.score(vol).scores)
    windowed, plan = score_whole_volume(scorer, vol[0], window=8, overlap=0.5)
    assert plan.num_windows == 2 * 3 * 3 and windowed.maps.shape == (1, 12, 16, 14)
    assert np.isfinite(windowed.maps).all() and not np.array_equal(windowed.maps, result.maps)


def test_a_volume_off_the_stride_is_padded_then_cropped_and_masked(bb3d):
    scorer = ReconstructionScorer(bb3d, 50, erode=1)
    vol = _volume((11, 15, 13))
    mask = np.zeros((11, 15, 13), bool)
    mask[2:9, 3:12, 2:11] = True
    result, plan = score_whole_volume(scorer, vol[0], mask, window=8)
    assert plan.padded == (12, 16, 14) and result.maps.shape == (1, 11, 15, 13)
    assert (result.maps[0][~mask] == 0).all() and result.maps[0][mask].max() > 0
    padded = torch.nn.functional.pad(vol, (0, 1, 0, 1, 0, 1))
    full, _ = score_whole_volume(scorer, vol[0], window=(12, 16, 14), blend="constant")
    np.testing.assert_array_equal(full.maps[0], scorer.raw_maps(padded)[0, :11, :15, :13])


def test_score_volume_scores_a_3d_backbones_scan_whole_and_writes_it_on_the_grid(tmp_path, bb3d):
    from tests.test_anomaly_volume import SHAPE, _brain, _write

    vol, mask = _brain()
    t1, mask_path = _write(tmp_path / "t1.nii.gz", vol), _write(tmp_path / "mask.nii.gz", mask, dtype=np.uint8)
    out = score_volume(ReconstructionScorer(bb3d, 50), t1, tmp_path / "map.nii.gz", mask_path=mask_path, progress=False)
    src, res = nib.load(str(t1)), nib.load(str(out))
    assert res.shape == SHAPE and np.array_equal(res.affine, src.affine) and res.get_data_dtype() == np.float32
    data = res.get_fdata()
    assert np.isfinite(data).all() and data.max() > 0 and (data[~mask] == 0).all()


def _cli(tmp_path, backbone_name, *extra):
    from tests.test_anomaly_volume import _brain, _write

    vol, _ = _brain()
    t1 = _write(tmp_path / "t1.nii.gz", vol)
    make_backbone(backbone_name).save(tmp_path / "bb")
    parser = argparse.ArgumentParser()
    add_anomaly_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["anomaly", "score", "--backbone", str(tmp_path / "bb"), str(t1), "--out",
                              str(tmp_path / "m.nii.gz"), "--quiet", *extra])
    return args, t1


def test_cli_anomaly_score_with_a_3d_backbone_writes_a_whole_volume_map(tmp_path, capsys):
    args, t1 = _cli(tmp_path, "3d-2level", "--window", "8x16x8", "--overlap", "0.5", "--memory-budget", "4")
    assert args.func(args) == 0
    res = nib.load(str(tmp_path / "m.nii.gz"))
    assert res.shape == nib.load(str(t1)).shape and np.isfinite(res.get_fdata()).all()
    assert "the whole volume through sliding windows" in capsys.readouterr().out


@pytest.mark.parametrize("backbone_name,extra,match", [
    ("3d-2level", ["--size", "16"], r"--size: .* is a 3D backbone, which scores the whole volume"),
    ("2d-2level", ["--window", "16", "--size", "16"], r"--window: only for 3D backbones"),
    ("3d-2level", ["--window", "9"], r"window: expected 3 sizes \(or one\), each a positive multiple of 2"),
    ("3d-2level", ["--window", "8", "--memory-budget", "0.0001"], r"memory: .* over the budget of 0.1 MiB"),
])
def test_cli_refuses_options_of_the_other_dimension_and_runs_over_budget(tmp_path, backbone_name, extra, match):
    args, _ = _cli(tmp_path, backbone_name, *extra)
    with pytest.raises(ValueError, match=match):
        args.func(args)
    assert not (tmp_path / "m.nii.gz").exists()


def test_cli_window_spelling():
    from diffrep.cli.anomaly import parse_window

    assert parse_window("auto") == "auto" and parse_window("32") == 32 and parse_window("16x32x8") == (16, 32, 8)
    with pytest.raises(argparse.ArgumentTypeError, match="expected 'auto', N or DxHxW"):
        parse_window("big")


def test_the_benchmark_follows_the_quick_full_scheme():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import volume3d_memory as bench

    assert {k: getattr(bench.parse_args([]), k) for k in bench.FULL} == bench.FULL
    assert {k: getattr(bench.parse_args(["--quick"]), k) for k in bench.FULL} == {**bench.FULL, **bench.QUICK}

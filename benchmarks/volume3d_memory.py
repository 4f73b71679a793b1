"""Peak memory of a whole 1 mm brain scan through a 3D U-Net by sliding windows (issue 14, "3D").

The MNI152 2009a T1 at 1 mm (197x233x189, shipped with nilearn) goes through a small random-init 3D
MONAI DiffusionModelUNet (channels 16/32/64, one res block per level, no attention levels: only the
middle block's self-attention, which MONAI always has, with one head) in two runs, each in a fresh
process whose peak RSS is the kernel's ru_maxrss for that child (os.wait4):

- features: ``SlidingWindowExtractor`` (nodes down.0, down.2, mid; two timesteps; windows of 64^3,
  Gaussian blending), the whole padded volume at every node's stride;
- anomaly map: ``diffrep anomaly score MNI152.nii.gz --backbone <3D checkpoint> --window 64`` (the
  CLI's whole-volume path: ReconstructionScorer, reverse x0, L = 250), a NIfTI on the scan's grid.

Baselines: the whole-volume forward of the padded scan, estimated on the meta device (not run: it
would not fit), and, measured on a 64^3 crop of the scan, the whole-volume forward (FeatureExtractor)
against the sliding window (32^3 windows) on the same crop: peak ratio, and how far the windowed
features are from the whole-volume ones (GroupNorm statistics and attention span a window).

Each child also reports its peak above the RSS just before the work (VmHWM after a reset), set
against the memory estimate that the run checked before starting. The windows overlap 0 (tiles; the
last window of an axis overlaps its neighbour) to keep the run short: memory does not depend on the
overlap (the estimate has no overlap term), time grows with the window count.

    python benchmarks/volume3d_memory.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, Stopwatch, finish_metadata, merge_settings, run_metadata, write_json  # noqa: E402
from memory import MARK, current_rss_mb, peak_rss_mb, report, reset_peak  # noqa: E402

FULL = {"channels": [16, 32, 64], "num_head_channels": 64, "norm_num_groups": 16, "nodes": ["down.0", "down.2", "mid"],
        "timesteps": [100, 400], "window": 64, "overlap": 0.0, "blend": "gaussian", "anomaly_timestep": 250,
        "crop": None, "baseline_size": 64, "baseline_window": 32, "baseline_overlap": 0.25, "limit_gb": 6.0}
QUICK = {"timesteps": [100], "crop": 96, "baseline_size": 32, "baseline_window": 16}
SEED = 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke run on a crop of the scan: {QUICK}")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    vars(args).update(merge_settings(FULL, QUICK, args.quick))
    return args


# ------------------------------------------------------------------------------------------- children
def _child(case: str, config: dict[str, Any]) -> None:
    """One measured piece of work in this (fresh) process; reports through memory.report."""
    import torch

    torch.set_num_threads(1)
    from diffrep.backbones import load_backbone

    backbone = load_backbone(config["backbone_dir"])
    setup_peak = peak_rss_mb()
    reset = reset_peak()
    baseline = current_rss_mb()
    start = time.perf_counter()
    detail = {"features": _features, "whole": _whole_forward, "anomaly": _anomaly}[case](backbone, config)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    report({"case": case, "seconds": round(seconds, 1), "process_peak_rss_mb": round(max(setup_peak, peak), 1),
            "setup_peak_rss_mb": round(setup_peak, 1),
            "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1), "peak_reset": reset,
            "work_peak_mb": round(peak - baseline, 1), **detail})


def _features(backbone: Any, config: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from diffrep.features.sliding import SlidingWindowExtractor

    volume = torch.from_numpy(np.load(config["volume"]))[None, None]
    extractor = SlidingWindowExtractor(backbone, config["nodes"], config["timesteps"], window=config["window"],
                                       overlap=config["overlap"], blend=config["blend"], seed=SEED)
    features = extractor(volume)
    if config.get("save"):
        torch.save({f"{k.node}@{k.timestep}": v for k, v in features.items()}, config["save"])
    return {"plan": features.window_plan.as_dict(), "shapes": {f"{k.node}@{k.timestep}": list(v.shape)
                                                               for k, v in features.items()},
            "feature_mb": round(sum(v.numel() * v.element_size() for v in features.values()) / 2**20, 1)}


def _whole_forward(backbone: Any, config: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from diffrep.features import FeatureExtractor

    volume = torch.from_numpy(np.load(config["volume"]))[None, None]
    features = FeatureExtractor(backbone, config["nodes"], config["timesteps"], seed=SEED, batch_timesteps=False)(volume)
    torch.save({f"{k.node}@{k.timestep}": v for k, v in features.items()}, config["save"])
    return {"shapes": {f"{k.node}@{k.timestep}": list(v.shape) for k, v in features.items()}}


def _anomaly(backbone: Any, config: dict[str, Any]) -> dict[str, Any]:
    from diffrep.anomaly import ReconstructionScorer
    from diffrep.anomaly.sliding import plan_reconstruction
    from diffrep.cli import main as cli
    from diffrep.data.nifti import read_nifti

    argv = ["anomaly", "score", config["scan"], "--backbone", config["backbone_dir"], "--out", config["map"],
            "--window", str(config["window"]), "--overlap", str(config["overlap"]), "--quiet"]
    if cli(argv) != 0:
        raise RuntimeError(f"diffrep {' '.join(argv)} failed")
    written = read_nifti(config["map"], "map", canonical=False)
    shape = read_nifti(config["scan"]).data.shape  # the RAS grid the run scored
    plan = plan_reconstruction(ReconstructionScorer(backbone, config["anomaly_timestep"]), shape,
                               window=config["window"], overlap=config["overlap"])  # the plan the run checked
    return {"command": "diffrep " + " ".join(argv), "plan": plan.as_dict(), "map_shape": list(written.image.shape),
            "scan_shape": list(shape), "map_max": float(written.data.max())}


# A tiny launcher between this (large) process and each child: a child's ru_maxrss counts the memory image
# it was forked from until its exec, so forking from a small process keeps the number the child's own.
_LAUNCHER = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print("@@RUSAGE@@" + json.dumps({"exit": os.waitstatus_to_exitcode(status), "ru_maxrss_kb": usage.ru_maxrss}))
"""


def run_child(case: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run ``case`` in a fresh process (one torch thread); its payload plus its ru_maxrss (os.wait4 in a small
    launcher) and wall time."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(config, handle)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, sys.executable, str(Path(__file__).resolve()),
                           "--child", case, "--child-config", handle.name], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    os.unlink(handle.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    usage = [json.loads(line[len("@@RUSAGE@@"):]) for line in proc.stdout.splitlines() if line.startswith("@@RUSAGE@@")]
    if proc.returncode != 0 or not lines or not usage or usage[0]["exit"] != 0:
        raise RuntimeError(f"child {case} failed:\n{proc.stderr[-3000:]}")
    payload = json.loads(lines[-1][len(MARK):])
    payload.update(ru_maxrss_mb=round(usage[0]["ru_maxrss_kb"] / 1024.0, 1), process_wall_seconds=round(wall, 1))
    payload["estimate_total_mb"] = round(payload["plan"]["estimate_bytes"]["total"] / 2**20, 1) if "plan" in payload else None
    return payload


# ------------------------------------------------------------------------------------------- parent
def _inputs(settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """The random-init 3D backbone (saved), the normalised scan (and its NIfTI), and the baseline crop."""
    import numpy as np
    import torch

    from diffrep.backbones import Backbone, BackboneConfig, UNetConfig
    from diffrep.data.brain import derive_brain_mask, find_mni152, normalise_intensities
    from diffrep.data.nifti import read_nifti

    torch.manual_seed(SEED)
    levels = len(settings["channels"])
    unet = UNetConfig(spatial_dims=3, channels=tuple(settings["channels"]), attention_levels=(False,) * levels,
                      num_res_blocks=1, norm_num_groups=settings["norm_num_groups"],
                      num_head_channels=settings["num_head_channels"])
    backbone = Backbone(BackboneConfig(unet=unet, provenance={"note": f"random init, torch.manual_seed({SEED})"}))
    backbone.save(work / "backbone")
    scan = find_mni152()["t1"]
    volume = read_nifti(scan)
    mask, _ = derive_brain_mask(volume.data, None, None, str(scan))
    norm, _, _ = normalise_intensities(volume.data, mask, str(scan))
    if settings["crop"]:  # a centred crop, written as its own NIfTI
        import nibabel as nib

        norm = _centre_crop(norm, mask, settings["crop"])
        scan = work / "crop.nii.gz"
        nib.save(nib.Nifti1Image((norm * 1000).astype(np.int16), np.eye(4)), str(scan))
    np.save(work / "volume.npy", norm)
    np.save(work / "baseline.npy", _centre_crop(norm, norm > 0, settings["baseline_size"]))
    return {"backbone": backbone, "scan": str(scan), "shape": list(norm.shape), "parameters": backbone.num_parameters()}


def _centre_crop(volume: Any, mask: Any, size: int) -> Any:
    import numpy as np

    centre = [int(round(c.mean())) for c in np.nonzero(mask)]
    starts = [min(max(c - size // 2, 0), s - size) for c, s in zip(centre, volume.shape)]
    return np.ascontiguousarray(volume[tuple(slice(a, a + size) for a in starts)])


def _baseline(settings: dict[str, Any], base: dict[str, Any], work: Path, backbone: Any) -> dict[str, Any]:
    """Whole-volume forward vs sliding window: estimated on the whole scan, measured on the crop."""
    import torch

    from diffrep.features.memory_estimate import forward_peak_bytes
    from diffrep.features.windows import padded_size

    padded = padded_size(backbone, base["shape"])
    whole_scan = forward_peak_bytes(backbone, (1, 1, *padded), settings["nodes"])
    whole_full = forward_peak_bytes(backbone, (1, 1, *padded))
    crop = {**base, "volume": str(work / "baseline.npy"), "save": str(work / "whole.pt")}
    whole = run_child("whole", crop)
    sliding = run_child("features", {**crop, "window": settings["baseline_window"],
                                     "overlap": settings["baseline_overlap"], "save": str(work / "sliding.pt")})
    a, b = torch.load(work / "whole.pt"), torch.load(work / "sliding.pt")
    difference = {k: round(float((b[k] - a[k]).norm() / a[k].norm()), 4) for k in a}
    return {"whole_scan_forward_estimate_gib": {"to_the_last_node": round(whole_scan / 2**30, 1),
                                                "full_forward": round(whole_full / 2**30, 1),
                                                "padded_shape": list(padded), "run": False},
            "crop": {"size": settings["baseline_size"], "whole_forward": whole, "sliding_window": sliding,
                     "work_peak_ratio_whole_over_sliding": round(whole["work_peak_mb"] / sliding["work_peak_mb"], 2),
                     "ru_maxrss_ratio_whole_over_sliding": round(whole["ru_maxrss_mb"] / sliding["ru_maxrss_mb"], 2),
                     "relative_l2_difference_sliding_vs_whole": difference}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        _child(args.child, json.loads(Path(args.child_config).read_text()))
        sys.stdout.flush()
        os._exit(0)  # skip the interpreter's teardown: unloading torch/MONAI adds ~150 MB of RSS, not the work's
    import torch

    torch.set_num_threads(1)
    settings = {name: getattr(args, name) for name in FULL}
    meta = run_metadata({**settings, "quick": args.quick}, SEED)
    watch = Stopwatch()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with watch("inputs"):
            inputs = _inputs(settings, work)
        base = {"backbone_dir": str(work / "backbone"), "nodes": settings["nodes"], "timesteps": settings["timesteps"],
                "window": settings["window"], "overlap": settings["overlap"], "blend": settings["blend"],
                "anomaly_timestep": settings["anomaly_timestep"], "shape": inputs["shape"]}
        with watch("features"):
            features = run_child("features", {**base, "volume": str(work / "volume.npy")})
        with watch("anomaly"):
            anomaly = run_child("anomaly", {**base, "scan": inputs["scan"], "map": str(work / "map.nii.gz")})
        with watch("baseline"):
            baseline = _baseline(settings, base, work, inputs["backbone"])
    limit_mb = settings["limit_gb"] * 1024
    scan = "MNI152 2009a T1, 1 mm" + (f", centred {settings['crop']}^3 crop" if settings["crop"] else "")
    payload = {**finish_metadata(meta, watch), "scan": scan,
               "scan_shape": inputs["shape"], "unet_parameters": inputs["parameters"],
               "features": features, "anomaly": anomaly, "baseline": baseline,
               "peak_rss_limit_mb": limit_mb,
               "under_limit": {"features": features["ru_maxrss_mb"] < limit_mb, "anomaly": anomaly["ru_maxrss_mb"] < limit_mb}}
    path = write_json(payload, Path(args.out) / f"volume3d_memory{'_quick' if args.quick else ''}.json")
    print(json.dumps({"features_peak_rss_mb": features["ru_maxrss_mb"], "anomaly_peak_rss_mb": anomaly["ru_maxrss_mb"],
                      "features_s": features["seconds"], "anomaly_s": anomaly["seconds"],
                      "crop_ratio": baseline["crop"]["work_peak_ratio_whole_over_sliding"], "wall_s": watch.total()}))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

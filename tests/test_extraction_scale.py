"""benchmarks/extraction_scale.py --quick (fmnist-ddpm on a few Fashion-MNIST images): every stage runs in child
processes and the JSON holds the side-by-side numbers the issue asks for."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .test_probe_selection import needs_fmnist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import extraction_scale as bench  # noqa: E402


@pytest.mark.slow  # ~100 s: a dozen child processes, each importing torch and MONAI
@needs_fmnist
def test_quick_run_writes_every_stage(tmp_path):
    out = tmp_path / "scale.json"
    assert bench.main(["--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("command", "config", "seed", "versions", "git", "ratios", "targets"):
        assert key in result, key
    assert result["complete"] is True and result["errors"] == []
    stages = result["stages"]
    sizes = result["config"]["sizes"]
    for kind in ("full_maps", "pooled"):
        assert sorted(map(int, stages[kind])) == sizes
        for run in stages[kind].values():
            assert run["returncode"] == 0 and run["peak_rss_bytes"] > 0 and run["wall_s"] > 0
        ratios = result["ratios"][kind]
        assert ratios["images_ratio"] == sizes[-1] / sizes[0] and ratios["peak_rss_ratio"] > 0
    for n, run in stages["full_maps"].items():  # one chunk per batch, every chunk computed once
        assert run["chunks_computed"] == -(-int(n) // result["config"]["batch_size"])
        assert run["output_bytes"] > 0
    kill = stages["kill_resume"]
    assert kill["killed_run"]["killed"] and kill["killed_run"]["returncode"] == -9
    assert 0 < kill["chunks_done_at_kill"] < kill["chunks"]
    assert kill["rerun_chunks_computed"] == kill["missing_chunks"] and kill["computed_only_missing"]
    assert kill["identical_to_uninterrupted"] and kill["partial_files_left"] == []
    torchrun = stages["torchrun"]
    assert torchrun["identical"] and torchrun["max_abs_difference"] == 0.0 and torchrun["speedup"] > 0
    assert result["targets"]["kill_resume_identical_and_only_missing"]["met"]
    assert result["targets"]["torchrun_identical"]["met"]
    assert not list((tmp_path / "work").glob("*.safetensors*"))  # outputs are removed once hashed


def test_merge_keeps_the_earlier_stages_and_refuses_other_settings(tmp_path):
    import argparse

    settings = {"backbone": "b", "sizes": [1, 2]}
    earlier = {"config": settings, "command": "x", "timestamp": "t0", "errors": ["pooled N=2: exit code -9"],
               "stages": {"torchrun": {"old": True}, "full_maps": {"1": {"n": 1}}, "kill_resume": {"k": 1},
                          "pooled": {"1": {"n": 1}}}}
    (tmp_path / "e.json").write_text(json.dumps(earlier))
    args = argparse.Namespace(stages=["torchrun"], seed=0)
    run = bench.Bench(settings, args, tmp_path, tmp_path / "o.json", meta=False)
    run.merge(tmp_path / "e.json")
    assert run.result["torchrun"] is None  # to be run now
    assert run.result["full_maps"] == {"1": {"n": 1}} and run.result["kill_resume"] == {"k": 1}
    assert run.meta["merged_from"]["stages_kept"] == ["full_maps", "kill_resume", "pooled"]
    assert run.errors == ["earlier run: pooled N=2: exit code -9"]
    other = bench.Bench({**settings, "sizes": [1, 3]}, args, tmp_path, tmp_path / "o.json", meta=False)
    with pytest.raises(ValueError, match=r"--merge: .*e\.json was run with settings"):
        other.merge(tmp_path / "e.json")

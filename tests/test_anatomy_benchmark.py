"""benchmarks/segmentation_anatomy.py: its settings scheme, and the quick path on an untrained brain-sized U-Net."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tests.test_anatomy import needs_atlases

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import segmentation_anatomy as bench  # noqa: E402

from diffrep.data import anatomy  # noqa: E402


def test_settings_follow_the_quick_full_scheme_without_the_memory_comparison():
    import segmentation_brain
    from common import load_settings

    assert (bench.FULL, bench.QUICK) == load_settings("segmentation_anatomy")
    shared = {k: v for k, v in segmentation_brain.FULL.items() if not k.startswith("memory")}
    assert {k: bench.FULL[k] for k in shared} == shared  # the tissue task's heads, grid and U-Net settings
    assert {k: getattr(bench.parse_args([]), k) for k in bench.FULL} == bench.FULL
    assert {k: getattr(bench.parse_args(["--quick"]), k) for k in bench.FULL} == {**bench.FULL, **bench.QUICK}
    assert bench.FULL["ns"] == [1, 5, 10] and bench.FULL["seeds"] == [0, 1, 2]
    assert not [k for k in bench.FULL if k.startswith("memory")]
    assert bench.parse_args(["--quick", "--test-copies", "3"]).test_copies == 3


@needs_atlases
def test_quick_run_reports_every_method_at_every_n(tmp_path):
    argv = ["--quick", "--backbone", "random-brain", "--out", str(tmp_path / "out"), "--cache-dir",
            str(tmp_path / "cache"), "--ns", "1", "5", "--noise-seeds", "0", "--grid-nodes", "decoder-late", "--grid-timesteps", "t10",
            "--members", "1", "--epochs", "1", "--grid-members", "1", "--grid-epochs", "1", "--max-pixels", "2000",
            "--sup-steps", "2", "--sup-batch", "2", "--val-limit", "1", "--test-limit", "2"]
    payload = bench.main(argv)
    on_disk = json.loads((tmp_path / "out" / "segmentation_anatomy_quick.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(payload["rows"], default=float))
    methods = ["diffrep", "control: random-init U-Net", "supervised: BasicUNet end to end",
               "trivial: intensity + coordinates"]
    assert [(r["method"], r["n_labelled"]) for r in on_disk["rows"]] == [(m, n) for m in methods for n in (1, 5)]
    for row in on_disk["rows"]:
        assert list(row["iou"]) == list(anatomy.LABEL_NAMES) and "miou_tissue" not in row
        assert row["noise_seeds"] == ([] if row["method"] in methods[2:] else [0])
        for key in ("miou", "miou_brain", "miou_structures"):
            assert 0 <= row[key]["mean"] <= 100 and len(row[key]["values"]) == 1
    data = on_disk["data"]
    assert data["n_val"] == 1 and data["n_test"] == 2  # one deformed copy each in quick mode
    assert data["pixel_counts"]["train"] == dict(zip(anatomy.LABEL_NAMES, [73632, 70130, 694, 411, 270, 2732, 346,
                                                                           3337]))
    assert set(data["atlas_checks"]["classes"]) == set(anatomy.LABEL_NAMES[2:])
    assert [t["meaningful"] for t in on_disk["targets"]] == [False] * 3  # quick, untrained
    assert on_disk["selection"]["control"]["chosen"]["node_set"] == "decoder-late"
    assert (tmp_path / "out" / "segmentation_anatomy_overlays_quick.png").is_file()
    assert np.isfinite(on_disk["wall_seconds"])

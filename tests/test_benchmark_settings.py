"""benchmarks/common.py merge_settings: the one QUICK/FULL scheme every benchmark's parse_args uses."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import anomaly_brain  # noqa: E402
import classification  # noqa: E402
import segmentation_brain  # noqa: E402
from common import merge_settings  # noqa: E402

FULL = {"n": 100, "seeds": [0, 1, 2], "limit": None}
QUICK = {"n": 5, "seeds": [0]}


def test_full_then_quick_then_the_overrides_that_were_given():
    assert merge_settings(FULL, QUICK, False) == FULL
    assert merge_settings(FULL, QUICK, True) == {"n": 5, "seeds": [0], "limit": None}
    assert merge_settings(FULL, QUICK, True, {"n": None, "limit": 3}) == {"n": 5, "seeds": [0], "limit": 3}
    assert merge_settings(FULL, QUICK, False, {"seeds": [7]}) == {"n": 100, "seeds": [7], "limit": None}


def test_the_result_is_a_copy_and_unknown_names_are_refused():
    merge_settings(FULL, QUICK, True)["seeds"].append(9)
    assert QUICK["seeds"] == [0] and FULL["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"QUICK: \['epochs'\] are not settings of FULL"):
        merge_settings(FULL, {"epochs": 1}, True)
    with pytest.raises(ValueError, match=r"overrides: \['epoch'\] are not settings of FULL"):
        merge_settings(FULL, {}, False, {"epoch": 2})


@pytest.mark.parametrize("bench", [classification, segmentation_brain], ids=lambda m: m.__name__)
def test_benchmark_options_follow_the_scheme(bench):
    name = next(k for k in bench.QUICK if bench.QUICK[k] != bench.FULL[k] and isinstance(bench.FULL[k], int))
    assert {k: getattr(bench.parse_args([]), k) for k in bench.FULL} == bench.FULL
    assert {k: getattr(bench.parse_args(["--quick"]), k) for k in bench.FULL} == {**bench.FULL, **bench.QUICK}
    given = bench.parse_args(["--quick", f"--{name.replace('_', '-')}", "7"])
    assert getattr(given, name) == 7


def test_anomaly_grid_follows_the_scheme():
    assert anomaly_brain.parse_args([]).grid == anomaly_brain.FULL
    assert anomaly_brain.parse_args(["--quick"]).grid == anomaly_brain.QUICK
    assert anomaly_brain.parse_args(["--quick", "--dae-steps", "7"]).grid == {**anomaly_brain.QUICK, "dae_steps": 7}

"""Benchmark settings: FULL and QUICK live in configs/benchmarks/NAME.yaml (benchmarks/common.load_settings), and
merge_settings is the one QUICK/FULL scheme every benchmark's parse_args uses."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import anomaly_brain  # noqa: E402
import classification  # noqa: E402
import segmentation_brain  # noqa: E402
from common import load_settings, merge_settings  # noqa: E402

# The settings of a full and of a --quick run as the benchmarks spelled them in code before they moved to
# configs/benchmarks/ (item order included: it is the order of the recorded config in a result JSON), plus
# the settings added since (noise_seeds in classification and segmentation_brain).
BEFORE = {
    "classification": (
        {"grid_fit": 10000, "val_fraction": 0.1, "timesteps": [1, 11, 50, 150, 300], "cnn_epochs": 5,
         "chunk_size": 1000, "limit_train": None, "limit_test": None, "noise_seeds": [0, 1, 2]},
        {"grid_fit": 1000, "val_fraction": 0.2, "timesteps": [1, 50], "cnn_epochs": 1, "chunk_size": 500,
         "limit_train": 2000, "limit_test": 1000, "noise_seeds": [0, 1]}),
    "segmentation_brain": (
        {"ns": [1, 5, 10], "seeds": [0, 1, 2], "noise_seeds": [0, 1, 2], "members": 10, "epochs": 10, "batch_size": 64, "max_pixels": 50000,
         "grid_members": 5, "grid_epochs": 5, "grid_nodes": ["decoder5", "decoder-late", "encoder4", "all9"],
         "grid_timesteps": ["t50-150-250", "t10-50-100", "t10", "t0"], "sup_steps": 400, "sup_batch": 8,
         "val_limit": None, "test_limit": None, "memory_augment": 3, "memory_limit": None},
        {"ns": [1, 5], "seeds": [0], "noise_seeds": [0, 1], "members": 3, "epochs": 2, "batch_size": 64, "max_pixels": 4000,
         "grid_members": 3, "grid_epochs": 2, "grid_nodes": ["decoder5", "encoder4"],
         "grid_timesteps": ["t50-150-250", "t10"], "sup_steps": 20, "sup_batch": 4, "val_limit": 4, "test_limit": 6,
         "memory_augment": 0, "memory_limit": 16}),
    "likelihood": (
        {"test_images": 300, "fit_images": 100, "ood_images": 100, "brain_images": None, "brain_ood_images": 50,
         "variance_images": 20, "variance_repeats": 5, "hutchinson": 1, "rtol": 1e-5, "atol": 1e-5,
         "batch_size": 50, "ood_method": "vlb", "reconstruction_timestep": 250, "group_sizes": [5, 10, 25],
         "group_draws": 500, "bootstraps": 2000, "alpha": 0.01},
        {"test_images": 4, "fit_images": 4, "ood_images": 2, "brain_images": 4, "brain_ood_images": 2,
         "variance_images": 2, "variance_repeats": 2, "rtol": 1e-3, "atol": 1e-3, "group_sizes": [2],
         "group_draws": 20, "bootstraps": 100, "hutchinson": 1, "batch_size": 50, "ood_method": "vlb",
         "reconstruction_timestep": 250, "alpha": 0.01}),
    "anomaly_brain": (
        {"slices": None, "copies": 4, "test_copies": 2, "seeds": [0, 1, 2], "noise_seeds": [0, 1, 2],
         "anoddpm_level": 249, "x0_levels": [100, 250, 500, 750], "ddim_steps": [2, 5, 10],
         "ddim_levels": [100, 250, 500], "noises": ["gaussian", "simplex", "simplex-f16"],
         "ensembles": [[100, 250, 500], [250, 500, 750]], "feature_methods": ["knn", "gaussian"],
         "feature_nodes": [["up.1", "up.2"], ["down.1", "up.1"]], "feature_timesteps": [[50], [150]],
         "erode": [0, 2, 4], "median": [0, 3, 5], "dae_steps": 3000, "max_pixels": 20000, "pca": 32,
         "draws": [4, 8], "draws_levels": [250, 500], "calibrated_levels": [250, 500], "calibration_bins": 16},
        {"slices": 3, "copies": 2, "test_copies": 2, "seeds": [0], "noise_seeds": [0, 1], "anoddpm_level": 19,
         "x0_levels": [100, 500], "ddim_steps": [2, 5, 10], "ddim_levels": [250], "noises": ["gaussian", "simplex"],
         "ensembles": [[100, 500]], "feature_methods": ["knn"], "feature_nodes": [["up.1", "up.2"]],
         "feature_timesteps": [[50]], "erode": [0, 2], "median": [0, 3], "dae_steps": 3, "max_pixels": 2000,
         "pca": 8, "draws": [2], "draws_levels": [500], "calibrated_levels": [500], "calibration_bins": 4}),
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_the_settings_in_configs_are_those_the_code_used_before(name):
    full, quick = load_settings(name)
    before_full, before_quick = BEFORE[name]
    assert list(merge_settings(full, quick, False).items()) == list(before_full.items())
    assert merge_settings(full, quick, True) == before_quick
    assert list(merge_settings(full, quick, True)) == list(before_full)  # a quick run records FULL's order


@pytest.mark.parametrize("name, result, section", [("classification", "classification_fmnist.json", "config"),
                                                   ("segmentation_brain", "segmentation_brain.json", "config"),
                                                   ("anomaly_brain", "anomaly_brain.json", "grid")])
def test_the_committed_full_runs_recorded_these_settings(name, result, section):
    """The recorded config of each committed full run equals the full section (settings added since are absent)."""
    recorded = json.loads((ROOT / "benchmarks" / "results" / result).read_text())[section]
    full = load_settings(name)[0]
    assert {k: recorded[k] for k in full if k in recorded} == {k: v for k, v in full.items() if k in recorded}
    assert len([k for k in full if k in recorded]) >= len(full) - 2


def test_the_settings_name_the_benchmarks_own_tables():
    from diffrep.pipelines.probe import DEFAULT_TIMESTEPS

    assert classification.FULL["timesteps"] == list(DEFAULT_TIMESTEPS)
    for settings in (segmentation_brain.FULL, segmentation_brain.QUICK):
        assert set(settings["grid_nodes"]) <= set(segmentation_brain.NODE_SETS)
        assert set(settings["grid_timesteps"]) <= set(segmentation_brain.TIMESTEP_SETS)
    assert segmentation_brain.FULL["grid_nodes"] == list(segmentation_brain.NODE_SETS)
    assert anomaly_brain.FULL["noises"] == list(anomaly_brain.NOISES)


def test_load_settings_refuses_a_missing_or_malformed_file_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.yaml: expected the settings of benchmark 'nope'"):
        load_settings("nope", tmp_path)
    (tmp_path / "a.yaml").write_text("full: {n: 1}\n")
    with pytest.raises(ValueError, match=r"a\.yaml: expected two mappings, full and quick, got \['full'\]"):
        load_settings("a", tmp_path)
    (tmp_path / "b.yaml").write_text("full: {n: 1}\nquick: {m: 2}\n")
    with pytest.raises(ValueError, match=r"b\.yaml: quick: \['m'\] are not settings of full"):
        load_settings("b", tmp_path)
    (tmp_path / "c.yaml").write_text("full: {n: 1, seeds: [0, 1]}\nquick: {n: 2}\n")
    assert load_settings("c", tmp_path) == ({"n": 1, "seeds": [0, 1]}, {"n": 2})

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
    quick = {**anomaly_brain.FULL, **anomaly_brain.QUICK}
    assert anomaly_brain.parse_args(["--quick"]).grid == quick
    assert anomaly_brain.parse_args(["--quick", "--dae-steps", "7"]).grid == {**quick, "dae_steps": 7}

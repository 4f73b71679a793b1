"""benchmarks/anomaly_brain.py in quick mode on a tiny random backbone and tiny synthetic 'brain' slices."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_backbone

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import anomaly_brain as bench  # noqa: E402


def fake_split(split: str, size: int = 32, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Ellipse 'brains' with smooth texture, slightly different per slice and split."""
    g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, masks = [], []
    for _ in range(n):
        a, b = 0.75 + 0.1 * torch.rand(2, generator=g)
        mask = (xx / a) ** 2 + (yy / b) ** 2 <= 1
        texture = torch.nn.functional.interpolate(torch.rand(1, 1, 6, 6, generator=g), size=(size, size), mode="bilinear")[0, 0]
        images.append(((0.4 + 0.4 * texture) * mask)[None])
        masks.append(mask[None])
    return torch.stack(images).float(), torch.stack(masks)


def test_quick_benchmark_has_every_row_and_column(tmp_path, monkeypatch):
    backbone_dir = tmp_path / "backbone"
    make_backbone("2d-2level").save(backbone_dir)
    monkeypatch.setattr(bench, "load_split", fake_split)
    out = tmp_path / "out" / "anomaly.json"
    argv = ["--quick", "--backbone", str(backbone_dir), "--cache-dir", str(tmp_path / "cache"),
            "--map-cache", str(tmp_path / "maps"), "--out", str(out), "--threads", "1", "--quiet"]
    payload = bench.main(argv)
    on_disk = json.loads(out.read_text())
    assert on_disk["map_cache"]["entries_reused"] == 0

    # a rerun (e.g. after an interruption) reuses every finished map and computes nothing again
    calls = []
    original = bench.timed_score
    monkeypatch.setattr(bench, "timed_score", lambda *a: calls.append(1) or original(*a))
    again = bench.main(argv)
    assert calls == [] and again["map_cache"]["entries_reused"] > 0
    for first, second in zip(payload["rows"], again["rows"]):
        assert first["method"] == second["method"]
        assert first["pixel_auprc"] == second["pixel_auprc"] and first["best_dice"] == second["best_dice"]
    assert on_disk["rows"] == json.loads(json.dumps(payload["rows"], default=float))
    assert (out.parent / "anomaly_maps.png").is_file()
    for key in ("command", "config", "seeds", "versions", "notes", "selection_table", "targets", "grid"):
        assert key in on_disk, key

    g = on_disk["grid"]  # FULL with QUICK over it
    rows = {r["method"]: r for r in on_disk["rows"]}
    anoddpm = [f"AnoDDPM-style DDPM L={g['anoddpm_level'] + 1}, {n}" for n in ("gaussian", "simplex")]
    expected = anoddpm + [f"x0 single step, L={L}" for L in g["x0_levels"]] + [f"DDIM k={k}" for k in g["ddim_steps"]]
    expected += ["multi-level x0 ensemble", "feature distance", "DAE (coarse noise, Kascenas et al.)",
                 "x0, mean of K noise draws", "x0 single step + healthy calibration",
                 "DAE (coarse noise, Kascenas et al.) + healthy calibration"]
    assert set(expected) <= set(rows)
    controls = [name for name, r in rows.items() if r["kind"] == "control"]
    assert f"control: random-init U-Net, {on_disk['headline']}" in controls
    assert "control: random-init U-Net, feature distance" in controls

    for name, r in rows.items():
        for column in bench.METRICS:
            assert set(r[column]) >= {"mean", "std", "values"}, (name, column)
            runs = len(g["seeds"]) * (1 if name.startswith("DAE") else len(g["noise_seeds"]))
            assert len(r[column]["values"]) == len(r["runs"]) == runs, (name, column)
            assert np.isfinite(r[column]["mean"])
            assert (r["spread"][column]["noise_seeds"] is None) == name.startswith("DAE"), (name, column)
        assert r["seconds_per_slice"] > 0 and np.isfinite(r["time_ratio_to_anoddpm"])
        s = r["settings"]
        if name.startswith("x0") or s.get("reverse") == "x0":
            assert r["unet_calls_per_slice"] == s.get("draws", 1), name
        elif s.get("reverse") == "ddim":
            assert r["unet_calls_per_slice"] == s["k"], name
        elif s.get("reverse") == "ddpm":
            assert r["unet_calls_per_slice"] == s["noise_level"] + 1, name
    assert rows[anoddpm[0]]["unet_calls_per_slice"] == g["anoddpm_level"] + 1 == 20
    # time ratios recomputed from the raw per-run timings, against the Gaussian AnoDDPM row's
    reference_seconds = float(np.median(rows[anoddpm[0]]["seconds_per_slice_per_run"]))
    for name, r in rows.items():
        assert len(r["seconds_per_slice_per_run"]) == len(r["runs"]) and min(r["seconds_per_slice_per_run"]) > 0
        assert r["seconds_per_slice"] == pytest.approx(float(np.median(r["seconds_per_slice_per_run"]))), name
        assert r["time_ratio_to_anoddpm"] == pytest.approx(r["seconds_per_slice"] / reference_seconds), name
    for k in g["ddim_steps"]:
        assert rows[f"DDIM k={k}"]["unet_calls_per_slice"] == k
    assert rows["multi-level x0 ensemble"]["unet_calls_per_slice"] == len(rows["multi-level x0 ensemble"]["settings"]["levels"])
    assert rows["feature distance"]["unet_calls_per_slice"] == len(rows["feature distance"]["settings"]["timesteps"])
    assert rows["DAE (coarse noise, Kascenas et al.)"]["unet_calls_per_slice"] == 1
    assert rows["DAE (coarse noise, Kascenas et al.) + healthy calibration"]["unet_calls_per_slice"] == 1
    assert rows["x0, mean of K noise draws"]["unet_calls_per_slice"] == rows["x0, mean of K noise draws"]["settings"]["draws"]
    assert rows["DAE (coarse noise, Kascenas et al.)"]["kind"] == "baseline"
    assert on_disk["targets"]["dae_reference"] == "DAE (coarse noise, Kascenas et al.)"

    targets = on_disk["targets"]
    for key in ("headline", "met", "beats_dae_auprc_and_best_dice", "beats_anoddpm", "auprc_gain_over_anoddpm",
                "calls_ratio_anoddpm", "unet_calls_per_slice", "note"):
        assert key in targets, key
    assert isinstance(targets["met"], bool)
    assert rows[on_disk["headline"]]["unet_calls_per_slice"] <= bench.TARGETS["max_unet_calls"]
    # the selection table covers every candidate x post-processing of every searched row
    methods = {row["method"] for row in on_disk["selection_table"]}
    assert set(expected) <= methods
    assert all(0 <= row["val_pixel_auprc"] <= 1 for row in on_disk["selection_table"])
    assert Path(on_disk["dae"]["cache"]).joinpath("state.safetensors").is_file()
    assert len(on_disk["dae"]["loss"]) >= 1 and on_disk["dae"]["training"]["steps"] == g["dae_steps"]


def test_dae_is_cached_by_its_settings(tmp_path):
    train = fake_split("train", size=16, n=2)
    first, second, other = {}, {}, {}
    bench.dae_factory(train, 1, tmp_path, first, progress=False)(None, {"erode": 0, "median": 0})
    dae = bench.dae_factory(train, 1, tmp_path, second, progress=False)(None, {"erode": 1, "median": 3})
    assert first["trained_here"] and not second["trained_here"] and first["cache"] == second["cache"]
    assert (dae.erode, dae.median) == (1, 3)
    bench.dae_factory(train, 2, tmp_path, other, progress=False)  # other steps: another cache entry
    assert other["cache"] != first["cache"]


def test_noise_seeds_change_the_maps_and_the_code_keys_the_cache(tmp_path, monkeypatch):
    """Each noise seed is its own run (different maps for a noisy scorer), and a cache written by other code
    is never read: changing the code digest recomputes every map."""
    backbone_dir = tmp_path / "backbone"
    make_backbone("2d-2level").save(backbone_dir)
    monkeypatch.setattr(bench, "load_split", fake_split)
    argv = ["--quick", "--backbone", str(backbone_dir), "--cache-dir", str(tmp_path / "cache"),
            "--map-cache", str(tmp_path / "maps"), "--out", str(tmp_path / "a.json"), "--threads", "1", "--quiet"]
    rows = {r["method"]: r for r in bench.main(argv)["rows"]}
    x0 = rows["x0 single step, L=100"]
    assert [r["noise_seed"] for r in x0["runs"]] == bench.QUICK["noise_seeds"]
    first, second = x0["pixel_auprc"]["values"]
    assert first != second  # the noise seed reaches the scorer
    calls = []
    original = bench.timed_score
    monkeypatch.setattr(bench, "timed_score", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(bench, "CODE", "another-code-version")
    again = bench.main(argv)
    assert again["map_cache"]["entries_reused"] == 0 and len(calls) > 0


def test_reproduce_check_pairs_means_and_flags_a_shift(tmp_path):
    import reproduce_check

    def result(auprc: float) -> dict:
        return {"rows": [{"method": "a", "pixel_auprc": {"mean": auprc, "std": 0.01, "values": [1]}},
                         {"method": "b", "pixel_auprc": {"mean": 0.5, "std": 0.0}}]}

    (tmp_path / "one.json").write_text(json.dumps(result(0.100)))
    (tmp_path / "two.json").write_text(json.dumps(result(0.105)))
    (tmp_path / "far.json").write_text(json.dumps(result(0.150)))
    assert reproduce_check.main([str(tmp_path / "one.json"), str(tmp_path / "two.json")]) == 0
    report = json.loads((tmp_path / "one_reproduction.json").read_text())
    assert report["compared"] == 2 and report["all_reproduced"]
    assert reproduce_check.main([str(tmp_path / "one.json"), str(tmp_path / "far.json"),
                                 "--out", str(tmp_path / "r.json")]) == 1
    bad = [e for e in json.loads((tmp_path / "r.json").read_text())["entries"] if not e["reproduced"]]
    assert [e["path"] for e in bad] == ["/rows[a]/pixel_auprc"]

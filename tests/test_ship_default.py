"""benchmarks/ship_default.py: a finished training run becomes a zoo entry (fp16 weights) plus its reports."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffrep.backbones.checkpoint import load_checkpoint

from .conftest import make_backbone

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ship_default  # noqa: E402


def test_a_tiny_run_is_shipped_as_fp16_weights_and_its_reports(tmp_path, capsys):
    run = tmp_path / "run"
    backbone = make_backbone("2d-2level")
    backbone.save(run / "backbone")
    (run / "log.jsonl").write_bytes(b'{"step": 1, "loss": 0.5}\n')
    (run / "heldout_losses.json").write_bytes(b'{"noise_level": {"10": 0.05}}')
    zoo, results = tmp_path / "zoo", tmp_path / "results"

    assert ship_default.main([str(run), "tiny", "--zoo-dir", str(zoo), "--results-dir", str(results)]) == 0
    assert f"shipped {run} as {zoo / 'tiny'}" in capsys.readouterr().out
    stored = load_file(str(zoo / "tiny" / "model.safetensors"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    assert json.loads((zoo / "tiny" / "config.json").read_text())["weights_dtype"] == "float16"
    shipped = load_checkpoint(zoo / "tiny")
    for (name, want), got in zip(backbone.unet.state_dict().items(), shipped.unet.state_dict().values()):
        assert got.dtype == want.dtype and torch.equal(got, want.half().to(want.dtype)), name
    reports = results / "tiny"
    assert sorted(p.name for p in reports.iterdir()) == ["config.json", "heldout_losses.json", "log.jsonl"]
    assert (reports / "log.jsonl").read_bytes() == (run / "log.jsonl").read_bytes()
    assert (reports / "config.json").read_bytes() == (zoo / "tiny" / "config.json").read_bytes()


def test_the_library_no_longer_holds_the_developer_script():
    import importlib.util

    assert importlib.util.find_spec("diffrep.training.ship") is None

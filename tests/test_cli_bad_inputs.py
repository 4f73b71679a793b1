"""Every bad input to every command, in one table (issue 11).

Each row builds its inputs in a temporary folder and runs the command in-process. The command must
exit 2 with a message that names the offending file or value and what was expected, print no
traceback, change no file that existed before the call, and (unless the row says it may) write
nothing: a refusal comes before any work.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from diffrep.backbones import save_backbone
from diffrep.cli import main

from .conftest import make_backbone


@dataclass(frozen=True)
class Case:
    """One bad input: ``make(tmp, checkpoint)`` writes the inputs under ``tmp`` and returns argv."""

    id: str
    make: Callable[[Path, Path], list[str]]
    match: str                 # regex the error message must contain
    may_write: bool = False    # the command may leave new files (never change existing ones)


def _npy(tmp: Path, array: np.ndarray, name: str = "x.npy") -> str:
    np.save(tmp / name, array)
    return str(tmp / name)


# ----------------------------------------------------------------------------------------- nodes
CASES_NODES = [
    Case("nodes-missing-checkpoint", lambda tmp, ckpt: ["nodes", str(tmp / "nowhere")],
         r"nowhere.*neither a checkpoint directory nor a shipped default"),
]

# --------------------------------------------------------------------------------------- extract
CASES_EXTRACT = [
    Case("extract-missing-input", lambda tmp, ckpt: ["extract", str(ckpt), str(tmp / "missing.npy"), "--nodes", "mid",
                                                     "--timesteps", "1", "--out", str(tmp / "o.safetensors")],
         r"missing\.npy does not exist"),
    Case("extract-unknown-node", lambda tmp, ckpt: ["extract", str(ckpt), _npy(tmp, np.zeros((2, 16, 16), np.float32)),
                                                    "--nodes", "bogus", "--timesteps", "1",
                                                    "--out", str(tmp / "o.safetensors")],
         r"bogus.*valid names are"),
]

# ----------------------------------------------------------------------------------------- train
def _recipe(tmp: Path, changes: dict | None = None, name: str = "r.yaml") -> str:
    """A tiny synthetic training recipe written as YAML under ``tmp``; ``changes`` maps 'a.b' keys to values."""
    import yaml

    recipe = {"name": "tiny", "max_steps": 4, "checkpoint_every": 2, "log_every": 2, "sample_steps": 2,
              "eval_timesteps": [10, 500], "data": {"dataset": "synthetic", "size": 16, "synthetic_count": 24},
              "backbone": {"unet": {"channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 8,
                                    "num_head_channels": 8}},
              "optim": {"batch_size": 4, "warmup_steps": 2}}
    for dotted, value in (changes or {}).items():
        *parents, key = dotted.split(".")
        node = recipe
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    (tmp / name).write_text(yaml.safe_dump(recipe))
    return str(tmp / name)


def _train_argv(tmp: Path, changes: dict | None = None, *extra: str) -> list[str]:
    return ["train", "--config", _recipe(tmp, changes), "--out", str(tmp / "run"), *extra]


def _fake_run(tmp: Path, finished: bool) -> list[str]:
    """A run directory as `diffrep train` leaves it (finished: with backbone/); the harness checks it is unchanged."""
    run = tmp / "run"
    run.mkdir()
    (run / "train_state.pt").write_bytes(b"state of the earlier run")
    (run / "log.jsonl").write_text('{"step": 2, "loss": 0.5}\n')
    if finished:
        (run / "backbone").mkdir()
        (run / "backbone" / "config.json").write_text("{}")
    return _train_argv(tmp)


def _write(tmp: Path, content: bytes, name: str = "r.yaml") -> str:
    (tmp / name).write_bytes(content)
    return str(tmp / name)


CASES_TRAIN = [
    Case("train-missing-config", lambda tmp, ckpt: ["train", "--config", str(tmp / "none.yaml"), "--out", str(tmp / "run")],
         r"config file not found: \S*none\.yaml"),
    Case("train-config-is-a-folder", lambda tmp, ckpt: ["train", "--config", str(tmp), "--out", str(tmp / "run")],
         r"config file: expected a YAML file, got the directory"),
    Case("train-config-not-a-mapping", lambda tmp, ckpt: ["train", "--config", _write(tmp, b"- a\n- b\n")],
         r"r\.yaml: expected a YAML mapping at the top level, got list"),
    Case("train-garbled-yaml", lambda tmp, ckpt: ["train", "--config", _write(tmp, b"name: [tiny\nmax_steps: 4\n")],
         r"r\.yaml: not valid YAML"),
    Case("train-undecodable-config", lambda tmp, ckpt: ["train", "--config", _write(tmp, b"name: \xff\xfe\x00\x81")],
         r"r\.yaml: expected a UTF-8 YAML text file"),
    Case("train-unknown-key", lambda tmp, ckpt: _train_argv(tmp, {"optim.learning_rate": 0.1}),
         r"r\.yaml: recipe\.optim: unknown key\(s\) \['learning_rate'\] for OptimConfig; valid keys are"),
    Case("train-unknown-dataset", lambda tmp, ckpt: _train_argv(tmp, {"data.dataset": "cifar"}),
         r"r\.yaml: data\.dataset: expected 'fmnist', 'brain' or 'synthetic', got 'cifar'"),
    Case("train-max-steps-0", lambda tmp, ckpt: _train_argv(tmp, None, "--max-steps", "0"),
         r"--max-steps\): expected an integer >= 1, got 0"),
    Case("train-threads-0", lambda tmp, ckpt: _train_argv(tmp, None, "--threads", "0"),
         r"--threads\): expected an integer >= 1, got 0"),
    Case("train-log-every-0", lambda tmp, ckpt: _train_argv(tmp, {"log_every": 0}),
         r"r\.yaml: log_every: expected an integer >= 1, got 0"),
    Case("train-checkpoint-every-0", lambda tmp, ckpt: _train_argv(tmp, {"checkpoint_every": 0}),
         r"r\.yaml: checkpoint_every: expected an integer >= 1, got 0"),
    Case("train-eval-timesteps-out-of-range", lambda tmp, ckpt: _train_argv(tmp, {"eval_timesteps": [10, 1000]}),
         r"r\.yaml: eval_timesteps: expected a non-empty list of timesteps in 0\.\.999 .*got \[10, 1000\]"),
    Case("train-lr-negative", lambda tmp, ckpt: _train_argv(tmp, {"optim.lr": -0.001}),
         r"r\.yaml: optim\.lr: expected a finite number > 0, got -0\.001"),
    Case("train-lr-a-word", lambda tmp, ckpt: _train_argv(tmp, {"optim.lr": "fast"}),
         r"r\.yaml: recipe\.optim\.lr: expected a number, got 'fast' \(str\)"),
    Case("train-channels-a-string", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.channels": "16,32"}),
         r"recipe\.backbone\.unet\.channels: expected a list of integers, got '16,32' \(str\)"),
    Case("train-steps-not-an-integer", lambda tmp, ckpt: _train_argv(tmp, {"max_steps": 1.5}),
         r"recipe\.max_steps: expected an integer, got 1\.5 \(float\)"),
    Case("train-boolean-for-an-integer", lambda tmp, ckpt: _train_argv(tmp, {"optim.batch_size": True}),
         r"recipe\.optim\.batch_size: expected an integer, got True \(bool\)"),
    Case("train-attention-levels-wrong-length", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.attention_levels": [False]}),
         r"r\.yaml: attention_levels: expected 2 entries \(one per channels entry\), got 1"),
    Case("train-norm-groups-0", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.norm_num_groups": 0}),
         r"r\.yaml: norm_num_groups: expected integers >= 1, got 0"),
    Case("train-res-blocks-wrong-length", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.num_res_blocks": [1, 1, 1]}),
         r"r\.yaml: num_res_blocks: expected one integer or 2 \(one per channels entry\), got \(1, 1, 1\)"),
    Case("train-size-the-unet-cannot-take", lambda tmp, ckpt: _train_argv(tmp, {"data.size": 15}),
         r"r\.yaml: data \(synthetic, 15x15, 1 channel\): the image size must be divisible by 2"),
    Case("train-channels-the-data-lacks", lambda tmp, ckpt: _train_argv(tmp, {"backbone.unet.in_channels": 3}),
         r"r\.yaml: backbone\.unet\.in_channels: expected 1 for data \(synthetic, 16x16, 1 channel\), got 3"),
    Case("train-finished-run-without-resume", lambda tmp, ckpt: _fake_run(tmp, finished=True),
         r"run already holds a training run \(train_state\.pt, log\.jsonl, backbone\); pass --resume .*another --out"),
    Case("train-interrupted-run-without-resume", lambda tmp, ckpt: _fake_run(tmp, finished=False),
         r"run already holds a training run \(train_state\.pt, log\.jsonl\); pass --resume"),
    Case("train-resume-without-a-state", lambda tmp, ckpt: _train_argv(tmp, None, "--resume"),
         r"--resume: no training state at \S*run/train_state\.pt"),
    Case("train-diverges", lambda tmp, ckpt: _train_argv(tmp, {"optim.lr": 1e6, "max_steps": 40}),
         r"training diverged at step \d+: loss nan.*train_state\.pt \(step \d+\), is kept; no backbone was exported",
         may_write=True),
]

# ---------------------------------------------------------------------------------- import-monai
CASES_IMPORT: list[Case] = []

# --------------------------------------------------------------------------------------- anomaly
CASES_ANOMALY: list[Case] = []

# --------------------------------------------------------------------------------------- segment
CASES_SEGMENT: list[Case] = []

# ----------------------------------------------------------------------------------------- probe
CASES_PROBE: list[Case] = []

CASES = CASES_NODES + CASES_EXTRACT + CASES_TRAIN + CASES_IMPORT + CASES_ANOMALY + CASES_SEGMENT + CASES_PROBE


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_clear_message_and_changes_nothing(case: Case, tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "ckpt"
    save_backbone(make_backbone("2d-3level-attn"), checkpoint)
    argv = case.make(tmp_path, checkpoint)
    before = _snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"{case.id}: exit {code}, stderr:\n{err}"
    assert re.search(case.match, err, flags=re.S), f"{case.id}: message does not match {case.match!r}:\n{err}"
    assert "Traceback" not in err
    after = _snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before, f"{case.id}: an existing file was changed or removed"
    if not case.may_write:
        assert set(after) == set(before), f"{case.id}: wrote {sorted(set(after) - set(before))}"


def test_the_table_covers_every_command() -> None:
    """At least 40 bad inputs, and every command of the CLI has rows."""
    from diffrep.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices) - {"zoo", "demo"}
    uncovered = {cmd for cmd in commands if not any(c.id.startswith(cmd + "-") for c in CASES)}
    assert len(CASES) >= 40, f"only {len(CASES)} rows"
    assert not uncovered, f"commands without rows: {sorted(uncovered)}"

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
CASES_TRAIN: list[Case] = []

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

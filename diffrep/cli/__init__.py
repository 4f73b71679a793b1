"""The ``diffrep`` command line: argument parsing only, one module per command or command group.

What lives here: ``build_parser``/``main`` (this module) and the commands' modules
(:mod:`.backbone`: nodes, extract, zoo, import-monai; :mod:`.train`; :mod:`.probe`; :mod:`.segment`;
:mod:`.anomaly`; :mod:`.demo`). Each parses and checks its options, calls library functions (the
pipelines live in :mod:`diffrep.pipelines`, the rest in the library packages) and prints.

Who may import it: nothing inside the library (the CLI sits on top of everything); the console
script ``diffrep = "diffrep.cli:main"``, ``python -m diffrep.cli`` and tests. Building the parser
imports no torch, MONAI or scikit-learn: the commands' modules import the library inside the
functions that run a command, so ``diffrep --help`` starts fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .anomaly import add_anomaly_cli
from .backbone import add_extract_cli, add_import_monai_cli, add_nodes_cli, add_zoo_cli
from .demo import add_demo_cli
from .likelihood import add_likelihood_cli
from .probe import add_probe_cli
from .segment import add_segment_cli
from .train import add_train_cli

_DESCRIPTION = "The ``diffrep`` command: thin wrappers over library calls."


def build_parser() -> argparse.ArgumentParser:
    """The ``diffrep`` parser with every command registered (imports no torch/MONAI/scikit-learn)."""
    parser = argparse.ArgumentParser(prog="diffrep", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    add_nodes_cli(sub)
    add_extract_cli(sub)
    add_train_cli(sub)
    add_import_monai_cli(sub)
    add_demo_cli(sub)
    add_anomaly_cli(sub)
    add_probe_cli(sub)
    add_segment_cli(sub)
    add_zoo_cli(sub)
    add_likelihood_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``diffrep`` command; bad input (ValueError/TypeError/OSError) is a message and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as err:  # bad input: a message, exit 2 (OSError: unreadable/missing files)
        print(f"diffrep {args.command}: error: {err}", file=sys.stderr)
        return 2

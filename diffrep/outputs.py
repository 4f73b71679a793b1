"""Output paths the commands write: never an input, never an existing file unless asked to replace it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same path, relative vs absolute, through a symlink or a hard link."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_file(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], *,
                      overwrite: bool = False, option: str = "--out") -> Path:
    """Refuse an output file that is one of ``inputs`` (always) or already exists (unless ``overwrite``).

    ``inputs`` maps what each input is (e.g. ``"input scan"``) to its path (None: not given). Call it
    before any work, so a refusal leaves every file as it was. Returns ``out`` as a Path.
    """
    out = Path(out)
    for what, path in inputs.items():
        if path is not None and same_file(out, path):
            raise ValueError(f"{option} {out}: expected a new output file, got the {what} {path} itself; "
                             f"writing there would destroy the {what}")
    if out.is_dir():
        raise ValueError(f"{option} {out}: expected a file name, got an existing directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{option} {out}: expected a new file, but it already exists; replace it with "
                              "--overwrite (overwrite=True), or choose another name")
    return out

"""Atomic file writes: write to a temporary name in the target's folder, then rename into place."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path next to ``target``; on success it becomes ``target`` (mode 0644).

    On any error the temporary file is removed and ``target`` is left as it was, so an interrupted
    run never leaves a half-written file under the final name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_json(target: str | os.PathLike, payload: Any, **dumps_options: Any) -> Path:
    """Write ``payload`` as JSON (``indent=2`` unless given, a final newline) to ``target`` atomically."""
    dumps_options.setdefault("indent", 2)
    atomic_write_bytes(target, (json.dumps(payload, **dumps_options) + "\n").encode())
    return Path(target)


def atomic_savefig(fig: Any, target: str | os.PathLike, **savefig_options: Any) -> Path:
    """Save a matplotlib figure to ``target`` atomically (the format follows ``target``'s suffix)."""
    with atomic_path(target, suffix=".tmp" + Path(target).suffix) as tmp:
        fig.savefig(tmp, **savefig_options)
    return Path(target)

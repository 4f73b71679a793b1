"""Streaming a feature file to disk: a safetensors file filled chunk by chunk, resumable after a kill.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range of every
tensor) and the tensors' bytes. When every shape is known in advance (N images x a node's channels and
size), the header can be written first and each chunk of images written straight to its rows' byte
range: memory holds one chunk, never the whole output, and the result is an ordinary safetensors file
(``safetensors.safe_open`` reads it lazily).

:class:`SafetensorsStream` writes to ``<out>.partial`` and records finished chunks in
``<out>.partial.json`` together with a fingerprint of everything that produced them; a rerun with the
same fingerprint computes only the missing chunks, and ``close`` renames the finished file into place.
A different fingerprint starts over. A chunk is marked done only after its bytes are flushed, so a kill
at any point loses at most the chunk being written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .._atomic import atomic_write_bytes

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class SafetensorsStream:
    """A safetensors file whose tensors are written row range by row range (rows = dim 0).

    Args:
        path: the final ``.safetensors`` file.
        specs: ``{name: (dtype, shape)}`` of every tensor (dim 0 = rows, e.g. images).
        metadata: string metadata for the header (``safe_open(...).metadata()``).
        fingerprint: JSON-able description of what produces the rows; a partial file written under
            another fingerprint is discarded.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str], fingerprint: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.progress = self.path.with_name(self.path.name + ".partial.json")
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        header, self._ranges, size = _header(specs, metadata)
        self._specs = {name: (dtype, tuple(shape)) for name, (dtype, shape) in specs.items()}
        self.done: set[int] = self._resume(header, size)
        self._file = open(self.partial, "r+b")

    def _resume(self, header: bytes, size: int) -> set[int]:
        """Chunks already written under the same fingerprint and header; otherwise a fresh, sized file."""
        if self.partial.is_file() and self.progress.is_file():
            try:
                record = json.loads(self.progress.read_text())
            except (OSError, ValueError):
                record = {}
            if record.get("fingerprint") == self.fingerprint and record.get("header_bytes") == len(header) \
                    and self.partial.stat().st_size == size:
                return {int(i) for i in record.get("done", [])}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "wb") as handle:
            handle.write(header)
            handle.truncate(size)  # sparse until written
        self._save_progress(set(), len(header))
        return set()

    def _save_progress(self, done: set[int], header_bytes: int | None = None) -> None:
        if header_bytes is None:
            header_bytes = json.loads(self.progress.read_text())["header_bytes"]
        record = {"fingerprint": self.fingerprint, "header_bytes": header_bytes, "done": sorted(done)}
        atomic_write_bytes(self.progress, json.dumps(record).encode())

    def write_rows(self, name: str, start: int, values: torch.Tensor) -> None:
        """Write ``values`` (rows ``start .. start + len(values)`` of tensor ``name``)."""
        dtype, shape = self._specs[name]
        if values.dtype != dtype or tuple(values.shape[1:]) != shape[1:] or start < 0 or start + len(values) > shape[0]:
            raise ValueError(f"{name}: expected rows of dtype {dtype} and shape {shape[1:]} within 0..{shape[0]}, "
                             f"got dtype {values.dtype}, shape {tuple(values.shape)} at row {start}")
        begin, row_bytes = self._ranges[name]
        self._file.seek(begin + start * row_bytes)
        self._file.write(values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    def mark_done(self, chunk: int) -> None:
        """Record chunk ``chunk`` as finished (after its rows are flushed to disk)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.add(int(chunk))
        self._save_progress(self.done)

    def close(self, num_chunks: int) -> Path:
        """Move the finished file into place (every chunk 0..num_chunks-1 must be done) and drop the progress."""
        self._file.close()
        missing = sorted(set(range(num_chunks)) - self.done)
        if missing:
            raise ValueError(f"{self.partial}: chunks {missing[:10]} are not written; rerun to finish them")
        os.replace(self.partial, self.path)
        self.progress.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Close the file after an error, keeping the partial file and its progress for a rerun."""
        self._file.close()


def _header(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
            metadata: Mapping[str, str]) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """The file's header bytes, each tensor's (absolute start, bytes per row), and the file size."""
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset, layout = 0, {}
    for name, (dtype, shape) in specs.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: expected a dtype in {sorted(map(str, SAFETENSORS_DTYPES))}, got {dtype}")
        row = torch.Size(shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
        layout[name] = (offset, row)
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + row * shape[0]]}
        offset += row * shape[0]
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the reference writer pads the header to 8 bytes
    start = 8 + len(text)
    header = len(text).to_bytes(8, "little") + text
    return header, {name: (start + begin, row) for name, (begin, row) in layout.items()}, start + offset

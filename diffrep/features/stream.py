"""Streaming a feature file to disk: a safetensors file filled chunk by chunk, resumable after a kill.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range of every
tensor) and the tensors' bytes. When every shape is known in advance (N images x a node's channels and
size), the header can be written first and each chunk of images written straight to its rows' byte
range: memory holds one chunk, never the whole output, and the result is an ordinary safetensors file
(``safetensors.safe_open`` reads it lazily).

:class:`SafetensorsStream` writes to ``<out>.partial`` (its fingerprint, of everything that produces the
rows, in ``<out>.partial.json``) and records each rank's finished chunks in ``<out>.partial.rank<r>.json``;
a rerun with the same fingerprint computes only the missing chunks, with any number of processes, and
``close`` renames the finished file into place. A different fingerprint starts over. A chunk is marked done only after its bytes are flushed, so a kill
at any point loses at most the chunk being written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

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
        rank, world_size, barrier: for several processes writing one file (torchrun): every rank opens
            the same partial file and writes its own chunks' byte ranges; each rank records its finished
            chunks in its own ``<out>.partial.rank<r>.json``; rank 0 prepares the file and finishes it.
            A resumed run may use another number of processes.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str], fingerprint: Mapping[str, Any], *, rank: int = 0,
                 world_size: int = 1, barrier: Callable[[], None] = lambda: None) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.record = self.path.with_name(self.path.name + ".partial.json")
        self.rank, self.world_size, self._barrier = int(rank), int(world_size), barrier
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        header, self._ranges, size = _header(specs, metadata)
        self._specs = {name: (dtype, tuple(shape)) for name, (dtype, shape) in specs.items()}
        self._owner = {"fingerprint": self.fingerprint, "header_bytes": len(header), "size": size}
        if self.rank == 0:
            self._prepare(header, size)
        self._barrier()
        self.done: set[int] = self._finished()
        self._mine: set[int] = set()
        self._file = open(self.partial, "r+b")

    def _rank_file(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.partial.rank{rank}.json")

    def _rank_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.partial.rank*.json"))

    def _prepare(self, header: bytes, size: int) -> None:
        """Keep a partial file written under the same fingerprint and layout; otherwise start a fresh one."""
        if self.partial.is_file() and self.partial.stat().st_size == size and _read_json(self.record) == self._owner:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self._rank_files():
            stale.unlink()
        with open(self.partial, "wb") as handle:
            handle.write(header)
            handle.truncate(size)  # sparse until written
        atomic_write_bytes(self.record, json.dumps(self._owner).encode())

    def _finished(self) -> set[int]:
        """Chunks recorded as finished by any rank of this or an earlier run with the same fingerprint."""
        done: set[int] = set()
        for path in self._rank_files():
            record = _read_json(path)
            if record.get("fingerprint") == self.fingerprint:
                done |= {int(i) for i in record.get("done", [])}
        return done

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
        """Record chunk ``chunk`` as finished by this rank (after its rows are flushed to disk)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._mine.add(int(chunk))
        self.done.add(int(chunk))
        previous = _read_json(self._rank_file(self.rank))
        earlier = set(previous.get("done", [])) if previous.get("fingerprint") == self.fingerprint else set()
        record = {"fingerprint": self.fingerprint, "done": sorted(earlier | self._mine)}
        atomic_write_bytes(self._rank_file(self.rank), json.dumps(record).encode())

    def close(self, num_chunks: int) -> Path:
        """Wait for every rank, then (rank 0) move the finished file into place and drop the records; every
        chunk 0..num_chunks-1 must be recorded as finished."""
        self._file.close()
        self._barrier()
        if self.rank == 0:
            missing = sorted(set(range(num_chunks)) - self._finished())
            if missing:
                raise ValueError(f"{self.partial}: chunks {missing[:10]} are not written; rerun to finish them")
            os.replace(self.partial, self.path)
            for path in self._rank_files() + [self.record]:
                path.unlink(missing_ok=True)
        self._barrier()
        return self.path

    def abort(self) -> None:
        """Close the file after an error, keeping the partial file and the records for a rerun."""
        self._file.close()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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

"""Peak resident memory (RSS) of a piece of work, measured in a fresh process.

Linux only. Inside the measured process: :func:`reset_peak` after imports and setup, run the work,
then :func:`peak_rss_mb`; ``report`` prints both as one JSON line that :func:`run_measured` parses
in the parent. ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` is kept as a cross-check: it is the
largest peak of any child waited for so far, so it is only meaningful for the first child.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from typing import Any, Sequence

MARK = "@@MEMORY@@"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line; expected a Linux kernel")
    return int(match.group(1))


def current_rss_mb() -> float:
    """Resident memory now (VmRSS), MiB."""
    return _status_kb("VmRSS") / 1024.0


def peak_rss_mb() -> float:
    """Peak resident memory since start or the last :func:`reset_peak` (VmHWM), MiB."""
    return _status_kb("VmHWM") / 1024.0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """``with PeakMeter() as m: work()`` then ``m.result()``: baseline, peak, and peak above baseline (MiB)."""

    def __enter__(self) -> "PeakMeter":
        self.reset = reset_peak()
        self.baseline_mb = current_rss_mb()
        self.start_peak_mb = peak_rss_mb()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_mb = peak_rss_mb()

    def result(self) -> dict[str, Any]:
        return {"baseline_rss_mb": round(self.baseline_mb, 1), "peak_rss_mb": round(self.peak_mb, 1),
                "work_peak_mb": round(self.peak_mb - self.baseline_mb, 1), "peak_reset": self.reset}


def report(payload: dict[str, Any]) -> None:
    """Print ``payload`` as the marked JSON line :func:`run_measured` looks for."""
    print(MARK + json.dumps(payload), flush=True)


def run_measured(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process; return its reported payload plus ``ru_maxrss_children_mb``."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"measured run {argv} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        raise RuntimeError(f"measured run {argv} printed no {MARK} line; stdout tail:\n{proc.stdout[-2000:]}")
    payload = json.loads(lines[-1][len(MARK):])
    payload["ru_maxrss_children_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1)
    return payload

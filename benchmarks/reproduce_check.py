"""Does a second run of a benchmark reproduce the first? Every reported mean, within its std.

Walks two result JSONs written by the same command and pairs every ``{"mean", "std", ...}`` entry at
the same place (rows are matched by their ``method`` name, or by position). A mean reproduces when the
second run's mean lies within the first run's std of it (and vice versa); an entry with std 0 must
agree exactly. Writes the comparison as JSON (default: ``<first stem>_reproduction.json`` next to it)
and exits 1 if any mean does not reproduce.

    python benchmarks/reproduce_check.py benchmarks/results/anomaly_brain.json benchmarks/results/anomaly_brain_rerun.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402


def _label(item: Any, index: int) -> str:
    return item.get("method", str(index)) if isinstance(item, dict) else str(index)


def mean_entries(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """(path, entry) of every dict with a numeric 'mean' and 'std' inside ``node``."""
    if isinstance(node, dict):
        if isinstance(node.get("mean"), (int, float)) and isinstance(node.get("std"), (int, float)):
            yield path, node
            return
        for key, value in node.items():
            yield from mean_entries(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from mean_entries(value, f"{path}[{_label(value, i)}]")


def compare(first: dict, second: dict) -> dict:
    """Per entry: both means and stds, the difference, and whether it lies within the spread."""
    a, b = dict(mean_entries(first)), dict(mean_entries(second))
    entries = []
    for path in sorted(set(a) & set(b)):
        ea, eb = a[path], b[path]
        diff = abs(eb["mean"] - ea["mean"])
        within = diff <= ea["std"] and diff <= eb["std"] if ea["std"] or eb["std"] else diff == 0
        entries.append({"path": path, "first": {"mean": ea["mean"], "std": ea["std"]},
                        "second": {"mean": eb["mean"], "std": eb["std"]}, "difference": diff,
                        "reproduced": bool(within)})
    return {"entries": entries, "compared": len(entries), "reproduced": sum(e["reproduced"] for e in entries),
            "only_in_first": sorted(set(a) - set(b)), "only_in_second": sorted(set(b) - set(a)),
            "max_difference": max((e["difference"] for e in entries), default=0.0),
            "all_reproduced": bool(entries) and all(e["reproduced"] for e in entries) and set(a) == set(b)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    first, second = (json.loads(f.read_text()) for f in (args.first, args.second))
    result = {"first": {"file": str(args.first), "command": first.get("command"), "git": first.get("git"),
                        "timestamp": first.get("timestamp")},
              "second": {"file": str(args.second), "command": second.get("command"), "git": second.get("git"),
                         "timestamp": second.get("timestamp")},
              "rule": "second mean within the first run's std and vice versa (exact when both stds are 0)",
              **compare(first, second)}
    out = args.out or args.first.with_name(f"{args.first.stem}_reproduction.json")
    write_json(result, out)
    print(f"{result['reproduced']}/{result['compared']} means reproduced (max difference "
          f"{result['max_difference']:.3g}); wrote {out}")
    return 0 if result["all_reproduced"] else 1


if __name__ == "__main__":
    sys.exit(main())

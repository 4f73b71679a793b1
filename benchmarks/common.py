"""Shared benchmark plumbing: settings (configs/benchmarks/), run metadata (command, versions, machine) and JSON output."""
from __future__ import annotations

import copy
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from diffrep._atomic import atomic_write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SETTINGS_DIR = Path(__file__).resolve().parents[1] / "configs" / "benchmarks"


def load_settings(name: str, directory: str | Path = SETTINGS_DIR) -> tuple[dict[str, Any], dict[str, Any]]:
    """FULL and QUICK of benchmark ``name``: the sections ``full`` and ``quick`` of ``configs/benchmarks/NAME.yaml``.

    ``quick`` holds the settings ``--quick`` replaces and may only name settings of ``full``; anything else
    (a missing file, other sections, an unknown name) is a ValueError naming the file.
    """
    import yaml

    path = Path(directory) / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"{path}: expected the settings of benchmark {name!r} (sections full and quick), not found")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or set(data) != {"full", "quick"} or not all(isinstance(v, dict) for v in data.values()):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected two mappings, full and quick, got {got}")
    unknown = sorted(set(data["quick"]) - set(data["full"]))
    if unknown:
        raise ValueError(f"{path}: quick: {unknown} are not settings of full; expected some of {sorted(data['full'])}")
    return data["full"], data["quick"]


def merge_settings(full: Mapping[str, Any], quick: Mapping[str, Any], use_quick: bool,
                   overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The benchmarks' one QUICK/FULL scheme: the settings of a run.

    ``full`` holds every setting of a full run; ``quick`` the values that ``--quick`` replaces (it may
    repeat FULL's); ``overrides`` the command-line options, each replacing both unless it is None
    (not given). QUICK and the overrides may only name FULL's settings.
    """
    overrides = dict(overrides or {})
    for what, names in (("QUICK", quick), ("overrides", overrides)):
        unknown = sorted(set(names) - set(full))
        if unknown:
            raise ValueError(f"{what}: {unknown} are not settings of FULL; expected some of {sorted(full)}")
    settings = {**full, **(quick if use_quick else {})}
    settings.update({name: value for name, value in overrides.items() if value is not None})
    return copy.deepcopy(settings)  # the caller may change its lists; FULL and QUICK stay as written


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    import monai
    import numpy
    import sklearn
    import timm
    import torch

    import diffrep

    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "timm": timm.__version__, "sklearn": sklearn.__version__, "numpy": numpy.__version__,
            "diffrep": diffrep.__version__}


def run_metadata(config: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """Command, config, seed, versions, machine and timestamp for a benchmark JSON."""
    import torch

    return {"command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "config": config, "seed": seed, "versions": versions(),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(),
                        "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},  # other work on the machine
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(payload: dict[str, Any], path: str | Path) -> Path:
    """Write a result JSON (atomically) and return its path."""
    return atomic_write_json(path, payload, default=float)


def random_init_control(backbone: Any, seed: int, seed_option: str = "the control's seed") -> Any:
    """A randomly initialised U-Net of ``backbone``'s architecture (``torch.manual_seed(seed)``): the
    control every benchmark compares the trained backbone against.

    Refuses (ValueError) when the control has exactly the trained backbone's identity (config and
    weights): then ``backbone`` is itself this random initialisation and the comparison would be void;
    ``seed_option`` names the option that picks another seed.
    """
    import copy

    import torch

    from diffrep.backbones import Backbone
    from diffrep.digests import backbone_identity

    torch.manual_seed(seed)
    config = copy.deepcopy(backbone.config)
    config.provenance = {"note": f"random initialisation (torch.manual_seed({seed})), same architecture"}
    control = Backbone(config)
    if backbone_identity(control) == backbone_identity(backbone):
        raise ValueError(f"the random-init control (torch.manual_seed({seed})) has exactly the weights of the "
                         f"backbone under test: that backbone is untrained; pass {seed_option} with another seed")
    return control


def interleaved_medians(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                        alternate: bool = False) -> dict[str, dict[str, Any]]:
    """Time each variant in turn, ``repeats`` rounds, so machine noise hits all alike; median, spread and the
    per-round samples (``samples_s``, round i of every variant adjacent in time: see :func:`paired_ratio`).
    ``alternate`` runs odd rounds in reverse order, so no variant always follows the same one."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(repeats):
        for name in (names[::-1] if alternate and round_ % 2 else names):
            start = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "repeats": len(s),
                   "samples_s": s} for name, s in samples.items()}


def paired_ratio(timings: dict[str, dict[str, Any]], numerator: str, denominator: str) -> dict[str, float]:
    """Median and quartiles over rounds of ``numerator``'s time / ``denominator``'s time in the same round.

    Pairing cancels the machine's slow drifts (another process, frequency changes) that a ratio of two
    medians keeps; the quartiles say how far one round's ratio can be trusted."""
    ratios = [a / b for a, b in zip(timings[numerator]["samples_s"], timings[denominator]["samples_s"])]
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "rounds": len(ratios)}


def git_revision() -> dict[str, Any]:
    """The repository commit and whether the working tree had changes ({} outside a git checkout)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": dirty}


def mean_std(values: list[float], ddof: int = 1) -> dict[str, Any]:
    """Mean and standard deviation (sample std, ddof=1, by default; 0.0 for a single value)."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    if len(values) < 2:
        std = 0.0
    else:
        std = statistics.stdev(values) if ddof == 1 else statistics.pstdev(values)
    return {"mean": mean, "std": std, "n": len(values), "values": values}


class Stopwatch:
    """Wall time per named stage: ``with watch("features"): ...``; ``watch.seconds`` is JSON-ready."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> "Stopwatch._Stage":
        return Stopwatch._Stage(self, name)

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    class _Stage:
        def __init__(self, watch: "Stopwatch", name: str) -> None:
            self.watch, self.name = watch, name

        def __enter__(self) -> None:
            self.start = time.perf_counter()

        def __exit__(self, *exc: Any) -> None:
            elapsed = time.perf_counter() - self.start
            self.watch.seconds[self.name] = round(self.watch.seconds.get(self.name, 0.0) + elapsed, 1)


def finish_metadata(meta: dict[str, Any], watch: Stopwatch | None = None) -> dict[str, Any]:
    """Add the finish timestamp, total and per-stage wall time, and the git revision to ``run_metadata``'s dict."""
    meta = dict(meta)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta.setdefault("machine", {})["load_average_at_finish"] = [round(v, 2) for v in os.getloadavg()]
    meta["git"] = git_revision()
    if watch is not None:
        meta["wall_seconds"] = watch.total()
        meta["stage_seconds"] = dict(watch.seconds)
    return meta

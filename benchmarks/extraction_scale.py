"""Streaming extraction at scale: time and peak RSS of `diffrep extract` as N grows, kill -9 and resume, torchrun.

Writes benchmarks/results/extraction_scale.json (``"complete": false`` and rewritten after every stage until
all have run). Every measured run is a fresh child process with one torch thread (OMP_NUM_THREADS=1,
MKL_NUM_THREADS=1; ``diffrep extract`` has no --threads option) and its peak RSS from ``os.wait4``
(the largest VmHWM of the child and its descendants, sampled every 50 ms; see ``run_child``):

1. torchrun: ``diffrep extract`` on the first ``torchrun_size`` images with 1 process, then with
   ``torch.distributed.run --nproc_per_node=2`` (gloo, 1 thread each): sha256 of both files (max abs
   difference if they differ) and the speed-up. Runs alone (it takes both cores).
2. full maps: ``diffrep extract BACKBONE X_N.npy --nodes ... --timesteps ... --dtype float16`` at every N of
   ``sizes``: wall time (process start to exit, start-up and the input check included), peak RSS, output
   bytes, time per image, and the marginal time per image between consecutive N.
3. kill -9 once ``kill_fraction`` of the chunks of the ``kill_size`` run are recorded done, then the same
   command again: sha256 against the uninterrupted run of stage 2, chunks done at the kill, chunks the rerun
   computed (the total of its progress bar) against the missing ones, and the rerun's time.
4. pooled: ``cached_pooled_features`` (global average, float16 store, a fresh cache) at every N: time
   (the child's wall and the call's own time) and peak RSS.

With ``lanes: 2`` stage 2 (one lane) runs beside stages 4 and 3 (the other lane; 3 waits for the sha256 of
stage 2 at its N), one child each, so every run of
stages 2-4 shares the machine with at most one other single-threaded run; the JSON records the lanes.

    python benchmarks/extraction_scale.py [--quick] [--sizes 2000 10000 60000] [--out PATH] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish_metadata, load_settings, merge_settings, run_metadata, write_json  # noqa: E402
from diffrep.digests import file_sha256  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RSS_TARGET = 1.15
STAGES = ("torchrun", "full", "kill", "pooled")
STAGE_KEYS = {"torchrun": "torchrun", "full": "full_maps", "kill": "kill_resume", "pooled": "pooled"}  # in the JSON


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny N (the quick section of the settings)")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--kill-size", type=int, default=None)
    parser.add_argument("--torchrun-size", type=int, default=None)
    parser.add_argument("--lanes", type=int, choices=(1, 2), default=None)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="the extraction noise seed (diffrep extract --seed)")
    parser.add_argument("--workdir", default=None, help="inputs and outputs (default: a temporary folder, removed)")
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/extraction_scale[_quick].json)")
    parser.add_argument("--merge", default=None, help="an earlier result JSON of this script: its stages are kept, the "
                                                      "--stages run now replace theirs (recorded as merged_from)")
    parser.add_argument("--pooled-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- children
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_MININTERVAL": "0",
                "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    return env


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                pass
    return found


def run_child(cmd: list[str], log: Path, kill_when: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (stdout and stderr to ``log``); wall time, exit status and peak RSS. With ``kill_when``,
    SIGKILL the child as soon as it returns True (polled every 50 ms).

    Peak RSS is the largest VmHWM (/proc/PID/status, the high-water RSS of the process's own memory since its
    exec) over the child and its descendants, sampled every 50 ms (``peak_rss_sum_mb``: their sum, for
    torchrun). ``ru_maxrss`` from os.wait4 is kept as ``ru_maxrss_mb`` but is not the measure: Linux starts a
    child's ru_maxrss at its parent's high-water mark (fork/exec), so it never reads below this process's peak.
    """
    start = time.perf_counter()
    hwm: dict[int, int] = {}
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=child_env(), cwd=str(log.parent))
        killed = False
        while True:
            for pid in _tree(proc.pid):
                value = _status_kb(pid, "VmHWM")
                if value:
                    hwm[pid] = max(hwm.get(pid, 0), value)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if kill_when is not None and not killed and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = max(hwm.values(), default=0)
    return {"wall_s": round(time.perf_counter() - start, 2), "returncode": proc.returncode, "killed": killed,
            "peak_rss_bytes": peak * 1024, "peak_rss_mb": round(peak / 1024, 1),
            "peak_rss_sum_mb": round(sum(hwm.values()) / 1024, 1), "processes_sampled": len(hwm),
            "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1), "command": " ".join(cmd), "log": log.name}


def extract_cmd(s: dict[str, Any], npy: Path, out: Path, seed: int) -> list[str]:
    return ["-m", "diffrep.cli", "extract", s["backbone"], str(npy), "--nodes", *s["nodes"],
            "--timesteps", *map(str, s["timesteps"]), "--batch-size", str(s["batch_size"]), "--dtype", s["dtype"],
            "--seed", str(seed), "--out", str(out)]


def sha256(path: Path) -> str:
    return file_sha256(path)


def progress_total(log: Path) -> int | None:
    """The total of the last `extract` progress bar in a log: the chunks that run computed."""
    hits = re.findall(r"extract:\s*\d+%\|[^|]*\|\s*\d+/(\d+)", log.read_text(errors="replace"))
    return int(hits[-1]) if hits else None


def done_chunks(out: Path) -> int:
    done: set[int] = set()
    for record in out.parent.glob(f"{out.name}.partial.rank*.json"):
        try:
            done |= set(json.loads(record.read_text()).get("done", []))
        except (OSError, ValueError):
            pass
    return len(done)


def max_abs_difference(a: Path, b: Path) -> float:
    import torch
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        for name in fa.keys():
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
            worst = max(worst, float((x - y).abs().max()) if x.shape == y.shape else float("inf"))
    del torch
    return worst


def pooled_child(spec_json: str) -> None:
    """Child of stage 4: cached_pooled_features on one .npy, printing its own time as JSON."""
    import numpy as np
    import torch

    from diffrep.backbones import load_backbone
    from diffrep.features.cache import cached_pooled_features

    spec = json.loads(spec_json)
    torch.set_num_threads(1)
    backbone = load_backbone(spec["backbone"])
    images = torch.from_numpy(np.load(spec["npy"]))
    start = time.perf_counter()
    pooled = cached_pooled_features(backbone, images, spec["nodes"], spec["timesteps"], seed=spec["seed"],
                                    cache_dir=spec["cache_dir"], dataset_id=f"fmnist-train-{len(images)}",
                                    chunk_size=spec["chunk_size"], batch_size=spec["batch_size"],
                                    dtype="float16", progress=False)
    elapsed = time.perf_counter() - start
    print("POOLED " + json.dumps({"call_s": round(elapsed, 2),
                                  "shapes": {f"{k.node}@{k.timestep}": list(v.shape) for k, v in pooled.items()}}))


# ---------------------------------------------------------------------------------------------- stages
class Bench:
    def __init__(self, s: dict[str, Any], args: argparse.Namespace, work: Path, out: Path, meta: bool = True) -> None:
        self.s, self.args, self.work, self.out = s, args, work, out
        self.lock = threading.Lock()
        self.meta = run_metadata(s, args.seed) if meta else {}
        self.result: dict[str, Any] = {"torchrun": None, "full_maps": {}, "kill_resume": None, "pooled": {}}
        self.errors: list[str] = []

    def npy(self, n: int) -> Path:
        return self.work / f"x{n}.npy"

    def merge(self, earlier: Path) -> None:
        """Start from the stages of an earlier run of this script with the same settings (a run split over
        sessions); the stages run now replace theirs. The earlier run's identity is recorded."""
        previous = json.loads(earlier.read_text())
        if previous.get("config") != self.s:
            raise ValueError(f"--merge: {earlier} was run with settings {previous.get('config')}, not {self.s}")
        rerun = {STAGE_KEYS[stage] for stage in self.args.stages}
        kept = [key for key in self.result if key not in rerun]
        for key in kept:
            self.result[key] = previous["stages"][key]
        self.errors += [f"earlier run: {e}" for e in previous.get("errors", [])]
        self.meta["merged_from"] = {"path": str(earlier), "command": previous.get("command"),
                                    "timestamp": previous.get("timestamp"), "finished": previous.get("finished"),
                                    "git": previous.get("git"), "machine": previous.get("machine"), "stages_kept": kept}

    def prepare_inputs(self) -> dict[str, Any]:
        """Write X_N.npy in a child process (this process stays small: its children start from its RSS)."""
        log = self.work / "prepare.log"
        run = run_child([sys.executable, str(Path(__file__).resolve()), "--prepare-child",
                         json.dumps({"backbone": self.s["backbone"], "sizes": sorted({*self.s["sizes"], self.s["kill_size"],
                                     self.s["torchrun_size"]}), "work": str(self.work)})], log)
        found = re.findall(r"^PREPARED (.*)$", log.read_text(errors="replace"), flags=re.M)
        if run["returncode"] != 0 or not found:
            raise RuntimeError(f"preparing the inputs failed (exit code {run['returncode']}): {log.read_text()[-2000:]}")
        return json.loads(found[-1])

    def prepare_inputs_here(self) -> dict[str, Any]:
        import numpy as np

        from diffrep.backbones import load_backbone
        from diffrep.pipelines.probe import load_probe_dataset

        s = self.s
        need = sorted({*s["sizes"], s["kill_size"], s["torchrun_size"]})
        backbone = load_backbone(s["backbone"])
        images, _, _, _, info = load_probe_dataset("fmnist", backbone, limit_train=max(need), limit_test=1)
        if len(images) < max(need):
            raise ValueError(f"sizes: expected at most the {len(images)} Fashion-MNIST train images, got {max(need)}")
        array = images.numpy()
        for n in need:
            np.save(self.npy(n), array[:n])
        return {"dataset": "fashion-mnist train, first N images", "preparation": "diffrep.pipelines.probe.load_probe_dataset "
                "(float32 in the backbone's data range, saved as .npy)", **{k: info[k] for k in ("image_size", "padding")}}

    def save(self, complete: bool = False) -> None:
        with self.lock:
            payload = {**finish_metadata(self.meta), "complete": complete, "errors": list(self.errors),
                       "stages": json.loads(json.dumps(self.result)), "ratios": self.ratios(), "targets": self.targets()}
            write_json(payload, self.out)

    # ------------------------------------------------------------------ 1. torchrun
    def torchrun(self) -> None:
        s, n = self.s, self.s["torchrun_size"]
        one, two = self.work / f"tr_one_{n}.safetensors", self.work / f"tr_two_{n}.safetensors"
        single = run_child([sys.executable, *extract_cmd(s, self.npy(n), one, self.args.seed)], self.work / "tr_one.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={s['torchrun_procs']}",
               f"--master_port={free_port()}", *extract_cmd(s, self.npy(n), two, self.args.seed)]
        multi = run_child(cmd, self.work / "tr_two.log")
        record: dict[str, Any] = {"n": n, "one_process": single, "torchrun": {**multi, "processes": s["torchrun_procs"],
                                                                            "threads_each": 1, "backend": "gloo"}}
        if single["returncode"] == 0 and multi["returncode"] == 0:
            a, b = sha256(one), sha256(two)
            record.update({"sha256_one": a, "sha256_torchrun": b, "identical": a == b,
                           "max_abs_difference": 0.0 if a == b else max_abs_difference(one, two),
                           "speedup": round(single["wall_s"] / multi["wall_s"], 3)})
        else:
            self.errors.append(f"torchrun stage: exit codes {single['returncode']}, {multi['returncode']} (see logs)")
        for path in (one, two):
            path.unlink(missing_ok=True)
        self.result["torchrun"] = record
        self.save()

    # ------------------------------------------------------------------ 2. full maps and 3. kill -9
    def full_maps(self, n: int, lane: str) -> None:
        out = self.work / f"full_{n}.safetensors"
        run = run_child([sys.executable, *extract_cmd(self.s, self.npy(n), out, self.args.seed)], self.work / f"full_{n}.log")
        record = {"n": n, "lane": lane, **run}
        if run["returncode"] == 0:
            size = out.stat().st_size
            record.update({"output_bytes": size, "output_gb": round(size / 1e9, 3), "sha256": sha256(out),
                           "s_per_image": round(run["wall_s"] / n, 5),
                           "chunks_computed": progress_total(self.work / f"full_{n}.log")})
        else:
            self.errors.append(f"full maps N={n}: exit code {run['returncode']} (see {record['log']})")
        out.unlink(missing_ok=True)
        with self.lock:
            self.result["full_maps"][str(n)] = record
        self.save()

    def kill_resume(self, lane: str) -> None:
        s, n = self.s, self.s["kill_size"]
        reference = self.result["full_maps"].get(str(n))
        if reference is None or "sha256" not in reference:
            self.full_maps(n, lane)
            reference = self.result["full_maps"][str(n)]
        out = self.work / f"kill_{n}.safetensors"
        chunks = -(-n // s["batch_size"])
        threshold = max(1, int(round(chunks * s["kill_fraction"])))
        cmd = [sys.executable, *extract_cmd(s, self.npy(n), out, self.args.seed)]
        killed = run_child(cmd, self.work / "kill_first.log", kill_when=lambda: done_chunks(out) >= threshold)
        at_kill = done_chunks(out)
        rerun = run_child(cmd, self.work / "kill_rerun.log")
        computed = progress_total(self.work / "kill_rerun.log")
        record: dict[str, Any] = {"n": n, "lane": lane, "chunks": chunks, "kill_after_chunks_done": threshold,
                                  "killed_run": killed, "chunks_done_at_kill": at_kill, "rerun": rerun,
                                  "rerun_chunks_computed": computed, "missing_chunks": chunks - at_kill,
                                  "computed_only_missing": computed == chunks - at_kill,
                                  "partial_files_left": sorted(p.name for p in self.work.glob(f"{out.name}.partial*"))}
        if rerun["returncode"] == 0 and out.is_file():
            digest = sha256(out)
            record.update({"sha256": digest, "sha256_uninterrupted": reference.get("sha256"),
                           "identical_to_uninterrupted": digest == reference.get("sha256"),
                           "rerun_over_uninterrupted_time": round(rerun["wall_s"] / reference["wall_s"], 3),
                           "killed_plus_rerun_over_uninterrupted_time":
                               round((killed["wall_s"] + rerun["wall_s"]) / reference["wall_s"], 3)})
        else:
            self.errors.append(f"kill/resume: rerun exit code {rerun['returncode']} (see kill_rerun.log)")
        out.unlink(missing_ok=True)
        with self.lock:
            self.result["kill_resume"] = record
        self.save()

    # ------------------------------------------------------------------ 4. pooled
    def pooled(self, n: int, lane: str) -> None:
        s = self.s
        cache = self.work / f"pooled_cache_{n}"
        spec = {"backbone": s["backbone"], "npy": str(self.npy(n)), "nodes": s["nodes"], "timesteps": s["timesteps"],
                "seed": self.args.seed, "cache_dir": str(cache), "chunk_size": s["pooled_chunk_size"],
                "batch_size": s["batch_size"]}
        run = run_child([sys.executable, str(Path(__file__).resolve()), "--pooled-child", json.dumps(spec)],
                        self.work / f"pooled_{n}.log")
        record: dict[str, Any] = {"n": n, "lane": lane, **run}
        text = (self.work / f"pooled_{n}.log").read_text(errors="replace")
        found = re.findall(r"^POOLED (.*)$", text, flags=re.M)
        if run["returncode"] == 0 and found:
            inner = json.loads(found[-1])
            record.update({**inner, "s_per_image": round(run["wall_s"] / n, 5),
                           "cache_bytes": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())})
        else:
            self.errors.append(f"pooled N={n}: exit code {run['returncode']} (see {record['log']})")
        shutil.rmtree(cache, ignore_errors=True)
        with self.lock:
            self.result["pooled"][str(n)] = record
        self.save()

    # ------------------------------------------------------------------ ratios
    def ratios(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in ("full_maps", "pooled"):
            runs = {int(n): r for n, r in self.result[kind].items() if r.get("returncode") == 0}
            if len(runs) < 2:
                continue
            sizes = sorted(runs)
            lo, hi = sizes[0], sizes[-1]
            row = {"sizes": [lo, hi], "images_ratio": hi / lo,
                   "time_ratio": round(runs[hi]["wall_s"] / runs[lo]["wall_s"], 3),
                   "peak_rss_ratio": round(runs[hi]["peak_rss_bytes"] / runs[lo]["peak_rss_bytes"], 3),
                   "peak_rss_mb": {str(n): runs[n]["peak_rss_mb"] for n in sizes},
                   "s_per_image": {str(n): runs[n]["s_per_image"] for n in sizes},
                   "marginal_s_per_image": {f"{a}->{b}": round((runs[b]["wall_s"] - runs[a]["wall_s"]) / (b - a), 5)
                                            for a, b in zip(sizes, sizes[1:])}}
            if "call_s" in runs[lo] and "call_s" in runs[hi]:
                row["call_time_ratio"] = round(runs[hi]["call_s"] / runs[lo]["call_s"], 3)
            out[kind] = row
        tr = self.result["torchrun"]
        if tr and "speedup" in tr:
            out["torchrun_speedup"] = tr["speedup"]
        kr = self.result["kill_resume"]
        if kr and "rerun_over_uninterrupted_time" in kr:
            out["kill_resume_rerun_over_uninterrupted_time"] = kr["rerun_over_uninterrupted_time"]
        return out

    def targets(self) -> dict[str, Any]:
        r, t = self.ratios(), {}
        if "full_maps" in r:
            f = r["full_maps"]
            t["full_maps_peak_rss_within_1.15"] = {"value": f["peak_rss_ratio"], "met": f["peak_rss_ratio"] <= RSS_TARGET}
            t["full_maps_time_linear"] = {"value": f["time_ratio"], "linear": f["images_ratio"],
                                          "note": "wall includes a fixed start-up (imports, backbone, input check)"}
        if "pooled" in r:
            p = r["pooled"]
            t["pooled_peak_rss_within_1.15"] = {"value": p["peak_rss_ratio"], "met": p["peak_rss_ratio"] <= RSS_TARGET}
        kr = self.result["kill_resume"]
        if kr and "identical_to_uninterrupted" in kr:
            t["kill_resume_identical_and_only_missing"] = {
                "met": bool(kr["identical_to_uninterrupted"] and kr["computed_only_missing"])}
        tr = self.result["torchrun"]
        if tr and "identical" in tr:
            t["torchrun_identical"] = {"met": tr["identical"], "max_abs_difference": tr["max_abs_difference"]}
        return t


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pooled_child is not None:
        pooled_child(args.pooled_child)
        return 0
    if args.prepare_child is not None:
        spec = json.loads(args.prepare_child)
        bench = Bench({"backbone": spec["backbone"], "sizes": spec["sizes"], "kill_size": spec["sizes"][0],
                       "torchrun_size": spec["sizes"][0]}, args, Path(spec["work"]), Path(os.devnull), meta=False)
        print("PREPARED " + json.dumps(bench.prepare_inputs_here()))
        return 0
    full, quick = load_settings("extraction_scale")
    s = merge_settings(full, quick, args.quick, {"backbone": args.backbone, "sizes": args.sizes,
                                                 "kill_size": args.kill_size, "torchrun_size": args.torchrun_size,
                                                 "lanes": args.lanes})
    s["sizes"] = sorted(s["sizes"])
    out = Path(args.out) if args.out else RESULTS_DIR / f"extraction_scale{'_quick' if args.quick else ''}.json"
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="extraction_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(s, args, work, out)
    if args.merge:
        bench.merge(Path(args.merge))
    bench.meta["input"] = bench.prepare_inputs()
    bench.meta["threads"] = {"per_process": 1, "how": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 (diffrep extract has no --threads)"}
    bench.meta["workdir"] = str(work)
    bench.meta["stages_run"] = list(args.stages)
    bench.save()
    if "torchrun" in args.stages:
        bench.torchrun()

    # the full-map lane holds the runs whose ratios are the point (2k..60k); the other lane takes pooled
    # features and, once the uninterrupted run of its N has its sha256, the kill -9 / resume runs
    reference_ready = threading.Event()

    def lane_full() -> None:
        try:
            for n in s["sizes"] if "full" in args.stages else []:
                bench.full_maps(n, "full")
                if n == s["kill_size"]:
                    reference_ready.set()
        finally:
            reference_ready.set()

    def lane_other() -> None:
        kill_done = "kill" not in args.stages
        for n in s["sizes"]:
            if s["pooled"] and "pooled" in args.stages:
                bench.pooled(n, "other")
            if n >= s["kill_size"] and not kill_done:
                reference_ready.wait()
                bench.kill_resume("other")
                kill_done = True
        if not kill_done:
            reference_ready.wait()
            bench.kill_resume("other")

    lanes = [lane_full, lane_other]
    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception as err:  # noqa: BLE001  (recorded; the other lane goes on)
                with bench.lock:
                    bench.errors.append(f"{fn.__name__}: {type(err).__name__}: {err}")
        return run

    lanes = [guarded(fn) for fn in lanes]
    if s["lanes"] == 2:
        threads = [threading.Thread(target=fn) for fn in lanes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for fn in lanes:
            fn()
    bench.save(complete=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(bench.ratios(), indent=1))
    print(f"wrote {out}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())

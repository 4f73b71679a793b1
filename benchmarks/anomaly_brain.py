"""Brain-MRI anomaly segmentation: diffusion-U-Net scorers against AnoDDPM, a DAE and a random-U-Net control.

Data (MNI152 slices, 64 x 64; synthetic lesions from ``diffrep.data.lesions``):
- fit: the healthy train split (93 slices), used by scorers that learn something (ensemble statistics,
  feature-distance memory banks, the DAE, which trains on it with the brain augmentation of brain-ddpm);
- selection: a lesioned validation set, ``copies`` augmented copies of the val split (14 slices) with
  lesions in half of them, drawn from a lesion-seed range the test sets never use. Every setting
  (timestep L, noise type, mask erosion, median filter, ensemble levels, feature nodes/timesteps)
  is chosen there by pixel AUPRC; the whole table is written to the JSON;
- thresholds: healthy validation slices (the val split, augmented copies, no lesions) fix the threshold
  that flags 1% of healthy brain pixels ("Dice at 1% FPR");
- test: ``test_copies`` augmented copies of the test split (20 slices), lesions in half, one set per
  lesion seed; each set is scored once per noise seed (the seed of every noise draw of the scorer, and of
  what a scorer fits on healthy data). Metrics are mean +- std over all lesion seeds x noise seeds, with
  the spread split into lesion-seed and noise-seed parts. Scorers without noise (the DAE) are scored once
  per lesion seed. Augmentation seeds are the same for every lesion seed.

Caches (trained DAE, finished maps) are keyed by everything that produced them, including a digest of
the diffrep source and of this benchmark's code (``diffrep._provenance.code_digest``): a cache written
by other code is never read.

Rows: AnoDDPM-style partial diffusion (L = 250, full ancestral DDPM chain, Gaussian and simplex noise), the
single-step x0 scorer at several L, k-step DDIM (k = 2, 5, 10), the multi-level ensemble, the
feature-distance scorer, the coarse-noise DAE, and controls on a randomly initialised U-Net of the same
architecture: the headline scorer (the best one with <= 10 U-Net calls by validation AUPRC), the best such
reconstruction scorer and the feature-distance scorer, each with its validation-chosen settings.
Columns: pixel AUPRC, best Dice, Dice at 1% healthy FPR, pixel AUROC, image AUROC/AP, U-Net calls per
slice and seconds per slice. Timing: every method scores the same test set in
one process, methods interleaved within each (lesion seed, noise seed); the median over them is reported.

Settings: ``configs/benchmarks/anomaly_brain.yaml`` (``full``; ``quick`` over it with ``--quick``; the
options given over both).

Writes ``--out`` (default benchmarks/results/anomaly_brain.json) and ``<out stem>_maps.png`` next to it.

    python benchmarks/anomaly_brain.py [--backbone brain-ddpm] [--quick] [--seeds 0 1 2] [--noise-seeds 0 1 2] [--dae-steps N]
                                       [--cache-dir .cache/anomaly] [--out PATH] [--threads 1]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly_cache import MapCache  # noqa: E402
from common import (RESULTS_DIR, Stopwatch, finish_metadata, load_settings, mean_std, merge_settings,  # noqa: E402
                    random_init_control, run_metadata, write_json)

from diffrep import load_backbone  # noqa: E402
from diffrep.anomaly import (CalibratedScorer, DAEScorer, FeatureDistanceScorer, MultiLevelScorer, ReconstructionScorer,  # noqa: E402
                             brain_augment, postprocess_maps)
from diffrep.anomaly.metrics import best_dice, evaluate_anomaly, pixel_auprc  # noqa: E402
from diffrep.backbones import Backbone  # noqa: E402
from diffrep.data.augment import augment_batch, brain_augmentation  # noqa: E402
from diffrep.data.lesions import make_anomaly_test_set  # noqa: E402
from diffrep._atomic import atomic_write_json  # noqa: E402
from diffrep._provenance import code_digest  # noqa: E402
from diffrep.digests import array_digest, backbone_identity, json_digest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOISES = {"gaussian": ("gaussian", None), "simplex": ("simplex", None),  # simplex defaults = AnoDDPM's (64 px)
          "simplex-f16": ("simplex", {"frequency": 16.0})}             # AnoDDPM's 64 px at 256^2, scaled to 64^2
FULL, QUICK = load_settings("anomaly_brain")  # configs/benchmarks/anomaly_brain.yaml
DAE_NAME = "DAE (coarse noise, Kascenas et al.)"
TARGETS = {"max_unet_calls": 10, "anoddpm_auprc_gain_min": 0.10, "anoddpm_calls_ratio_min": 25.0}
METRICS = ("pixel_auprc", "best_dice", "dice_at_fpr", "pixel_auroc", "image_auroc", "image_ap")
# The code that computes maps: every cache entry is keyed by it (edit the code, recompute the maps).
HERE = Path(__file__).resolve().parent
CODE = code_digest(["diffrep"], [HERE / "anomaly_brain.py", HERE / "anomaly_cache.py"])
SEEDS = {"test_lesions": 1000, "val_lesions": 10**6, "test_aug": 500_000, "val_aug": 600_000, "healthy_aug": 700_000}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="brain-ddpm", help="checkpoint directory or shipped default name")
    p.add_argument("--quick", action="store_true", help="few slices, 1 seed, AnoDDPM L=20, tiny grids and DAE (the quick "
                   "section of configs/benchmarks/anomaly_brain.yaml)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="lesion-generator seeds (default 0 1 2)")
    p.add_argument("--noise-seeds", nargs="+", type=int, default=None,
                   help="scorer noise seeds, each applied to every lesion seed (default 0 1 2)")
    p.add_argument("--dae-steps", type=int, default=None, help=f"DAE training steps (default {FULL['dae_steps']})")
    p.add_argument("--copies", type=int, default=None, help="augmented copies per validation slice (default 4)")
    p.add_argument("--test-copies", type=int, default=None, help="augmented lesioned copies per test slice (default 2)")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "anomaly"), help="trained-DAE cache")
    p.add_argument("--map-cache", default=str(REPO / ".cache" / "anomaly" / "maps"),
                   help="finished maps per (method, settings, weights, image set); a rerun resumes from them")
    p.add_argument("--no-map-cache", action="store_true", help="recompute every map")
    p.add_argument("--out", default=str(RESULTS_DIR / "anomaly_brain.json"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--control-seed", type=int, default=0, help="torch seed of the random-init U-Net")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.grid = merge_settings(FULL, QUICK, args.quick,
                               {key: getattr(args, key) for key in ("seeds", "noise_seeds", "dae_steps", "copies", "test_copies")})
    return args


# ------------------------------------------------------------------------------------------- data
def load_split(split: str, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, 1, S, S) in [0, 1], brain masks bool) of one MNI152 split (tests replace this)."""
    from diffrep.data.brain import load_brain_split

    s = load_brain_split(split, size)
    return torch.from_numpy(s.images), torch.from_numpy(s.masks)


def take(data: tuple[torch.Tensor, torch.Tensor], n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evenly spaced slices (all if None)."""
    if n is None or n >= len(data[0]):
        return data
    idx = torch.from_numpy(np.linspace(0, len(data[0]) - 1, n).round().astype(np.int64))
    return data[0][idx], data[1][idx]


def build_set(data: tuple[torch.Tensor, torch.Tensor], copies: int, aug_seed: int, lesion_seed: int | None) -> dict:
    """``copies`` augmented copies of the slices (copy c: augmentation seed aug_seed + c), lesioned in half
    of each copy (lesion seed lesion_seed + c) unless ``lesion_seed`` is None. Numpy arrays, masks (N, H, W)."""
    parts = []
    for c in range(copies):
        images, masks = data
        labels = torch.zeros(len(images), *images.shape[2:], dtype=torch.long)
        x, m, _ = augment_batch(brain_augmentation(aug_seed + c), images, masks, labels)
        if lesion_seed is None:
            parts.append({"images": x, "lesion_masks": torch.zeros_like(m), "brain_masks": m,
                          "labels": torch.zeros(len(x), dtype=torch.int64), "kinds": ["none"] * len(x)})
        else:
            parts.append(make_anomaly_test_set(x, m, seed=lesion_seed + c))
    cat = {k: torch.cat([p[k] for p in parts]).numpy() for k in ("images", "lesion_masks", "brain_masks", "labels")}
    return {"images": cat["images"], "lesion": cat["lesion_masks"][:, 0], "brain": cat["brain_masks"][:, 0],
            "labels": cat["labels"], "kinds": sum((p["kinds"] for p in parts), [])}


def describe(s: dict) -> dict:
    kinds = {k: s["kinds"].count(k) for k in sorted(set(s["kinds"]))}
    return {"images": len(s["images"]), "anomalous": int(s["labels"].sum()), "kinds": kinds,
            "lesion_pixel_fraction_of_brain": float(s["lesion"].sum() / max(s["brain"].sum(), 1))}


# ---------------------------------------------------------------------------------------- methods
@dataclass
class Spec:
    """A benchmark row: ``factory(backbone, settings) -> scorer``; ``candidates`` are searched on validation
    (each with the post-processing grid on top); ``needs_fit``: fit on the healthy train slices."""

    name: str
    factory: Callable[[Backbone, dict], Any]
    candidates: list[dict]
    needs_fit: bool = False
    kind: str = "diffrep"  # diffrep | baseline | control | "baseline + diffrep calibration"
    noisy: bool = True     # False: the scorer draws no noise, so noise seeds cannot change its maps


# A row's settings keep the names the result JSONs record (report.py and earlier runs read them): "noise" is a
# NOISES key (the library's noise_type and its options), "noise_level" the timestep L, "draws" the number of
# per-image draws averaged (the policy "per_image_ensemble(k)"), "levels" a multi-level ensemble's timesteps.
def recon(backbone: Backbone, s: dict) -> ReconstructionScorer:
    noise_type, options = NOISES[s["noise"]]
    draws = s.get("draws", 1)
    return ReconstructionScorer(backbone, timestep=s["noise_level"], noise_type=noise_type, noise_type_options=options,
                                reverse=s["reverse"], ddim_steps=s.get("k", 5), residual=s.get("residual", "l1"),
                                erode=s["erode"], median=s["median"], seed=s.get("seed", 0),
                                noise="per_image" if draws == 1 else f"per_image_ensemble({draws})")


def calibrated(backbone: Backbone, s: dict) -> CalibratedScorer:
    """The x0 scorer with its residual z-scored against healthy look-alike pixels (diffrep.anomaly.calibration)."""
    base = recon(backbone, {**s, "erode": 0, "median": 0})
    return CalibratedScorer(base, bins=s["bins"], erode=s["erode"], median=s["median"])


def ensemble(backbone: Backbone, s: dict) -> MultiLevelScorer:
    noise_type, options = NOISES[s["noise"]]
    return MultiLevelScorer(backbone, timesteps=tuple(s["levels"]), erode=s["erode"], median=s["median"],
                            scorer_params={"reverse": "x0", "noise_type": noise_type, "noise_type_options": options,
                                           "seed": s.get("seed", 0)})


def features(backbone: Backbone, s: dict) -> FeatureDistanceScorer:
    nodes = [n for n in s["nodes"] if n in backbone.node_names] or backbone.node_names[-1:]
    return FeatureDistanceScorer(backbone, nodes=nodes, timesteps=s["timesteps"], method=s["method"],
                                 max_pixels=s["max_pixels"], pca_components=s["pca"], erode=s["erode"],
                                 median=s["median"], seed=s.get("seed", 0))


def dae_factory(train: tuple[torch.Tensor, torch.Tensor], steps: int, cache_dir: Path, info: dict,
                progress: bool) -> Callable[[Backbone, dict], DAEScorer]:
    """A factory of the DAE (trained once on the train split + brain augmentation, cached on disk by its settings)."""
    data_hash = array_digest(train[0], train[1])
    recipe = {"channels": [32, 64, 128, 256], "strides": [2, 2, 2], "num_res_units": 2, "noise_resolution": 16,
              "noise_std": 0.2, "steps": steps, "batch_size": 16, "lr": 1e-4, "seed": 0,
              "augment": "brain_augment(prob=0.5), as brain-ddpm", "data": data_hash, "code": CODE}
    key = json_digest(recipe)
    path = cache_dir / f"dae-{key}"
    info.update(recipe=recipe, cache=str(path))

    def factory(_backbone: Backbone, s: dict) -> DAEScorer:
        if not (path / "config.json").is_file():
            start = time.perf_counter()
            dae = DAEScorer(channels=tuple(recipe["channels"]), strides=tuple(recipe["strides"]),
                            num_res_units=recipe["num_res_units"], noise_resolution=recipe["noise_resolution"],
                            noise_std=recipe["noise_std"], steps=steps, train_batch_size=recipe["batch_size"],
                            lr=recipe["lr"], seed=recipe["seed"], augment=brain_augment(), progress=progress)
            dae.fit(train[0], train[1])
            every = max(1, steps // 100)  # a 100-point loss curve, to judge convergence
            curve = {"every": every, "loss": [float(np.mean(dae.loss_history_[i:i + every]))
                                              for i in range(0, steps, every)],
                     "train_seconds": round(time.perf_counter() - start, 1)}
            dae.save(path)
            atomic_write_json(path / "loss_curve.json", curve)
            info["trained_here"] = True
        dae = DAEScorer.load(path)
        info.setdefault("trained_here", False)
        info.update(training=dae.training_, **json.loads((path / "loss_curve.json").read_text()))
        return dae.set_params(erode=s["erode"], median=s["median"])

    return factory


def method_specs(g: dict, dae: Callable) -> list[Spec]:
    noises = g["noises"]
    anoddpm = {"reverse": "ddpm", "noise_level": g["anoddpm_level"], "residual": "l2"}
    specs = [Spec(f"AnoDDPM-style DDPM L={g['anoddpm_level'] + 1}, {noise}", recon, [{**anoddpm, "noise": noise}],
                  kind="baseline") for noise in ("gaussian", "simplex")]
    specs += [Spec(f"x0 single step, L={L}", recon, [{"reverse": "x0", "noise_level": L, "noise": n} for n in noises])
              for L in g["x0_levels"]]
    specs += [Spec(f"DDIM k={k}", recon, [{"reverse": "ddim", "k": k, "noise_level": L, "noise": n}
                                           for L in g["ddim_levels"] for n in noises]) for k in g["ddim_steps"]]
    specs.append(Spec("x0, mean of K noise draws", recon,
                      [{"reverse": "x0", "noise_level": L, "noise": n, "draws": k}
                       for L in g["draws_levels"] for n in noises for k in g["draws"]]))
    specs.append(Spec("x0 single step + healthy calibration", calibrated,
                      [{"reverse": "x0", "noise_level": L, "noise": n, "bins": g["calibration_bins"]}
                       for L in g["calibrated_levels"] for n in noises], needs_fit=True))
    specs.append(Spec("multi-level x0 ensemble", ensemble,
                      [{"levels": lv, "noise": n} for lv in g["ensembles"] for n in noises], needs_fit=True))
    specs.append(Spec("feature distance", features,
                      [{"method": m, "nodes": nd, "timesteps": ts, "max_pixels": g["max_pixels"], "pca": g["pca"]}
                       for m in g["feature_methods"] for nd in g["feature_nodes"] for ts in g["feature_timesteps"]],
                      needs_fit=True))
    specs.append(Spec(DAE_NAME, dae, [{}], kind="baseline", noisy=False))

    def dae_calibrated(backbone: Backbone, s: dict) -> CalibratedScorer:
        return CalibratedScorer(dae(backbone, {"erode": 0, "median": 0}), bins=s["bins"], erode=s["erode"],
                                median=s["median"])

    # not a diffrep row: the calibration applied to the baseline, to show how much of its gain is the DAE's too
    specs.append(Spec(f"{DAE_NAME} + healthy calibration", dae_calibrated, [{"bins": g["calibration_bins"]}],
                      needs_fit=True, kind="baseline + diffrep calibration", noisy=False))
    return specs


# ------------------------------------------------------------------------------------ evaluation
def timed_score(scorer: Any, images: np.ndarray, brain: np.ndarray | None) -> dict:
    """Maps, image scores and seconds per slice of one scoring call."""
    start = time.perf_counter()
    result = scorer.score(images, brain) if brain is not None else scorer.score(images)
    return {"maps": result.maps, "scores": result.scores,
            "seconds_per_slice": (time.perf_counter() - start) / len(images)}


def cache_key(spec: Spec, settings: dict, backbone: Backbone, stage: str, data: dict, dae_info: dict) -> dict:
    """What a cached map depends on: the code, method, settings (noise seed included), network weights,
    image set and stage."""
    weights = dae_info.get("cache") if spec.name.startswith("DAE") else backbone_identity(backbone)
    return {"code": CODE, "method": spec.name, "settings": settings, "weights": weights, "stage": stage,
            "data": array_digest(data["images"], data["brain"], data.get("lesion"))}


def select(spec: Spec, backbone: Backbone, train: tuple, val: dict, g: dict, cache: MapCache | None = None,
           dae_info: dict | None = None) -> list[dict]:
    """Validation table of one spec: every candidate x (erode, median), scored by pixel AUPRC and best Dice."""
    table = []
    cache = cache or MapCache(None)
    for settings in spec.candidates:
        scorer = spec.factory(backbone, {**settings, "erode": 0, "median": 0})

        def compute(scorer: Any = scorer) -> dict:
            if spec.needs_fit:
                scorer.fit(*train)
            return timed_score(scorer, val["images"], None)  # no masks, no filter: the raw maps

        key = cache_key(spec, {**settings, "erode": 0, "median": 0}, backbone, "val-raw", val, dae_info or {})
        raw = cache.get(key, compute)["maps"]
        for erode, median in itertools.product(g["erode"], g["median"]):
            maps, _ = postprocess_maps(raw, val["brain"], erode=erode, median=median)
            table.append({"method": spec.name, "settings": {**settings, "erode": erode, "median": median},
                          "unet_calls_per_slice": scorer.unet_calls_per_image,
                          "val_pixel_auprc": pixel_auprc(maps, val["lesion"], val["brain"]),
                          "val_best_dice": best_dice(maps, val["lesion"], val["brain"])[0]})
    return table


def spread(pairs: list[dict], metric: str) -> dict:
    """The two parts of a row's spread: the std over lesion seeds of the per-lesion-seed means (over noise
    seeds), and the mean over lesion seeds of the std over noise seeds (None for a noise-free scorer)."""
    by_lesion: dict[int, list[float]] = {}
    for p in pairs:
        by_lesion.setdefault(p["lesion_seed"], []).append(float(p[metric]))
    means = [float(np.mean(v)) for v in by_lesion.values()]
    noise = [float(np.std(v, ddof=1)) for v in by_lesion.values() if len(v) > 1]
    return {"lesion_seeds": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
            "noise_seeds": float(np.mean(noise)) if noise else None}


class Scoring:
    """Fitted scorers and their (cached) maps per (method, noise seed); ``None`` = a noise-free scorer."""

    def __init__(self, specs: list[Spec], best: dict, nets: dict, train: tuple, cache: MapCache, dae_info: dict,
                 noise_seeds: list[int]) -> None:
        self.specs, self.best, self.nets, self.train = specs, best, nets, train
        self.cache, self.dae_info, self.seeds = cache, dae_info, list(noise_seeds)
        self.scorers: dict[tuple[str, int | None], Any] = {}
        self.fit_seconds: dict[str, float] = {}
        self.healthy_maps: dict[tuple[str, int | None], np.ndarray] = {}

    def noise_seeds_of(self, spec: Spec) -> list[int | None]:
        return self.seeds if spec.noisy else [None]

    def settings(self, spec: Spec, noise_seed: int | None) -> dict:
        return {**self.best[spec.name]["settings"], **({} if noise_seed is None else {"seed": noise_seed})}

    def calls(self, spec: Spec) -> int:
        """U-Net calls per slice (an unfitted scorer knows it)."""
        return spec.factory(self.nets[spec.name], self.settings(spec, None)).unet_calls_per_image

    def scorer(self, spec: Spec, noise_seed: int | None) -> Any:
        """The scorer with this noise seed, fitted on the healthy train slices on first use."""
        key = (spec.name, noise_seed)
        if key not in self.scorers:
            scorer = spec.factory(self.nets[spec.name], self.settings(spec, noise_seed))
            start = time.perf_counter()
            if spec.needs_fit:
                scorer.fit(*self.train)
            self.fit_seconds[spec.name] = round(time.perf_counter() - start, 2)
            self.scorers[key] = scorer
        return self.scorers[key]

    def maps(self, spec: Spec, noise_seed: int | None, stage: str, data: dict) -> dict:
        key = cache_key(spec, self.settings(spec, noise_seed), self.nets[spec.name], stage, data, self.dae_info)
        return self.cache.get(key, lambda: timed_score(self.scorer(spec, noise_seed), data["images"], data["brain"]))

    def score_tests(self, tests: dict, lesion_seeds: list[int], healthy: dict, progress: bool) -> tuple:
        """Metrics of every (lesion seed, noise seed) run per method, seconds per slice, and figure maps."""
        pairs = {spec.name: [] for spec in self.specs}
        seconds = {spec.name: [] for spec in self.specs}
        figure_maps = {}
        for ls in lesion_seeds:  # methods interleaved within each run: timings see the same machine state
            test = tests[ls]
            for ns in self.seeds:
                for spec in tqdm(self.specs, desc=f"test lesion seed {ls}, noise seed {ns}", disable=not progress):
                    if not spec.noisy and ns != self.seeds[0]:
                        continue
                    nsk = ns if spec.noisy else None
                    res = self.maps(spec, nsk, f"test-seed{ls}", test)
                    seconds[spec.name].append(res["seconds_per_slice"])
                    values = evaluate_anomaly(res["maps"], test["lesion"], res["scores"], test["labels"],
                                              self.healthy_maps[(spec.name, nsk)], valid=test["brain"],
                                              healthy_valid=healthy["brain"], fpr=0.01)
                    pairs[spec.name].append({"lesion_seed": ls, "noise_seed": nsk, **{m: values[m] for m in METRICS}})
                    if ls == lesion_seeds[0] and ns == self.seeds[0]:
                        figure_maps[spec.name] = res["maps"]
        return pairs, seconds, figure_maps


class _Sets(NamedTuple):
    """The slices of a run and the sets built from them."""

    train: tuple[torch.Tensor, torch.Tensor]
    val_slices: tuple[torch.Tensor, torch.Tensor]
    test_slices: tuple[torch.Tensor, torch.Tensor]
    val: dict
    healthy: dict
    tests: dict[int, dict]


def load_sets(g: dict) -> _Sets:
    """Healthy training slices, lesioned and healthy validation sets, one lesioned test set per lesion seed."""
    n = {s: g["slices"] and g["slices"] * (3 if s == "train" else 1) for s in ("train", "val", "test")}
    train, val_slices, test_slices = (take(load_split(s), n[s]) for s in ("train", "val", "test"))
    val = build_set(val_slices, g["copies"], SEEDS["val_aug"], SEEDS["val_lesions"])
    healthy = build_set(val_slices, g["copies"], SEEDS["healthy_aug"], None)
    tests = {s: build_set(test_slices, g["test_copies"], SEEDS["test_aug"], SEEDS["test_lesions"] * (s + 1))
             for s in g["seeds"]}
    return _Sets(train, val_slices, test_slices, val, healthy, tests)


def _top(candidates: list[Spec], best: dict[str, dict]) -> Spec:
    """The candidate with the best validation pixel AUPRC."""
    return max(candidates, key=lambda s: best[s.name]["val_pixel_auprc"])


def add_controls(specs: list[Spec], best: dict[str, dict]) -> Spec:
    """Pick the headline (best diffrep method within the U-Net call budget) and append random-init controls
    of it, of the best cheap reconstruction and of every feature-distance method; returns the headline."""
    limit = TARGETS["max_unet_calls"]
    cheap = [s for s in specs if s.kind == "diffrep" and best[s.name]["unet_calls_per_slice"] <= limit]
    headline = _top(cheap, best)
    recon_rows = [s for s in cheap if s.factory is recon]
    controlled = [headline] + ([_top(recon_rows, best)] if recon_rows else []) + [s for s in specs if s.factory is features]
    for spec in {s.name: s for s in controlled}.values():  # headline, best cheap reconstruction, feature distance
        name = f"control: random-init U-Net, {spec.name}"
        specs.append(Spec(name, spec.factory, [], spec.needs_fit, kind="control"))
        best[name] = {**best[spec.name], "method": name}
    return headline


def result_rows(specs: list[Spec], best: dict[str, dict], scoring: "Scoring", pairs: dict[str, list[dict]],
                seconds: dict[str, list[float]]) -> list[dict]:
    """One row per method: settings, U-Net calls, time and every metric as mean, std and spread over runs."""
    reference = specs[0].name  # AnoDDPM-style, Gaussian
    rows = []
    for spec in specs:
        sec = float(np.median(seconds[spec.name]))
        ps = pairs[spec.name]
        rows.append({"method": spec.name, "kind": spec.kind, "settings": best[spec.name]["settings"],
                     "unet_calls_per_slice": int(scoring.calls(spec)),
                     "seconds_per_slice": sec, "seconds_per_slice_per_run": seconds[spec.name],
                     "time_ratio_to_anoddpm": sec / float(np.median(seconds[reference])),
                     "fit_seconds": scoring.fit_seconds.get(spec.name),
                     # controls reuse the pretrained row's settings; they were not scored on validation
                     "val_pixel_auprc": None if spec.kind == "control" else best[spec.name]["val_pixel_auprc"],
                     "runs": [{"lesion_seed": p["lesion_seed"], "noise_seed": p["noise_seed"]} for p in ps],
                     **{m: mean_std([p[m] for p in ps]) for m in METRICS},
                     "spread": {m: spread(ps, m) for m in METRICS}})
    return rows


def plot_figure(out: Path, specs: list[Spec], best: dict[str, dict], headline: Spec, test_set: dict,
                figure_maps: dict[str, np.ndarray]) -> Path:
    """The maps figure next to ``out``: baselines, the best of each family, the headline and its control."""
    from anomaly_figures import plot_maps  # noqa: E402  (matplotlib only when needed)

    fig_path = out.with_name(f"{out.stem}_maps.png")
    shown = [s.name for s in specs if s.kind == "baseline"] + [_top([s for s in specs if s.name.startswith(p)], best).name
                                                               for p in ("x0", "DDIM", "multi-level", "feature")]
    shown = list(dict.fromkeys(shown + [headline.name, f"control: random-init U-Net, {headline.name}"]))
    plot_maps(fig_path, test_set, {m: figure_maps[m] for m in shown}, n=4)
    return fig_path


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    g, progress = args.grid, not args.quiet
    torch.set_num_threads(args.threads)
    meta = run_metadata({k: v for k, v in vars(args).items()}, g["seeds"])
    watch = Stopwatch()
    out = Path(args.out)

    with watch("data"):
        sets = load_sets(g)
    train = sets.train
    backbone = load_backbone(args.backbone)
    dae_info: dict = {}
    specs = method_specs(g, dae_factory(train, g["dae_steps"], Path(args.cache_dir), dae_info, progress))

    cache = MapCache(None if args.no_map_cache else args.map_cache)
    with watch("selection on validation"):
        table = [row for spec in tqdm(specs, desc="selection", disable=not progress)
                 for row in select(spec, backbone, train, sets.val, g, cache, dae_info)]
    best = {spec.name: max((r for r in table if r["method"] == spec.name), key=lambda r: r["val_pixel_auprc"])
            for spec in specs}
    headline = add_controls(specs, best)
    random_backbone = random_init_control(backbone, args.control_seed, "--control-seed")

    nets = {spec.name: random_backbone if spec.kind == "control" else backbone for spec in specs}
    scoring = Scoring(specs, best, nets, train, cache, dae_info, g["noise_seeds"])
    with watch("fit + healthy validation maps"):
        for spec in tqdm(specs, desc="fit", disable=not progress):
            for ns in scoring.noise_seeds_of(spec):
                scoring.healthy_maps[(spec.name, ns)] = scoring.maps(spec, ns, "healthy", sets.healthy)["maps"]
    with watch("test scoring"):
        pairs, seconds, figure_maps = scoring.score_tests(sets.tests, g["seeds"], sets.healthy, progress)

    rows = result_rows(specs, best, scoring, pairs, seconds)
    targets = compute_targets(rows, headline.name, args.quick)
    fig_path = plot_figure(out, specs, best, headline, sets.tests[g["seeds"][0]], figure_maps)
    payload = {
        **finish_metadata(meta, watch), "quick": args.quick, "seeds": g["seeds"], "grid": g,
        "backbone": {"name": str(args.backbone), "provenance": backbone.config.provenance,
                     "nodes": backbone.node_names},
        "random_control": {"init_seed": args.control_seed, "architecture": "the loaded backbone's config"},
        "data": describe_data(sets), "columns": COLUMNS,
        "rows": rows, "headline": headline.name, "targets": targets, "dae": dae_info,
        "selection_table": table, "figure": fig_path.name, "notes": notes(g, args.quick),
        "code_digest": CODE,
        "map_cache": {"root": None if cache.root is None else str(cache.root), "entries_reused": cache.hits,
                      "note": ("entries are keyed by code_digest; reused entries carry the seconds per slice "
                               "measured when they were computed (an earlier, interrupted run of the same code)")},
    }
    path = write_json(payload, out)
    if progress:
        print_summary(rows, headline.name, targets, payload, path)
    return payload


COLUMNS = {"pixel_auprc": "pooled over brain pixels", "best_dice": "oracle threshold on the test set",
           "dice_at_fpr": "threshold flagging 1% of healthy validation brain pixels",
           "pixel_auroc": "pooled over brain pixels",
           "image_auroc": "image score = mean of the top 1% of the map",
           "unet_calls_per_slice": "network evaluations per slice (NFE)",
           "seconds_per_slice": "median over seeds of scoring time / test slices, this process, interleaved"}


def describe_data(sets: _Sets) -> dict:
    """The data section of the result JSON."""
    return {"fit": f"train split ({len(sets.train[0])} healthy slices)", "validation_lesioned": describe(sets.val),
            "validation_healthy": describe(sets.healthy), "test": {s: describe(t) for s, t in sets.tests.items()},
            "seeds": SEEDS, "slices": {"train": len(sets.train[0]), "val": len(sets.val_slices[0]),
                                       "test": len(sets.test_slices[0])}}


def print_summary(rows: list[dict], headline: str, targets: dict, payload: dict, path: Path) -> None:
    """The result table on stdout."""
    print(f"{'method':<58} {'calls':>5} {'AUPRC':>13} {'best Dice':>13} {'Dice@1%':>7} {'s/slice':>8}")
    for r in rows:
        ap, dice = r["pixel_auprc"], r["best_dice"]
        print(f"{r['method']:<58} {r['unet_calls_per_slice']:>5} {ap['mean']:.3f}+-{ap['std']:.3f}"
              f" {dice['mean']:.3f}+-{dice['std']:.3f} {r['dice_at_fpr']['mean']:>7.3f} {r['seconds_per_slice']:>8.3f}")
    print(f"headline {headline}; targets met: {targets['met']}; wall {payload['wall_seconds']} s; wrote {path}")


def compute_targets(rows: list[dict], headline: str, quick: bool) -> dict:
    by = {r["method"]: r for r in rows}
    h, dae = by[headline], by[DAE_NAME]
    ano = max((r for r in rows if r["method"].startswith("AnoDDPM")), key=lambda r: r["pixel_auprc"]["mean"])

    def versus(r: dict) -> dict:
        beats_dae = all(r[m]["mean"] > dae[m]["mean"] for m in ("pixel_auprc", "best_dice"))
        gain = r["pixel_auprc"]["mean"] / ano["pixel_auprc"]["mean"] - 1
        ratio = ano["unet_calls_per_slice"] / r["unet_calls_per_slice"]
        beats_ano = gain >= TARGETS["anoddpm_auprc_gain_min"] and ratio >= TARGETS["anoddpm_calls_ratio_min"]
        return {"unet_calls_per_slice": r["unet_calls_per_slice"], "beats_dae_auprc_and_best_dice": bool(beats_dae),
                "auprc_gain_over_anoddpm": gain, "calls_ratio_anoddpm": ratio, "beats_anoddpm": bool(beats_ano),
                "met": bool(beats_dae and beats_ano and r["unet_calls_per_slice"] <= TARGETS["max_unet_calls"])}

    out = {**TARGETS, "headline": headline, "dae_reference": dae["method"],
           "anoddpm_reference": f"{ano['method']} (the better AnoDDPM-style row by test AUPRC)",
           "selected_on": "validation pixel AUPRC among diffrep scorers with <= 10 U-Net calls per slice",
           **versus(h),
           "other_rows_post_hoc": {r["method"]: versus(r) for r in rows if r["kind"] == "diffrep"
                                   and r["unet_calls_per_slice"] <= TARGETS["max_unet_calls"]}}
    if quick:
        out["note"] = "quick run (few slices, AnoDDPM L=20, untrained DAE): not evidence for or against the targets"
    return out


def notes(g: dict, quick: bool) -> list[str]:
    return [
        f"AnoDDPM-style rows: noise_level={g['anoddpm_level']} and L+1 = {g['anoddpm_level'] + 1} ancestral DDPM "
        "steps (timesteps L..0), i.e. AnoDDPM's t_distance=L+1; squared residual, simplex noise with AnoDDPM's "
        "defaults (6 octaves, persistence 0.8, frequency 64 px) in the forward jump and every reverse step; "
        "only the post-processing (erosion, median) is chosen on validation, as for every row.",
        "simplex-f16: simplex noise with a 16 px coarsest lattice, AnoDDPM's 64 px at 256^2 scaled to 64^2.",
        "Reconstruction scorers draw their noise per image, seeded from the noise seed and a hash of the image (so "
        "maps do not depend on the batch). Lesion seeds vary the lesion generator (placement, kind and which images "
        "are lesioned); noise seeds vary every noise draw of a scorer and what it fits on healthy data (feature "
        "memory banks, ensemble statistics, calibration bins). Means and stds are over all lesion x noise seed "
        "runs; 'spread' splits the std into its lesion-seed and noise-seed parts. Settings are chosen on validation "
        "with noise seed 0. The augmentation and the DAE's training seed are fixed.",
        "Control: a randomly initialised U-Net of the same architecture. MONAI zero-initialises the output "
        "convolution, so a fresh U-Net predicts eps = 0: its x0 estimate is x_t / sqrt(abar_t) (clipped), an honest "
        "'no learned prior' control for reconstruction scorers; its feature maps are random features.",
        "DAE: trained once (seed 0) on the train split with brain-ddpm's augmentation, cached by its settings "
        "and a hash of the training data; the lesion seeds do not retrain it.",
        "Post-processing: maps are zeroed outside the brain mask eroded by 'erode' px and median-filtered; metrics "
        "count every pixel of the full (un-eroded) brain mask, so erosion that removes lesion pixels costs recall.",
        "Best Dice uses an oracle threshold on the test set; Dice at 1% FPR uses a threshold from healthy "
        "validation slices only.",
    ] + (["QUICK RUN: tiny sets and grids, AnoDDPM at L=20, DAE barely trained; it only exercises every row."]
         if quick else [])


if __name__ == "__main__":
    main()

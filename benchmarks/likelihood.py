"""Likelihood and out-of-distribution benchmark: bits per dimension of the shipped models, and image-level
OOD scores built on them.

Part 1, bits per dimension of ``fmnist-ddpm`` on Fashion-MNIST test images (the first ``test_images``;
the model never trained on the test split), by both estimators through ``diffrep.anomaly.LikelihoodScorer``
on 8-bit codes: the variational bound (Ho et al. 2020; discretised decoder, T U-Net calls) and the
probability-flow ODE (Song et al. 2021; uniform dequantisation + 7 bits, Hutchinson trace, scipy's
adaptive solver). Per estimator: mean and std over images, U-Net calls and seconds per image, and the
estimator's own randomness: over ``variance_repeats`` seeds on ``variance_images`` images, the per-image
std (VLB: noise draws; ODE: Hutchinson probes and dequantisation noise) and the std of their mean.

Part 2, OOD pairs. ``fmnist-ddpm``: Fashion-MNIST test images against scikit-learn digits, scikit-image
patches, MNI152 slices, uniform noise and constant images (28 x 28; see ood_sets.py). ``brain-ddpm``:
MNI152 test-split slices against Fashion-MNIST, digits, patches, noise and constant images (64 x 64).
Held-out in-distribution images fit what is fitted (Fashion-MNIST test images from index 5000 on; the
MNI152 val split). Scores, higher = more anomalous, all from one estimator (``ood_method``):
raw NLL (bits/dim); the complexity-corrected S = NLL - L_PNG (Serra et al. 2020); typicality per image,
|NLL - mean fit NLL| (Nalisnick et al. 2019 with M = 1); and, as the baseline, the reconstruction error
(ReconstructionScorer: x0 prediction from timestep ``reconstruction_timestep``, mean |x - x0|, 1 call).
Image AUROC (sklearn; OOD = positive) of every score on every pair; typicality over groups of M images
(random groups of each set): group AUROC, and the share of groups past the threshold fitted on bootstrap
groups of the fit images at ``alpha`` (OOD detection rate, in-distribution false alarms).

Target, declared here before any OOD set was scored (TARGET): the complexity-corrected NLL from the
variational bound, image AUROC >= 0.9 on every pair. Why this score: the raw likelihood of a generative
model is dominated by input complexity, so simpler inputs (digits, constant images) get *higher*
likelihoods than the training data (Nalisnick et al. 2019, Serra et al. 2020); subtracting a generic
compressor's code length cancels that in both directions, and, unlike typicality, it scores single
images, which is what an image AUROC measures. Why the bound: it is itself a code length of the 8-bit
image (bits back), in the same units as the PNG length it is compared with, its cost is fixed (T calls)
and it has no solver tolerance; the ODE's single-probe Hutchinson estimate adds per-image noise.
Where a pair fails, ``targets.failing`` names it with the numbers that explain it (mean NLL and PNG
length of both sides).

Cost: the variational bound dominates, T = 1000 U-Net calls per image on every set; on a CPU a full run
takes hours (``--device cuda`` on a GPU, or fewer ``--test-images``/``--ood-images``, shortens it).
Every set's seconds and U-Net calls per image are in the JSON.

    python benchmarks/likelihood.py [--quick] [--backbone fmnist-ddpm] [--brain-backbone brain-ddpm]
                                    [--device cpu] [--threads 1] [--seed 0] [--out PATH]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ood_sets  # noqa: E402
from common import (RESULTS_DIR, Stopwatch, finish_metadata, load_settings, merge_settings, run_metadata,  # noqa: E402
                    write_json)

from diffrep import load_backbone  # noqa: E402
from diffrep.anomaly import LikelihoodScorer, ReconstructionScorer, TypicalityScorer  # noqa: E402
from diffrep.backbones import Backbone  # noqa: E402

TARGET = {"score": "corrected", "method": "vlb", "auroc_min": 0.9,
          "name": "complexity-corrected NLL (NLL - PNG length, Serra et al. 2020) from the variational bound"}
SCORES = ("nll", "corrected", "typicality", "reconstruction")
FMNIST_SETS = ("digits", "patches", "brain", "noise", "constant")
BRAIN_SETS = ("fashion", "digits", "patches", "noise", "constant")
FIT_START = 5000  # Fashion-MNIST test images from here on are the held-out fit set
BRAIN_SIZE = 64  # brain-ddpm's training size
FULL, QUICK = load_settings("likelihood")  # configs/benchmarks/likelihood.yaml


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="fmnist-ddpm", help="the Fashion-MNIST model (28 x 28)")
    p.add_argument("--brain-backbone", default="brain-ddpm", help="the MNI152 slice model (64 x 64)")
    p.add_argument("--quick", action="store_true", help="a few images per set, loose ODE tolerances")
    p.add_argument("--test-images", type=int, default=None, help=f"Fashion-MNIST test images (default {FULL['test_images']})")
    p.add_argument("--ood-images", type=int, default=None, help=f"images per OOD set (default {FULL['ood_images']})")
    p.add_argument("--reconstruction-timestep", type=int, default=None, help="the baseline's timestep (default 250)")
    p.add_argument("--batch-size", type=int, default=None, help="images per U-Net batch / ODE solve")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (noise, probes, OOD sets, bootstraps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(RESULTS_DIR / "likelihood.json"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    names = ("test_images", "ood_images", "reconstruction_timestep", "batch_size")
    args.settings = merge_settings(FULL, QUICK, args.quick, {k: getattr(args, k) for k in names})
    return args


# ------------------------------------------------------------------------------------------- data
def fmnist_data(s: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """{"test", "fit", *FMNIST_SETS}: float32 (N, 1, 28, 28) images in [0, 1]."""
    from diffrep.data.fashion_mnist import load_fashion_mnist

    test = load_fashion_mnist("test")[0][:, None].astype(np.float32) / 255.0
    data = {"test": test[:s["test_images"]], "fit": test[FIT_START:FIT_START + s["fit_images"]]}
    data.update({name: ood_sets.SETS[name](s["ood_images"], 28, seed + k) for k, name in enumerate(FMNIST_SETS)})
    return data


def brain_data(s: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """{"test", "fit", *BRAIN_SETS}: MNI152 test and val slices and the OOD sets, (N, 1, S, S) in [0, 1]."""
    from diffrep.data.brain import load_brain_split

    limit, size = s["brain_images"], BRAIN_SIZE
    data = {"test": load_brain_split("test", size).images[:limit], "fit": load_brain_split("val", size).images[:limit]}
    data.update({name: ood_sets.SETS[name](s["brain_ood_images"], size, seed + k) for k, name in enumerate(BRAIN_SETS)})
    return data


# ------------------------------------------------------------------------------------ bits per dim
def make_scorer(backbone: Backbone, method: str, s: dict[str, Any], seed: int) -> LikelihoodScorer:
    return LikelihoodScorer(backbone, method=method, hutchinson=s["hutchinson"], rtol=s["rtol"], atol=s["atol"],
                            seed=seed, batch_size=s["batch_size"])


def timed_table(scorer: LikelihoodScorer, images: np.ndarray, progress: bool) -> tuple[dict[str, np.ndarray], float]:
    """The scorer's table of ``images`` and the seconds it took per image."""
    start = time.perf_counter()
    table = scorer.nll_table(torch.from_numpy(images), progress=progress)
    return table, (time.perf_counter() - start) / len(images)


def estimator_row(table: dict[str, np.ndarray], seconds: float, hutchinson: int | None) -> dict[str, Any]:
    nll, calls = table["nll_bits_per_dim"], table["unet_calls"]
    row = {"bits_per_dim": {"mean": float(nll.mean()), "std": float(nll.std(ddof=1)) if len(nll) > 1 else 0.0,
                            "n": len(nll)},
           "unet_calls_per_image": float(calls.mean()), "seconds_per_image": round(seconds, 3)}
    if hutchinson is not None:
        row["vector_jacobian_products_per_image"] = float(calls.mean()) * hutchinson
    return row


def estimator_noise(backbone: Backbone, images: np.ndarray, method: str, s: dict[str, Any], seed: int) -> dict[str, Any]:
    """Per-image std over ``variance_repeats`` seeds, and the std of the mean over the images."""
    runs = np.stack([make_scorer(backbone, method, s, seed + r).nll_table(torch.from_numpy(images))["nll_bits_per_dim"]
                     for r in range(s["variance_repeats"])])
    return {"seeds": list(range(seed, seed + s["variance_repeats"])), "images": len(images),
            "per_image_std_mean": float(runs.std(axis=0, ddof=1).mean()),
            "std_of_mean_over_images": float(runs.mean(axis=1).std(ddof=1)),
            "what_varies": "VLB noise draws" if method == "vlb" else "Hutchinson probes and dequantisation noise"}


def bits_per_dim_section(backbone: Backbone, test: np.ndarray, s: dict[str, Any], seed: int,
                         progress: bool) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Both estimators on the test images (and their tables, for reuse by the OOD part)."""
    section, tables = {}, {}
    for method in ("vlb", "ode"):
        tables[method], seconds = timed_table(make_scorer(backbone, method, s, seed), test, progress)
        section[method] = estimator_row(tables[method], seconds, s["hutchinson"] if method == "ode" else None)
        section[method]["noise"] = estimator_noise(backbone, test[:s["variance_images"]], method, s, seed)
    section["settings"] = {"eight_bit": True, "test_images": len(test), "ode_rtol": s["rtol"], "ode_atol": s["atol"],
                           "hutchinson_probes": s["hutchinson"], "timesteps": backbone.num_timesteps}
    return section, tables


# ------------------------------------------------------------------------------------------- OOD
def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Image AUROC with the OOD images as positives (higher score = more anomalous)."""
    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(labels, np.r_[inside, outside]))


def set_scores(table: dict[str, np.ndarray], reconstruction: np.ndarray, fit_mean: float) -> dict[str, np.ndarray]:
    return {"nll": table["nll_bits_per_dim"], "corrected": table["corrected_bits_per_dim"],
            "typicality": np.abs(table["nll_bits_per_dim"] - fit_mean), "reconstruction": reconstruction}


def group_typicality(test: TypicalityScorer, inside: np.ndarray, outside: np.ndarray, draws: int,
                     rng: np.random.Generator) -> dict[str, Any] | None:
    """Typicality over random groups of M images of each set (None when a set has fewer than M)."""
    m = int(test.group_size)
    if min(len(inside), len(outside)) < m:
        return None
    groups = {name: np.stack([values[rng.choice(len(values), m, replace=False)] for _ in range(draws)]).reshape(-1)
              for name, values in (("in", inside), ("out", outside))}
    stats = {name: test.statistics(values) for name, values in groups.items()}
    return {"group_size": m, "groups": draws, "auroc": auroc(stats["in"], stats["out"]),
            "ood_detection_rate": float((stats["out"] > test.threshold_).mean()),
            "in_distribution_false_alarm_rate": float((stats["in"] > test.threshold_).mean())}


def summary(table: dict[str, np.ndarray], seconds: float | None) -> dict[str, Any]:
    return {"n": len(table["nll_bits_per_dim"]), "nll_bits_per_dim": float(table["nll_bits_per_dim"].mean()),
            "png_bits_per_dim": float(table["png_bits_per_dim"].mean()),
            "corrected_bits_per_dim": float(table["corrected_bits_per_dim"].mean()),
            "unet_calls_per_image": float(table["unet_calls"].mean()),
            "seconds_per_image": None if seconds is None else round(seconds, 3)}


def ood_section(backbone: Backbone, data: dict[str, np.ndarray], s: dict[str, Any], seed: int, progress: bool,
                test_table: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every score on every (test, OOD set) pair of one model."""
    scorer = make_scorer(backbone, s["ood_method"], s, seed)
    recon = ReconstructionScorer(backbone, s["reconstruction_timestep"], reverse="x0", top_fraction=1.0, seed=seed,
                                 batch_size=s["batch_size"])
    tables, seconds, recons = {}, {}, {}
    for name, images in data.items():
        if name == "test" and test_table is not None:
            tables[name], seconds[name] = test_table, None  # computed in part 1 with the same settings
        else:
            tables[name], seconds[name] = timed_table(scorer, images, progress)
        recons[name] = recon.score(torch.from_numpy(images)).scores
    fits = [TypicalityScorer(scorer, group_size=m, bootstraps=s["bootstraps"], alpha=s["alpha"], seed=seed)
            .fit_scores(tables["fit"]["nll_bits_per_dim"]) for m in s["group_sizes"]]
    fit_mean = fits[0].mean_ if fits else float(tables["fit"]["nll_bits_per_dim"].mean())
    scores = {name: set_scores(tables[name], recons[name], fit_mean) for name in data}
    rng = np.random.default_rng(seed)
    pairs = {}
    for name in data:
        if name in ("test", "fit"):
            continue
        pairs[name] = {"image_auroc": {k: auroc(scores["test"][k], scores[name][k]) for k in SCORES},
                       "typicality_groups": [group_typicality(t, tables["test"]["nll_bits_per_dim"],
                                                              tables[name]["nll_bits_per_dim"], s["group_draws"], rng)
                                             for t in fits]}
    return {"method": s["ood_method"], "sets": {name: summary(tables[name], seconds[name]) for name in data},
            "pairs": pairs, "typicality_fit": {"mean_nll_bits_per_dim": fit_mean, "fit_images": len(data["fit"]),
                                               "thresholds": {int(t.group_size): t.threshold_ for t in fits}},
            "unet_calls_per_image": {"likelihood_scores": float(tables["test"]["unet_calls"].mean()),
                                     "reconstruction": recon.unet_calls_per_image},
            "reconstruction": {"timestep": s["reconstruction_timestep"],
                               "noise_level": backbone.noise_level(s["reconstruction_timestep"])}}


def target_check(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The declared target on every pair; a failing pair comes with the means that explain it."""
    rows, failing = [], []
    for model, section in sections.items():
        test = section["sets"]["test"]
        for name, pair in section["pairs"].items():
            value = pair["image_auroc"][TARGET["score"]]
            rows.append({"model": model, "pair": f"test vs {name}", "auroc": value,
                         "passes": bool(value >= TARGET["auroc_min"]) and section["method"] == TARGET["method"]})
            if not rows[-1]["passes"]:
                ood = section["sets"][name]
                failing.append({**rows[-1], "why": (
                    f"mean S {ood['corrected_bits_per_dim']:.3f} (OOD) vs {test['corrected_bits_per_dim']:.3f} (test) "
                    f"bits/dim: NLL {ood['nll_bits_per_dim']:.3f} vs {test['nll_bits_per_dim']:.3f}, PNG length "
                    f"{ood['png_bits_per_dim']:.3f} vs {test['png_bits_per_dim']:.3f}; estimator {section['method']}")})
    return {**TARGET, "pairs": rows, "all_pass": all(r["passes"] for r in rows), "failing": failing}


# ------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    s, seed, progress = args.settings, args.seed, not args.quiet
    torch.set_num_threads(args.threads)
    watch, meta = Stopwatch(), run_metadata(s, seed)
    fmnist = load_backbone(args.backbone, device=args.device)
    brain = load_backbone(args.brain_backbone, device=args.device)
    with watch("data"):
        fmnist_sets, brain_sets = fmnist_data(s, seed), brain_data(s, seed)
    with watch("bits_per_dim"):
        bpd, tables = bits_per_dim_section(fmnist, fmnist_sets["test"], s, seed, progress)
    with watch("ood_fmnist"):
        ood = {"fmnist-ddpm": ood_section(fmnist, fmnist_sets, s, seed, progress, tables[s["ood_method"]])}
    with watch("ood_brain"):
        ood["brain-ddpm"] = ood_section(brain, brain_sets, s, seed, progress)
    payload = {**meta, "quick": args.quick, "backbones": {"fmnist-ddpm": args.backbone, "brain-ddpm": args.brain_backbone},
               "device": args.device, "bits_per_dim": bpd, "ood": ood, "targets": target_check(ood),
               "notes": ["bits/dim of 8-bit codes: VLB with the discretised decoder (a bound on -log2 P), ODE at "
                         "uniformly dequantised codes + 7 bits; both on the same images",
                         f"in-distribution fit images: Fashion-MNIST test images {FIT_START}.., MNI152 val split",
                         "typicality per image is the M = 1 statistic; typicality_groups are over random groups"]}
    payload = {**payload, **finish_metadata(meta, watch)}
    write_json(payload, args.out)
    if progress:
        print(f"wrote {args.out} in {watch.total()} s; target {'met' if payload['targets']['all_pass'] else 'not met'}")
    return payload


if __name__ == "__main__":
    main()

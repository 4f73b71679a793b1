"""Brain tissue segmentation from few labelled slices: diffusion pixel features + a pixel MLP ensemble.

Task: 64x64 axial MNI152 slices (diffrep.data.brain), labels 0 background, 1 CSF, 2 GM, 3 WM. The
head is trained on N in {1, 5, 10} labelled slices of the train range and scored on the test range
(optionally plus seeded augmented copies, ``--test-augment``). Which slices are labelled depends on
the seed (nested: the N=1 slice is among the N=5, those among the N=10), 3 seeds.

Rows (same N, same slices, same test set):
- diffrep: ``--backbone`` (brain-ddpm) features + PixelClassifier (Baranchuk et al., ICLR 2022:
  shared seeded noise, blocks bilinearly upsampled and concatenated, an ensemble of MLPs
  d -> 128 -> 32 -> C, majority vote). Nodes and timesteps are chosen on the val slices: every
  (node set, timestep set) of a small grid is fitted on the seed-0 N=5 slices and scored by val
  mIoU; the best is then fixed for every N and seed. Test labels are never used to choose.
- control: a randomly initialised U-Net of the same architecture and the same head, its nodes and
  timesteps chosen by the same procedure on the same grid (its own best, so the comparison is fair).
- supervised: MONAI BasicUNet trained end to end on the N slices with joint augmentation
  (diffrep.data.augment), Dice + cross-entropy, a fixed number of steps.
- trivial: intensity + pixel coordinates (3 features) into the same head.

Metrics: IoU and Dice per class from the confusion matrix pooled over all test pixels, mIoU over the 4
classes (as ddpm-segmentation) and over the 3 tissues; mean +- std over label seeds x noise seeds for
the U-Net rows (the selection grid uses the noise of ``--seed``; the chosen descriptors are then
extracted under every ``noise_seeds`` draw), over label seeds for the noise-free baselines; the mIoU's
"spread" splits the std into its label-seed and noise-seed parts.

Memory: the diffrep pipeline (descriptors streamed to a float16 PixelStore, training from a fixed pixel
budget, streaming prediction) against the reference approach (every training descriptor in one float32
RAM tensor, then the permute/reshape copy), same head, same pixel sample, each in a fresh process, on
a larger training set (all 93 train slices plus 3 augmented copies of each: 372 images, ``--memory-augment``).
Peak RSS (VmHWM) is read inside the
process after a warm-up pass; the ratio is taken over the peak above the RSS at the reset (the memory
the work needs); total peak RSS (interpreter, torch and MONAI included) is reported beside it.

Settings: ``configs/benchmarks/segmentation_brain.yaml`` (``full``; ``quick`` over it with ``--quick``; the
options given over both).

    python benchmarks/segmentation_brain.py [--backbone brain-ddpm] [--quick] [--threads 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, Stopwatch, finish_metadata, load_settings, mean_std, merge_settings,  # noqa: E402
                    random_init_control, run_metadata, write_json)
from memory import PeakMeter, report, run_measured  # noqa: E402
from noise_seeds import spread_parts  # noqa: E402

from diffrep import FeatureKey, load_backbone, upsample_concat  # noqa: E402
from diffrep._atomic import atomic_savefig  # noqa: E402
from diffrep.backbones import Backbone, BackboneConfig  # noqa: E402
from diffrep.data.augment import augment_batch, brain_augmentation  # noqa: E402
from diffrep.data.brain import LABEL_NAMES, NUM_CLASSES, BrainSlices, load_brain_split  # noqa: E402
from diffrep.digests import backbone_identity  # noqa: E402
from diffrep.features.pixel_store import ArrayPixels  # noqa: E402
from diffrep.heads import PixelClassifier, segmentation_metrics  # noqa: E402
from diffrep.pipelines.segmentation import extract_pixel_store, pixel_extractor  # noqa: E402

NODE_SETS = {
    "decoder5": ["mid", "up.0", "up.1", "up.2", "up.3"],  # the paper reads five decoder blocks
    "decoder-late": ["up.2", "up.3"],
    "encoder4": ["down.0", "down.1", "down.2", "down.3"],
    "all9": ["down.0", "down.1", "down.2", "down.3", "mid", "up.0", "up.1", "up.2", "up.3"],
}
TIMESTEP_SETS = {"t50-150-250": [50, 150, 250], "t10-50-100": [10, 50, 100], "t10": [10], "t0": [0]}
SELECT_N = 5
TARGETS = {"n5_gain_over_control_points": 3.0, "n5_gain_over_supervised_points": 3.0,
           "memory_ratio_min": 10.0, "equal_miou_tolerance_points": 1.0}
FULL, QUICK = load_settings("segmentation_brain")  # configs/benchmarks/segmentation_brain.yaml


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="brain-ddpm",
                   help="checkpoint directory, shipped default name, or 'random-brain' (untrained, smoke runs)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (the quick section of configs/benchmarks/segmentation_brain.yaml)")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--cache-dir", default=".cache/pixel-stores", help="PixelStore root (reruns resume)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the feature extractor in the selection grid")
    p.add_argument("--test-augment", type=int, default=0, help="augmented copies of each test slice to add")
    p.add_argument("--skip-memory", action="store_true")
    for name in FULL:
        kind = type(FULL[name]) if FULL[name] is not None else int
        if isinstance(FULL[name], list):
            p.add_argument(f"--{name.replace('_', '-')}", nargs="+", type=type(FULL[name][0]), default=None)
        else:
            p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    p.add_argument("--memory-worker", choices=("diffrep", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    vars(args).update(merge_settings(FULL, QUICK, args.quick, {name: getattr(args, name) for name in FULL}))
    return args


# ---------------------------------------------------------------------------------------------- task
def task_labels(args: argparse.Namespace) -> tuple[str, ...]:
    """The class names of the task: brain tissue (LABEL_NAMES) unless ``args.label_names`` names others
    (benchmarks/segmentation_anatomy.py reuses these functions on its anatomy classes)."""
    return tuple(getattr(args, "label_names", LABEL_NAMES))


def task_augmentation(args: argparse.Namespace) -> Callable[[int], Any]:
    """The supervised U-Net's seeded training augmentation: brain_augmentation unless ``args.augmentation``."""
    return getattr(args, "augmentation", brain_augmentation)


# ------------------------------------------------------------------------------------------- helpers
def brain_config() -> BackboneConfig:
    """The architecture of the shipped brain-ddpm, read from its recipe (configs/train/brain-ddpm.yaml)."""
    from diffrep.training import load_train_config

    return load_train_config(Path(__file__).resolve().parents[1] / "configs" / "train" / "brain-ddpm.yaml").backbone


def get_backbone(spec: str) -> Backbone:
    if spec == "random-brain":
        torch.manual_seed(1234)
        config = brain_config()
        config.provenance = {"note": "random initialisation (torch.manual_seed(1234)); smoke runs only"}
        return Backbone(config)
    return load_backbone(spec)


def make_head(args: argparse.Namespace, seed: int, grid: bool = False) -> PixelClassifier:
    """The pixel MLP ensemble; the val grid uses a lighter one (fewer members and epochs) to rank configs."""
    return PixelClassifier(num_classes=len(task_labels(args)), n_members=args.grid_members if grid else args.members,
                           epochs=args.grid_epochs if grid else args.epochs,
                           batch_size=args.batch_size, max_pixels_in_memory=args.max_pixels, seed=seed)


def scores(pred: np.ndarray, truth: np.ndarray, num_classes: int = NUM_CLASSES) -> dict[str, Any]:
    m = segmentation_metrics(pred, truth, num_classes)
    m["miou_tissue"] = float(np.nanmean(m["iou"][1:]))
    m.pop("confusion")
    return m


def labelled_indices(seed: int, n: int, n_train: int) -> list[int]:
    """The N labelled train slices of a seed; nested over N (the first N of one seeded permutation)."""
    return np.random.default_rng(seed).permutation(n_train)[:n].tolist()


def augmented(data: BrainSlices, copies: int, seed: int) -> BrainSlices:
    if copies <= 0:
        return data
    parts = [data.to_tensors()]
    for c in range(copies):
        parts.append(augment_batch(brain_augmentation(seed + c), data.images, data.masks, data.labels))
    x, m, y = (torch.cat([p[i] for p in parts]).numpy() for i in range(3))
    idx = np.concatenate([data.slice_index] * (copies + 1))
    return BrainSlices(x, m, y, idx, np.concatenate([data.volume_id] * (copies + 1)), dict(data.source))


def pixel_store(backbone: Backbone, nodes: list[str], timesteps: list[int], images: np.ndarray, labels: np.ndarray,
                args: argparse.Namespace, root: str | Path | None = None, noise_seed: int | None = None):
    """The pixel descriptors of ``diffrep segment fit`` (the library's extract_pixel_store), shared noise
    drawn with ``noise_seed`` (default ``--seed``, the selection's)."""
    seed = args.seed if noise_seed is None else noise_seed
    return extract_pixel_store(root or args.cache_dir, backbone, nodes, timesteps, torch.from_numpy(images),
                               torch.from_numpy(labels), noise="shared", seed=seed,
                               num_classes=len(task_labels(args)))


def trivial_descriptors(images: np.ndarray) -> torch.Tensor:
    """Intensity and normalised (row, column) coordinates: (N, 3, H, W)."""
    n, _, h, w = images.shape
    rows = torch.linspace(0, 1, h).view(1, 1, h, 1).expand(n, 1, h, w)
    cols = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([torch.from_numpy(images), rows, cols], dim=1).contiguous()


def train_supervised(data: BrainSlices, test_images: np.ndarray, *, steps: int, batch: int, seed: int,
                     num_classes: int = NUM_CLASSES,
                     augmentation: Callable[[int], Any] = brain_augmentation) -> np.ndarray:
    """MONAI BasicUNet (features 16-16-32-64-128-16) trained end to end with ``augmentation(seed)``; test label maps."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=num_classes, features=(16, 16, 32, 64, 128, 16))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    transform = augmentation(seed)
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(steps):
        idx = rng.integers(0, len(data), size=batch)
        x, _, y = augment_batch(transform, data.images[idx], data.masks[idx], data.labels[idx])
        loss = loss_fn(net(x), y[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.inference_mode():
        return torch.cat([net(torch.from_numpy(test_images[i:i + 16])).argmax(1)
                          for i in range(0, len(test_images), 16)]).numpy()


def summarise(method: str, n: int, runs: list[dict[str, Any]],
              label_names: Sequence[str] = LABEL_NAMES) -> dict[str, Any]:
    """Mean +- std over every run (label seed x noise seed), the mIoU's spread split into its two parts."""
    noise_seeds = sorted({r["noise_seed"] for r in runs if r.get("noise_seed") is not None})
    return {"method": method, "n_labelled": n, "seeds": sorted({r["seed"] for r in runs}), "noise_seeds": noise_seeds,
            "miou": {**mean_std([100 * r["miou"] for r in runs]),
                     "spread": spread_parts({(r["seed"], r.get("noise_seed")): 100 * r["miou"] for r in runs})},
            "miou_tissue": mean_std([100 * r["miou_tissue"] for r in runs]),
            "mdice": mean_std([100 * r["mdice"] for r in runs]),
            "iou": {name: mean_std([100 * r["iou"][c] for r in runs]) for c, name in enumerate(label_names)},
            "dice": {name: mean_std([100 * r["dice"][c] for r in runs]) for c, name in enumerate(label_names)},
            "runs": runs}


# ----------------------------------------------------------------------------------------- selection
def select_config(name: str, backbone: Backbone, train: BrainSlices, val: BrainSlices,
                  args: argparse.Namespace) -> dict:
    """Grid over node sets x timestep sets, fitted on the seed-0 N=5 slices, scored by val mIoU."""
    idx = labelled_indices(args.seeds[0], SELECT_N, len(train))
    grid = []
    for nodes_name in args.grid_nodes:
        for ts_name in args.grid_timesteps:
            nodes, ts = NODE_SETS[nodes_name], TIMESTEP_SETS[ts_name]
            tr = pixel_store(backbone, nodes, ts, train.images[idx], train.labels[idx], args)
            va = pixel_store(backbone, nodes, ts, val.images, val.labels, args)
            clf = make_head(args, args.seeds[0], grid=True).fit(tr)
            m = scores(clf.predict(va), val.labels, len(task_labels(args)))
            grid.append({"nodes": nodes_name, "timesteps": ts, "num_features": tr.num_features,
                         "val_miou": 100 * m["miou"], "val_miou_tissue": 100 * m["miou_tissue"]})
            print(f"  {name}: {nodes_name:12s} t={ts}: val mIoU {100 * m['miou']:.1f}", flush=True)
    best = max(grid, key=lambda g: g["val_miou"])
    return {"procedure": f"each (node set, timestep set) fitted on the N={SELECT_N} labelled slices of seed "
                         f"{args.seeds[0]} and scored by mIoU on the val slices ({args.grid_members} MLPs, "
                         f"{args.grid_epochs} epochs); the best is fixed for all N and seeds",
            "grid": grid, "chosen": {"nodes": NODE_SETS[best["nodes"]], "node_set": best["nodes"],
                                     "timesteps": best["timesteps"], "val_miou": best["val_miou"]}}


# -------------------------------------------------------------------------------------------- memory
def run_pipeline(mode: str, backbone: Backbone, nodes: list[str], ts: list[int], train: BrainSlices,
                 test: BrainSlices, args: argparse.Namespace, root: str) -> tuple[np.ndarray, PixelClassifier]:
    """Features, head fit and test prediction; ``diffrep`` streams through PixelStores, ``naive`` holds
    every training descriptor in one float32 RAM tensor as ddpm-segmentation's prepare_data does."""
    clf = make_head(args, 0)
    if mode == "diffrep":
        clf.fit(pixel_store(backbone, nodes, ts, train.images, train.labels, args, root=root))
        return clf.predict(pixel_store(backbone, nodes, ts, test.images, test.labels, args, root=root)), clf
    keys = [FeatureKey(n, t) for n in nodes for t in ts]
    size = tuple(train.images.shape[2:])
    # node maps in float16 as in the diffrep pipeline, so both train on identical pixel values
    extractor = pixel_extractor(backbone, nodes, ts, seed=args.seed)
    d = sum(extractor.feature_info[k.node].channels for k in keys)
    x = torch.zeros(len(train), d, *size)  # X = torch.zeros(N, d, H, W), float32
    for sl, feats in extractor.iter_batches(torch.from_numpy(train.images)):
        x[sl] = upsample_concat(feats, size, keys)
    flat = x.permute(1, 0, 2, 3).reshape(d, -1).permute(1, 0)  # (pixels, d): a full copy, as the reference
    del x
    y = torch.from_numpy(train.labels).reshape(1, 1, -1)
    clf.fit(ArrayPixels(flat.T[None, :, None, :], y))  # views of the one RAM tensor, same pixel order
    xt = upsample_concat(extractor(torch.from_numpy(test.images)), size, keys)
    return clf.predict(xt), clf


def memory_worker(mode: str, config: dict[str, Any]) -> None:
    """Run one pipeline in this fresh process and report its peak RSS and test mIoU.

    A warm-up pass on 2 training images and 1 test image first loads every code page and lazy import,
    then the peak is reset: what is measured is the memory the work itself needs.
    """
    torch.set_num_threads(config["threads"])
    args = argparse.Namespace(**config["args"])
    backbone = get_backbone(config["backbone"])
    data = np.load(config["data"])

    def slices(prefix: str) -> BrainSlices:
        images, labels = data[f"{prefix}_images"], data[f"{prefix}_labels"]
        n = len(labels)
        return BrainSlices(images, images > 0, labels, np.arange(n), np.zeros(n, np.int64))

    train, test = slices("train"), slices("test")
    nodes, ts = config["nodes"], config["timesteps"]
    tmp = tempfile.mkdtemp(prefix="segmem-")
    try:
        run_pipeline(mode, backbone, nodes, ts, train.subset([0, 1]), test.subset([0]), args, tmp + "/warm")
        with PeakMeter() as meter:
            pred, clf = run_pipeline(mode, backbone, nodes, ts, train, test, args, tmp + "/run")
        m = scores(pred, test.labels)
        report({"mode": mode, **meter.result(), "miou": 100 * m["miou"], "n_train_images": len(train),
                "num_features": int(clf.n_features_in_), "image_size": list(train.images.shape[2:])})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_memory(args: argparse.Namespace, chosen: dict[str, Any], train: BrainSlices, test: BrainSlices
                   ) -> dict[str, Any]:
    """Both pipelines on the same larger training set (train slices + augmented copies), fresh processes."""
    if args.memory_limit and args.memory_limit < len(train):
        train = train.subset(np.linspace(0, len(train) - 1, args.memory_limit).round().astype(int))
    train = augmented(train, args.memory_augment, seed=100)
    tmp = Path(tempfile.mkdtemp(prefix="segmem-data-"))
    np.savez(tmp / "data.npz", train_images=train.images, train_labels=train.labels, test_images=test.images,
             test_labels=test.labels)
    worker_args = {k: getattr(args, k) for k in ("members", "epochs", "batch_size", "max_pixels", "seed", "cache_dir")}
    config = {"threads": args.threads, "backbone": args.backbone, "nodes": chosen["nodes"],
              "timesteps": chosen["timesteps"], "data": str(tmp / "data.npz"), "args": worker_args}
    runs = {}
    for mode in ("diffrep", "naive"):
        print(f"  memory: {mode} pipeline in a fresh process", flush=True)
        runs[mode] = run_measured([__file__, "--memory-worker", mode, "--worker-config", json.dumps(config)])
    shutil.rmtree(tmp, ignore_errors=True)
    d, n = runs["diffrep"], runs["naive"]
    return {"procedure": "each pipeline (features, head fit, test prediction) in a fresh process; after imports, "
                         "data loading and a warm-up pass on 2 images, VmHWM is reset; work peak = peak RSS - the "
                         "RSS at that reset. Same head and seed: both draw the identical pixel sample in the same "
                         "order each epoch, so they differ only in storage (and float16 test descriptors)",
            "runs": runs, "work_peak_ratio": n["work_peak_mb"] / max(d["work_peak_mb"], 1e-6),
            "total_peak_ratio": n["peak_rss_mb"] / max(d["peak_rss_mb"], 1e-6),
            "miou_difference_points": abs(d["miou"] - n["miou"]), "n_train_images": len(train),
            "config": {k: v for k, v in config.items() if k != "data"}}


# ---------------------------------------------------------------------------------------------- figure
def overlays(path: Path, images: np.ndarray, truth: np.ndarray, pred: np.ndarray, unc: np.ndarray,
             slices: np.ndarray, title: str, num_classes: int = NUM_CLASSES) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(4, len(images))
    pick = np.linspace(0, len(images) - 1, rows).round().astype(int)
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.1 * rows), squeeze=False)
    for r, i in enumerate(pick):
        top = num_classes - 1
        panels = [(images[i, 0], "gray", (0, 1), f"image z={slices[i]}"), (truth[i], "viridis", (0, top), "truth"),
                  (pred[i], "viridis", (0, top), "prediction"), (unc[i], "magma", (0, None), "uncertainty")]
        for c, (arr, cmap, (lo, hi), name) in enumerate(panels):
            axes[r, c].imshow(arr, cmap=cmap, vmin=lo, vmax=hi if hi is not None else max(float(unc.max()), 1e-6))
            axes[r, c].set_title(name, fontsize=8)
            axes[r, c].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main
def load_data(args: argparse.Namespace) -> tuple[BrainSlices, BrainSlices, BrainSlices, dict[int, dict[int, np.ndarray]]]:
    """Train, val and test slices (limited and augmented as asked) and the labelled train indices per seed and N."""
    train, val, test = (load_brain_split(s) for s in ("train", "val", "test"))
    if args.val_limit:
        val = val.subset(np.linspace(0, len(val) - 1, args.val_limit).round().astype(int))
    if args.test_limit:
        test = test.subset(np.linspace(0, len(test) - 1, args.test_limit).round().astype(int))
    test = augmented(test, args.test_augment, seed=10_000)
    labelled = {s: {n: labelled_indices(s, n, len(train)) for n in args.ns} for s in args.seeds}
    return train, val, test, labelled


def _print_row(row: dict) -> None:
    print(f"  {row['method']:28s} N={row['n_labelled']:2d}: mIoU {row['miou']['mean']:.1f} +- {row['miou']['std']:.1f}",
          flush=True)


def pixel_head_rows(args: argparse.Namespace, nets: dict[str, tuple[str, Backbone]], selection: dict,
                    train: BrainSlices, test: BrainSlices, labelled: dict, watch: Stopwatch) -> tuple[list[dict], tuple | None]:
    """Rows of the pixel heads on each backbone's chosen descriptors, and the overlay (pred, unc, N, seed) to show."""
    union = sorted({i for per in labelled.values() for idx in per.values() for i in idx})
    position = {i: p for p, i in enumerate(union)}
    rows, overlay = [], None
    for key, (method, bb) in nets.items():
        nodes, ts = selection[key]["chosen"]["nodes"], selection[key]["chosen"]["timesteps"]
        with watch(f"{method}: features"):
            stores = {ns: (pixel_store(bb, nodes, ts, train.images[union], train.labels[union], args, noise_seed=ns),
                           pixel_store(bb, nodes, ts, test.images, test.labels, args, noise_seed=ns))
                      for ns in args.noise_seeds}
        for n in args.ns:
            runs = []
            for s, ns in ((s, ns) for s in args.seeds for ns in args.noise_seeds):
                tr_store, te_store = stores[ns]
                with watch(f"{method}: heads"):
                    clf = make_head(args, s).fit(tr_store.subset([position[i] for i in labelled[s][n]]))
                    pred, unc = clf.predict_with_uncertainty(te_store)
                runs.append({"seed": s, "noise_seed": ns, "slices": train.slice_index[labelled[s][n]].tolist(),
                             **scores(pred, test.labels, len(task_labels(args)))})
                if method == "diffrep" and overlay is None and n == min(args.ns, key=lambda k: abs(k - SELECT_N)):
                    overlay = (pred, unc, n, s)
            rows.append({**summarise(method, n, runs, task_labels(args)), "nodes": nodes, "timesteps": ts})
            _print_row(rows[-1])
    return rows, overlay


def baseline_rows(args: argparse.Namespace, train: BrainSlices, test: BrainSlices, labelled: dict,
                  watch: Stopwatch) -> list[dict]:
    """Rows of the supervised BasicUNet and of the trivial intensity + coordinates head."""
    xt = trivial_descriptors(test.images)
    rows = []
    for method in ("supervised: BasicUNet end to end", "trivial: intensity + coordinates"):
        for n in args.ns:
            runs = []
            for s in args.seeds:
                idx = labelled[s][n]
                with watch(method):
                    if method.startswith("supervised"):
                        pred = train_supervised(train.subset(idx), test.images, steps=args.sup_steps,
                                                batch=args.sup_batch, seed=s, num_classes=len(task_labels(args)),
                                                augmentation=task_augmentation(args))
                    else:
                        clf = make_head(args, s).fit(trivial_descriptors(train.images[idx]), train.labels[idx])
                        pred = clf.predict(xt)
                runs.append({"seed": s, "slices": train.slice_index[idx].tolist(),
                             **scores(pred, test.labels, len(task_labels(args)))})
            rows.append(summarise(method, n, runs, task_labels(args)))
            _print_row(rows[-1])
    return rows


def compute_targets(args: argparse.Namespace, rows: list[dict], memory: dict | None) -> list[dict]:
    """The stated targets at N = SELECT_N and for memory, with the measured values and whether they are met."""
    def mean_of(method: str, n: int) -> float | None:
        hits = [r["miou"]["mean"] for r in rows if r["method"] == method and r["n_labelled"] == n]
        return hits[0] if hits else None

    d5, c5, s5 = (mean_of(m, SELECT_N) for m in ("diffrep", "control: random-init U-Net",
                                                 "supervised: BasicUNet end to end"))
    targets = []
    if d5 is not None:
        targets += [{"name": "N=5: diffrep mIoU - control mIoU (points)", "threshold": TARGETS["n5_gain_over_control_points"],
                     "value": d5 - c5, "met": d5 - c5 >= TARGETS["n5_gain_over_control_points"]},
                    {"name": "N=5: diffrep mIoU - supervised U-Net mIoU (points)",
                     "threshold": TARGETS["n5_gain_over_supervised_points"], "value": d5 - s5,
                     "met": d5 - s5 >= TARGETS["n5_gain_over_supervised_points"]}]
    if memory is not None:
        equal = memory["miou_difference_points"] <= TARGETS["equal_miou_tolerance_points"]
        targets.append({"name": "peak memory (work peak RSS) naive / diffrep at equal mIoU",
                        "threshold": TARGETS["memory_ratio_min"], "value": memory["work_peak_ratio"],
                        "equal_miou": equal, "met": equal and memory["work_peak_ratio"] >= TARGETS["memory_ratio_min"]})
    meaningful = not args.quick and args.backbone != "random-brain"
    for target in targets:
        target["meaningful"] = meaningful  # quick runs and untrained backbones only smoke-test the pipeline
    return targets


def describe_run(args: argparse.Namespace, backbone: Backbone, train: BrainSlices, val: BrainSlices,
                 test: BrainSlices, labelled: dict) -> dict:
    """The task, protocol, backbone, data and notes of the result JSON."""
    return {"task": "brain tissue segmentation, 64x64 axial MNI152 slices",
            "protocol": __doc__.split("\n\n")[1:5],
            "backbone": {"spec": args.backbone, "identity": backbone_identity(backbone),
                         "provenance": backbone.config.provenance,
                         "noise_levels": {str(t): backbone.noise_level(t) for t in sorted(
                             {t for ts in TIMESTEP_SETS.values() for t in ts})}},
            "data": {"labels": list(LABEL_NAMES), "n_train_slices": len(train), "n_val_slices": len(val),
                     "n_test": len(test), "test_augment": args.test_augment,
                     "test_slices": test.slice_index.tolist(),
                     "labelled_slices": {str(s): {str(n): train.slice_index[i].tolist() for n, i in per.items()}
                                         for s, per in labelled.items()}}}


def _notes(args: argparse.Namespace) -> list[str]:
    return [note for note in (
        "the control's nodes/timesteps are its own val selection on the same grid",
        "quick mode: tiny subsets and heads, numbers are a smoke test only" if args.quick else "",
        "random-brain backbone: untrained, targets not meaningful" if args.backbone == "random-brain" else "",
    ) if note]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, json.loads(args.worker_config))
        return {}
    config = {k: v for k, v in vars(args).items() if k not in ("memory_worker", "worker_config")}
    meta = run_metadata(config, args.seed)
    watch = Stopwatch()
    suffix = "_quick" if args.quick else ""
    out = Path(args.out)

    backbone = get_backbone(args.backbone)
    control = random_init_control(backbone, 0)
    train, val, test, labelled = load_data(args)

    print("selecting nodes and timesteps on val", flush=True)
    selection = {}
    for name, bb in (("diffrep", backbone), ("control", control)):
        with watch(f"{name}: selection (val grid)"):
            selection[name] = select_config(name, bb, train, val, args)
    nets = {"diffrep": ("diffrep", backbone), "control": ("control: random-init U-Net", control)}
    rows, overlay = pixel_head_rows(args, nets, selection, train, test, labelled, watch)
    rows += baseline_rows(args, train, test, labelled, watch)

    figure = None
    if overlay is not None:
        pred, unc, n, s = overlay
        figure = overlays(out / f"segmentation_brain_overlays{suffix}.png", test.images, test.labels, pred, unc,
                          test.slice_index, f"diffrep ({args.backbone}), N={n} labelled slices, seed {s}; "
                                            f"uncertainty = vote entropy of {args.members} MLPs")
    memory = None
    if not args.skip_memory:
        with watch("memory comparison"):
            memory = measure_memory(args, selection["diffrep"]["chosen"], train, test)
    targets = compute_targets(args, rows, memory)
    payload = {**meta, **describe_run(args, backbone, train, val, test, labelled),
               "selection": selection, "rows": rows, "memory": memory, "targets": targets,
               "figures": {"overlays": str(figure) if figure else None}, "notes": _notes(args)}
    payload = {**payload, **finish_metadata(meta, watch)}
    path = write_json(payload, out / f"segmentation_brain{suffix}.json")
    print(f"wrote {path} in {watch.total()} s")
    for t in targets:
        print(f"  target {t['name']}: {t['value']:.2f} (>= {t['threshold']}) met={t['met']}")
    return payload


if __name__ == "__main__":
    main()

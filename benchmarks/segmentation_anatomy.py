"""Anatomy segmentation from few labelled slices: nuclei and tracts that share intensity (issue 15).

Task (diffrep.data.anatomy): 64x64 axial MNI152 slices, the images of the tissue task, labelled with
8 classes: background, other brain, caudate, lentiform nucleus, thalamus (AAL) and corpus callosum,
internal capsule, corona radiata (JHU white-matter labels), resampled onto the MNI152 grid. Grey
nuclei share one intensity band and tracts another, so intensity alone cannot tell them apart.
Train / val / test are axial blocks with 3-slice gaps (anatomy.SPLITS); val and test are fixed
seeded elastic + affine deformations of their slices (``--val-copies``, ``--test-copies``), so that
fixed coordinates do not solve the task; the labelled train slices are undeformed.

Rows (benchmarks/segmentation_brain.py's functions, same N, same slices, same test set), at N in
{1, 5, 10} labelled train slices x 3 seeds (nested, seeded choice): diffrep (brain-ddpm pixel features
+ the PixelClassifier MLP ensemble, nodes and timesteps chosen on val), the random-init U-Net control
(same head, its own val selection on the same grid), the supervised MONAI BasicUNet (end to end,
augmented with the anatomy deformation during training) and the trivial intensity + coordinates head.

Metrics: IoU per class from the confusion matrix pooled over the test pixels; mIoU over the 8
classes (headline), over the 7 brain classes and over the 6 structures; mean +- std over label seeds x
noise seeds for the U-Net rows (the grid selects with the noise of ``--seed``), over label seeds for
the noise-free baselines.

Settings: ``configs/benchmarks/segmentation_anatomy.yaml`` (``full``; ``quick`` over it with ``--quick``;
the options given over both).

    python benchmarks/segmentation_anatomy.py [--backbone brain-ddpm] [--quick] [--threads 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import segmentation_brain as seg  # noqa: E402
from common import (RESULTS_DIR, Stopwatch, finish_metadata, load_settings, mean_std, merge_settings,  # noqa: E402
                    random_init_control, run_metadata, write_json)

from diffrep.data import anatomy  # noqa: E402
from diffrep.data.brain import BrainSlices  # noqa: E402
from diffrep.digests import backbone_identity  # noqa: E402

TARGET_POINTS = 3.0  # issue 15: at N = 5 diffrep beats each of the trivial head, the control and the supervised U-Net
BASELINES = ("trivial: intensity + coordinates", "control: random-init U-Net", "supervised: BasicUNet end to end")
FULL, QUICK = load_settings("segmentation_anatomy")  # configs/benchmarks/segmentation_anatomy.yaml

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="brain-ddpm",
                   help="checkpoint directory, shipped default name, or 'random-brain' (untrained, smoke runs)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (the quick section of configs/benchmarks/segmentation_anatomy.yaml)")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--cache-dir", default=".cache/pixel-stores", help="PixelStore root (reruns resume)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the feature extractor in the selection grid")
    for name, value in FULL.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, list):
            p.add_argument(flag, nargs="+", type=type(value[0]), default=None)
        else:
            p.add_argument(flag, type=type(value) if value is not None else int, default=None)
    args = p.parse_args(argv)
    vars(args).update(merge_settings(FULL, QUICK, args.quick, {name: getattr(args, name) for name in FULL}))
    return args


def task_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` plus what segmentation_brain's functions read for this task (seg.task_labels, seg.task_augmentation)."""
    return argparse.Namespace(**vars(args), label_names=anatomy.LABEL_NAMES, augmentation=anatomy.anatomy_deformation)


def _limited(data: BrainSlices, limit: int | None) -> BrainSlices:
    return data.subset(np.linspace(0, len(data) - 1, limit).round().astype(int)) if limit else data


def load_data(args: argparse.Namespace) -> tuple[BrainSlices, BrainSlices, BrainSlices, dict[int, dict[int, list]]]:
    """Train (undeformed), val and test (limited, then fixed seeded deformed copies) and the labelled train indices."""
    train = anatomy.load_anatomy_split("train", copies=0)
    parts = []
    for split, limit, copies in (("val", args.val_limit, args.val_copies), ("test", args.test_limit, args.test_copies)):
        data = _limited(anatomy.load_anatomy_split(split, copies=0), limit)
        parts.append(anatomy.deform_slices(data, copies, anatomy.DEFORM_SEEDS[split]) if copies else data)
    labelled = {s: {n: seg.labelled_indices(s, n, len(train)) for n in args.ns} for s in args.seeds}
    return train, parts[0], parts[1], labelled


def with_structure_scores(row: dict[str, Any]) -> dict[str, Any]:
    """A result row with mIoU over the 7 brain classes (``miou_brain``, segmentation_brain's ``miou_tissue``)
    and over the 6 structures (``miou_structures``), per run and as mean +- std."""
    row = dict(row)
    runs = []
    for run in row["runs"]:
        run = {k: v for k, v in run.items() if k != "miou_tissue"}
        iou = np.asarray(run["iou"], dtype=float)
        runs.append({**run, "miou_brain": float(np.nanmean(iou[1:])), "miou_structures": float(np.nanmean(iou[2:]))})
    row.pop("miou_tissue", None)
    row["runs"] = runs
    for key in ("miou_brain", "miou_structures"):
        row[key] = mean_std([100 * r[key] for r in runs])
    return row


def compute_targets(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """At N = SELECT_N: diffrep's mIoU minus each baseline's, against the issue's 3 points (mIoU over 8 classes);
    the same gaps over the 6 structures are reported beside them."""
    def mean_of(method: str, key: str) -> float | None:
        hits = [r[key]["mean"] for r in rows if r["method"] == method and r["n_labelled"] == seg.SELECT_N]
        return hits[0] if hits else None

    targets = []
    if mean_of("diffrep", "miou") is None:
        return targets
    for base in BASELINES:
        gap = mean_of("diffrep", "miou") - mean_of(base, "miou")
        targets.append({"name": f"N={seg.SELECT_N}: diffrep mIoU - {base} mIoU (points)", "threshold": TARGET_POINTS,
                        "value": gap, "met": gap >= TARGET_POINTS,
                        "structures_gap": mean_of("diffrep", "miou_structures") - mean_of(base, "miou_structures"),
                        "meaningful": not args.quick and args.backbone != "random-brain"})
    return targets


def describe_run(args: argparse.Namespace, backbone: Any, train: BrainSlices, val: BrainSlices, test: BrainSlices,
                 labelled: dict) -> dict:
    """The task, protocol, backbone, data (atlases, checks, splits, class pixel counts) of the result JSON."""
    def counts(data: BrainSlices) -> dict[str, int]:
        return dict(zip(anatomy.LABEL_NAMES, np.bincount(data.labels.ravel(), minlength=anatomy.NUM_CLASSES).tolist()))

    return {"task": "anatomy segmentation (deep grey nuclei + white-matter tracts), 64x64 axial MNI152 slices",
            "protocol": __doc__.split("\n\n")[1:4],
            "backbone": {"spec": args.backbone, "identity": backbone_identity(backbone),
                         "provenance": backbone.config.provenance},
            "data": {"labels": list(anatomy.LABEL_NAMES),
                     "classes": [{"name": c, "atlas": a, "regions": list(r)} for c, a, r in anatomy.CLASSES],
                     "atlas_checks": anatomy.anatomy_volume().report,
                     "splits_z_index": {k: [list(r) for r in v] for k, v in anatomy.SPLITS.items()},
                     "deformation": {"val_copies": args.val_copies, "test_copies": args.test_copies,
                                     "seeds": anatomy.DEFORM_SEEDS, "transform": anatomy.anatomy_deformation.__doc__},
                     "pixel_counts": {"train": counts(train), "val": counts(val), "test": counts(test)},
                     "n_train_slices": len(train), "n_val": len(val), "n_test": len(test),
                     "test_slices": test.slice_index.tolist(),
                     "labelled_slices": {str(s): {str(n): train.slice_index[i].tolist() for n, i in per.items()}
                                         for s, per in labelled.items()}}}


def _notes(args: argparse.Namespace) -> list[str]:
    return [note for note in (
        "the control's nodes/timesteps are its own val selection on the same grid",
        "the supervised U-Net trains with the anatomy deformation as augmentation; the pixel heads see the "
        "undeformed labelled slices only",
        "quick mode: tiny subsets and heads, numbers are a smoke test only" if args.quick else "",
        "random-brain backbone: untrained, targets not meaningful" if args.backbone == "random-brain" else "",
    ) if note]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = run_metadata(dict(vars(args)), args.seed)
    targs, watch, suffix, out = task_args(args), Stopwatch(), "_quick" if args.quick else "", Path(args.out)
    backbone = seg.get_backbone(args.backbone)
    control = random_init_control(backbone, 0)
    nets = {"diffrep": ("diffrep", backbone), "control": ("control: random-init U-Net", control)}
    with watch("data"):
        train, val, test, labelled = load_data(args)

    print("selecting nodes and timesteps on val", flush=True)
    selection = {}
    for name, (_, bb) in nets.items():
        with watch(f"{name}: selection (val grid)"):
            selection[name] = seg.select_config(name, bb, train, val, targs)
    rows, overlay = seg.pixel_head_rows(targs, nets, selection, train, test, labelled, watch)
    rows = [with_structure_scores(r) for r in rows + seg.baseline_rows(targs, train, test, labelled, watch)]

    figure = None
    if overlay is not None:
        pred, unc, n, s = overlay
        figure = seg.overlays(out / f"segmentation_anatomy_overlays{suffix}.png", test.images, test.labels, pred, unc,
                              test.slice_index, f"diffrep ({args.backbone}), anatomy, N={n} labelled slices, seed {s}",
                              num_classes=anatomy.NUM_CLASSES)
    targets = compute_targets(args, rows)
    payload = {**meta, **describe_run(args, backbone, train, val, test, labelled), "selection": selection,
               "rows": rows, "targets": targets, "figures": {"overlays": str(figure) if figure else None},
               "notes": _notes(args)}
    payload = {**payload, **finish_metadata(meta, watch)}
    path = write_json(payload, out / f"segmentation_anatomy{suffix}.json")
    print(f"wrote {path} in {watch.total()} s")
    for t in targets:
        print(f"  target {t['name']}: {t['value']:.2f} (>= {t['threshold']}) met={t['met']}")
    return payload


if __name__ == "__main__":
    main()

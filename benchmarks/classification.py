"""Fashion-MNIST classification: a linear probe on frozen diffusion features, with controls side by side.

Protocol (DDAE-style linear probe, Xiang et al. ICCV 2023, with the search kept off the test set):
- a stratified validation split (10%) is carved from the 60k training images; every (node, t) of the
  grid and a few concatenations are scored there (the grid fits on a ``--grid-fit`` subset of the rest);
- the chosen single key and the chosen concatenation are refitted on all 60k and scored on the 10k
  test images; nothing else is ever scored on test;
- controls with the same LinearProbe: raw pixels, and a randomly initialised U-Net of the same
  architecture with the same extractor, search and head;
- supervised reference: a narrow timm ResNet (resnet10t, channels 32-256) trained from scratch on the
  same labels;
- label efficiency: 10 and 100 labels per class from the fit part, for diffrep and both controls, with
  the (node, t) chosen at full labels;
- noise seeds: the selection uses ``--seed``; the chosen keys are then re-extracted under every
  ``--noise-seeds`` draw (``noise_seeds.py``), so every U-Net row is mean +- std over label seeds x
  noise seeds (full-label rows: over noise seeds), with the std split into its two parts ("spread").

Settings: ``configs/benchmarks/classification.yaml`` (``full``; ``quick`` over it with ``--quick``; the
options given over both).

Writes ``classification_fmnist.json`` and ``classification_fmnist_heatmap.png`` (``_quick`` variants
with ``--quick``) to ``--out``. Features are cached (``--cache-dir``), so a rerun only refits heads.

    python benchmarks/classification.py [--backbone fmnist-ddpm] [--quick] [--threads 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, Stopwatch, finish_metadata, load_settings, merge_settings,  # noqa: E402
                    random_init_control, run_metadata, write_json)
from noise_seeds import chosen_keys, features_at_noise_seed, seed_stats  # noqa: E402

from diffrep import load_backbone  # noqa: E402
from diffrep._atomic import atomic_savefig  # noqa: E402
from diffrep.backbones import Backbone  # noqa: E402
from diffrep.data.fashion_mnist import load_fashion_mnist, to_tensor_images  # noqa: E402
from diffrep.features.cache import DEFAULT_CACHE_DIR  # noqa: E402
from diffrep.heads import LinearProbe, key_name, sample_per_class, stack_features  # noqa: E402
from diffrep.pipelines.probe import ProbeRun, load_probe_dataset, run_probe  # noqa: E402

ANCHORS = {  # published Fashion-MNIST test accuracies to read our numbers against (not measured here)
    "logistic regression, raw pixels": 0.84,
    "RBF SVC, raw pixels": 0.897,
    "2-layer CNN": "0.91-0.92",
}
TARGETS = {"full_labels_test_acc_min": 0.92, "labels10_gain_over_raw_pixels_min": 0.10}
FULL, QUICK = load_settings("classification")  # configs/benchmarks/classification.yaml


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="fmnist-ddpm", help="checkpoint directory or shipped default name")
    p.add_argument("--quick", action="store_true",
                   help="small subsets for a smoke run (the quick section of configs/benchmarks/classification.yaml)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="noise, validation split and CNN seed")
    p.add_argument("--random-init-seed", type=int, default=None, help="seed of the random-init U-Net (default --seed)")
    p.add_argument("--timesteps", nargs="+", type=int, default=None, help=f"grid (default {FULL['timesteps']})")
    p.add_argument("--nodes", nargs="+", default=None, help="grid nodes (default: all)")
    p.add_argument("--noise", default="shared")
    p.add_argument("--pool-grid", type=int, default=1,
                   help="average-pool each node to a G x G grid (1 = global average, the DDAE protocol); "
                        "G > 1 writes classification_fmnist_gridG.json")
    p.add_argument("--val-fraction", type=float, default=None, help="default 0.1")
    p.add_argument("--grid-fit", type=int, default=None, help="fit images used to score the grid (default 10000)")
    p.add_argument("--labels-per-class", nargs="+", type=int, default=[10, 100])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="label-subset seeds")
    p.add_argument("--noise-seeds", nargs="+", type=int, default=None,
                   help=f"extraction-noise seeds of the chosen keys (default {FULL['noise_seeds']})")
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--cnn-epochs", type=int, default=None, help="default 5")
    p.add_argument("--skip-cnn", action="store_true")
    p.add_argument("--skip-random-control", action="store_true",
                   help="no random-init U-Net rows (for lever runs that compare against an earlier full run)")
    p.add_argument("--tag", default=None, help="suffix of the output names, e.g. 'long' -> classification_fmnist_long.json")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=None, help="images per cache chunk (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per U-Net forward")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    vars(args).update(merge_settings(FULL, QUICK, args.quick, {name: getattr(args, name) for name in FULL}))
    return args


# ---------------------------------------------------------------------------------------- helpers
def _row(method: str, keys: Any, backbone: Backbone | None, labels_per_class: int | None,
         accs: dict[tuple[int, int | None], float], n_train: int, **extra: Any) -> dict:
    """One result row; ``accs`` maps (label seed, noise seed) to test accuracy (noise seed None: no noise)."""
    if keys is None:
        node, timestep, level, key = None, None, None, None
    else:
        node = "+".join(k.node for k in keys)
        ts = [k.timestep for k in keys]
        levels = [round(backbone.noise_level(t), 6) for t in ts]
        timestep, level = (ts[0], levels[0]) if len(ts) == 1 else (ts, levels)
        key = key_name(keys)
    stats = seed_stats(accs)
    return {"method": method, "key": key, "node": node, "timestep": timestep, "noise_level": level,
            "labels_per_class": labels_per_class, "n_train": n_train, "test_acc_mean": stats["mean"],
            "test_acc_std": stats["std"], "test_accs": stats["values"], "test_acc": stats,
            "seeds": sorted({ls for ls, _ in accs}), "noise_seeds": sorted({ns for _, ns in accs if ns is not None}),
            **extra}


def fit_score(X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray, probe: LinearProbe) -> float:
    from sklearn.base import clone

    return float(clone(probe).fit(X, y).score(Xt, yt))


def train_cnn(x: torch.Tensor, y: np.ndarray, xt: torch.Tensor, yt: np.ndarray, *, epochs: int, seed: int,
              batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 0.05, progress: bool = True) -> dict:
    """A narrow timm ResNet (resnet10t, channels 32/64/128/256) trained from scratch with AdamW + cosine LR."""
    import timm
    from torch.nn import functional as F

    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=int(y.max()) + 1, in_chans=1, pretrained=False,
                              channels=(32, 64, 128, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(y) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    yy = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    norm = lambda a: (a - 0.5) / 0.5  # noqa: E731
    iterator = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="supervised CNN", unit="epoch", leave=False)
    model.train()
    for _ in iterator:
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(model(norm(x[idx])), yy[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(norm(xt[i:i + 512])).argmax(1) for i in range(0, len(yt), 512)])
    return {"test_acc": float((pred.numpy() == yt).mean()), "params": sum(p.numel() for p in model.parameters()),
            "model": "timm resnet10t, channels (32, 64, 128, 256), from scratch", "epochs": epochs,
            "batch_size": batch_size, "optimiser": f"AdamW lr {lr} wd {weight_decay}, one-cycle cosine",
            "final_train_loss": float(loss.item())}


def heatmap(runs: dict[str, ProbeRun], nodes: list[str], timesteps: list[int], backbone: Backbone, path: Path,
            title: str) -> None:
    """Validation accuracy over nodes x timesteps, one panel per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(1.3 * len(timesteps) * len(runs) + 2, 0.55 * len(nodes) + 2),
                             squeeze=False)
    values = {}
    for name, run in runs.items():
        grid = np.full((len(nodes), len(timesteps)), np.nan)
        for row in run.report["selection_table"]:
            if row["kind"] == "single":
                grid[nodes.index(row["nodes"][0]), timesteps.index(row["timesteps"][0])] = row["val_acc"]
        values[name] = grid
    vmin = np.nanmin([np.nanmin(g) for g in values.values()])
    vmax = np.nanmax([np.nanmax(g) for g in values.values()])
    for ax, (name, grid) in zip(axes[0], values.items()):
        im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        best = np.unravel_index(np.nanargmax(grid), grid.shape)
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if v > (vmin + vmax) / 2 else "white",
                    fontweight="bold" if (i, j) == best else "normal")
        ax.set_xticks(range(len(timesteps)),
                      [f"t={t}\n\u03c3={backbone.noise_level(t):.3f}" for t in timesteps], fontsize=8)
        ax.set_yticks(range(len(nodes)), nodes if ax is axes[0][0] else [])
        ax.set_title(name, fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label="validation accuracy")
    fig.suptitle(title, fontsize=10)
    atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main
class _Data(NamedTuple):
    """The Fashion-MNIST images and labels of a run, and their raw-pixel vectors (the pixel control)."""

    xtr: torch.Tensor
    ytr: np.ndarray
    xte: torch.Tensor
    yte: np.ndarray
    info: dict
    raw_train: np.ndarray
    raw_test: np.ndarray


def _load_data(args: argparse.Namespace, backbone: Backbone) -> _Data:
    xtr, ytr, xte, yte, info = load_probe_dataset("fmnist", backbone, args.limit_train, args.limit_test)
    return _Data(xtr, ytr, xte, yte, info, xtr.flatten(1).numpy(), xte.flatten(1).numpy())


class _Probed(NamedTuple):
    """A probed backbone: its run (selection with ``--seed``) and the chosen keys' features per noise seed."""

    name: str
    run: ProbeRun
    backbone: Backbone
    features: dict[int, tuple[dict, dict]]


def _with_noise_seeds(name: str, run: ProbeRun, backbone: Backbone, args: argparse.Namespace, data: _Data,
                      progress: bool) -> _Probed:
    """Re-extract the run's chosen keys under every noise seed (the selection seed reuses the run's features)."""
    keys = chosen_keys(run.selection.best_single, run.selection.best_concat, run.selection.best)
    ordered = data.xtr[torch.from_numpy(run.order)]
    count = int(run.position[run.train_idx].max()) + 1
    features = {}
    for n in args.noise_seeds:
        if n == args.seed:
            features[n] = ({k: run.features_train[k] for k in keys}, {k: run.features_test[k] for k in keys})
        else:
            features[n] = features_at_noise_seed(
                backbone, keys, ordered, data.xte, n, count=count, noise=args.noise, cache_dir=args.cache_dir,
                dataset_id=f"fmnist:{data.info['n_train']}/{data.info['n_test']}:val={args.val_fraction},seed={args.seed}",
                chunk_size=args.chunk_size, batch_size=args.batch_size, progress=progress, pool_grid=args.pool_grid)
    return _Probed(name, run, backbone, features)


def _probe_acc(p: _Probed, keys: Any, noise_seed: int, idx: np.ndarray, data: _Data, probe: LinearProbe) -> float:
    """Test accuracy of a probe fitted on training images ``idx`` with the chosen keys under one noise seed."""
    train, test = p.features[noise_seed]
    return fit_score(stack_features(train, keys, rows=p.run.position[idx]), data.ytr[idx],
                     stack_features(test, keys), data.yte, probe)


def _full_label_rows(args: argparse.Namespace, probed: list[_Probed], data: _Data, probe: LinearProbe,
                     watch: Stopwatch, progress: bool) -> list[dict]:
    """Rows at full labels: each probed backbone's choices (over noise seeds), raw pixels and (unless skipped) the CNN."""
    run = probed[0].run
    n_full = int(run.train_idx.size)
    rows = []
    for p in probed:
        for kind, label in (("single", "best (node, t)"), ("concat", "best concatenation")):
            if kind in p.run.report["choices"]:
                c = p.run.report["choices"][kind]
                keys = p.run.selection.best_single if kind == "single" else p.run.selection.best_concat
                with watch(f"{p.name}: full-label refits over noise seeds"):
                    accs = {(args.seed, n): (c["test_acc"] if n == args.seed
                                             else _probe_acc(p, keys, n, p.run.train_idx, data, probe))
                            for n in args.noise_seeds}
                rows.append(_row(f"{p.name}: {label}", keys, p.backbone, None, accs, n_full,
                                 val_acc=c["val_acc"], validation_winner=p.run.report["best"] == kind))
    with watch("raw pixels: full-label probe"):
        acc = fit_score(data.raw_train[run.train_idx], data.ytr[run.train_idx], data.raw_test, data.yte, probe)
    rows.append(_row("control: raw pixels", None, None, None, {(args.seed, None): acc}, n_full))
    if not args.skip_cnn:
        with watch("supervised CNN"):
            # the CNN sees the unpadded 28x28 images in [0, 1]
            train_u8 = load_fashion_mnist("train")[0][:data.info["n_train"]]
            test_u8 = load_fashion_mnist("test")[0][:data.info["n_test"]]
            cnn = train_cnn(to_tensor_images(train_u8[run.train_idx]), data.ytr[run.train_idx],
                            to_tensor_images(test_u8), data.yte, epochs=args.cnn_epochs, seed=args.seed,
                            progress=progress)
        rows.append(_row("reference: supervised CNN (end to end)", None, None, None, {(args.seed, None): cnn["test_acc"]},
                         n_full, details=cnn))
    return rows


def _label_efficiency_rows(args: argparse.Namespace, probed: list[_Probed], data: _Data,
                           probe: LinearProbe) -> list[dict]:
    """Rows with K labels per class from the fit part (never from validation), over label seeds x noise seeds."""
    main, control = probed[0], (probed[1] if len(probed) > 1 else None)
    sel = main.run.selection
    methods = {"diffrep: validation winner": (main, sel.best), "diffrep: best (node, t)": (main, sel.best_single)}
    if sel.best_concat is not None:
        methods["diffrep: best concatenation"] = (main, sel.best_concat)
    methods["control: raw pixels"] = (None, None)
    if control is not None:
        methods["control: random-init U-Net, validation winner"] = (control, control.run.selection.best)
    ytr, fit_idx, rows = data.ytr, main.run.fit_idx, []
    for k in args.labels_per_class:
        accs: dict[str, dict] = {m: {} for m in methods}
        for s in args.seeds:
            idx = fit_idx[sample_per_class(ytr[fit_idx], k, s)]
            for m, (p, keys) in methods.items():
                if p is None:
                    accs[m][(s, None)] = fit_score(data.raw_train[idx], ytr[idx], data.raw_test, data.yte, probe)
                    continue
                for n in args.noise_seeds:
                    accs[m][(s, n)] = _probe_acc(p, keys, n, idx, data, probe)
        for m, (p, keys) in methods.items():
            rows.append(_row(m, keys, p.backbone if p else None, k, accs[m], k * len(np.unique(ytr))))
    return rows


def _targets(args: argparse.Namespace, rows: list[dict], run: ProbeRun) -> dict:
    """The stated targets, the measured values and whether they are met."""
    def mean_of(method: str, k: int | None) -> float | None:
        hit = [r["test_acc_mean"] for r in rows if r["method"] == method and r["labels_per_class"] == k]
        return hit[0] if hit else None

    winner = [r for r in rows if r["method"].startswith("diffrep: ") and r["labels_per_class"] is None
              and r.get("validation_winner")]
    full = winner[0]["test_acc_mean"]  # mean over noise seeds
    gain = None
    if 10 in args.labels_per_class:
        gain = mean_of("diffrep: validation winner", 10) - mean_of("control: raw pixels", 10)
    targets = {**TARGETS, "full_labels_test_acc": full, "labels10_gain_over_raw_pixels": gain,
               "met": bool(full >= TARGETS["full_labels_test_acc_min"] and gain is not None
                           and gain >= TARGETS["labels10_gain_over_raw_pixels_min"]),
               "measured_on": ("the validation winner (single or concatenation) of the pretrained backbone, mean "
                               "over noise seeds; "
                               "gain in accuracy points / 100, mean over seeds")}
    if args.quick:
        targets["note"] = "quick run on subsets: not evidence for or against the targets"
    return targets


def _payload(args: argparse.Namespace, meta: dict, watch: Stopwatch, backbone: Backbone, run: ProbeRun,
             rrun: ProbeRun | None, init_seed: int, data_info: dict, rows: list[dict], targets: dict,
             heat_path: Path) -> dict:
    """The result JSON."""
    return {
        **finish_metadata(meta, watch),
        "quick": args.quick,
        "backbone": {"name": str(args.backbone), "identity": run.report["backbone_identity"],
                     "provenance": backbone.config.provenance,
                     "nodes": [{"name": i.name, "channels": i.channels, "stride": i.stride}
                               for i in backbone.feature_info()]},
        "random_control": ({"identity": rrun.report["backbone_identity"], "init_seed": init_seed} if rrun
                           else {"skipped": "--skip-random-control"}),
        "data": data_info,
        "protocol": {"validation": f"stratified {args.val_fraction:.0%} of the training images, seed {args.seed}",
                     "grid_fit": run.report["n_grid_fit"], "full_label_refit": "fit + validation",
                     "label_efficiency": ("K per class from the fit part; (node, t) chosen at full labels on the "
                                          "validation split; seeds vary the labelled subset"),
                     "noise_seeds": ("selection with the extraction noise of --seed; the chosen keys re-extracted "
                                     f"under noise seeds {list(args.noise_seeds)}; U-Net rows are mean +- std over "
                                     "label seeds x noise seeds, 'spread' splits the std into its two parts"),
                     "probe": run.report["probe"], "noise": args.noise,
                     "pooling": ("global average" if args.pool_grid == 1
                                 else f"{args.pool_grid}x{args.pool_grid} average grid per node"),
                     "feature_dtype": "float16 cache, float32 fit"},
        "rows": rows,
        "selection_table": [{"backbone": "diffrep", **r} for r in run.report["selection_table"]]
                           + [{"backbone": "random-init U-Net", **r} for r in (rrun.report["selection_table"] if rrun else [])],
        "anchors": ANCHORS,
        "targets": targets,
        "heatmap": heat_path.name,
    }


def _print_summary(rows: list[dict], targets: dict, payload: dict, path: Path, heat_path: Path) -> None:
    print(f"{'method':<48} {'K':>5} {'key':<24} {'test acc':>14}")
    for r in rows:
        acc = f"{r['test_acc_mean']:.4f}" + (f" +- {r['test_acc_std']:.4f}" if r["test_acc"]["n"] > 1 else "")
        print(f"{r['method']:<48} {str(r['labels_per_class'] or 'all'):>5} {str(r['key'] or '-'):<24} {acc:>14}")
    print(f"targets met: {targets['met']}  (wall {payload['wall_seconds']} s)  wrote {path} and {heat_path}")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = {k: v for k, v in vars(args).items()}
    meta = run_metadata(config, args.seed)
    if argv is not None:  # called as a function: record the arguments it was given, not the host's argv
        meta["command"] = " ".join(["benchmarks/classification.py", *(shlex.quote(str(a)) for a in argv)])
    watch = Stopwatch()
    progress = not args.quiet
    suffix = (("" if args.pool_grid == 1 else f"_grid{args.pool_grid}") + (f"_{args.tag}" if args.tag else "")
              + ("_quick" if args.quick else ""))
    out = Path(args.out)

    backbone = load_backbone(args.backbone)
    nodes = backbone.check_nodes(args.nodes or backbone.node_names)
    data = _load_data(args, backbone)
    probe = LinearProbe(C=args.C, max_iter=args.max_iter)
    common = dict(nodes=nodes, timesteps=args.timesteps, noise=args.noise, seed=args.seed,
                  val_fraction=args.val_fraction, grid_fit=args.grid_fit, cache_dir=args.cache_dir,
                  dataset_id=f"fmnist:{data.info['n_train']}/{data.info['n_test']}", chunk_size=args.chunk_size,
                  batch_size=args.batch_size, probe=probe, progress=progress, pool_grid=args.pool_grid)
    init_seed = args.seed if args.random_init_seed is None else args.random_init_seed
    random_backbone = random_init_control(backbone, init_seed, "--random-init-seed")

    with watch("diffrep: features + selection + full-label probes"):
        run = run_probe(backbone, data.xtr, data.ytr, data.xte, data.yte, **common)
    rrun = None
    if not args.skip_random_control:
        with watch("random U-Net: features + selection + full-label probes"):
            rrun = run_probe(random_backbone, data.xtr, data.ytr, data.xte, data.yte, **common)
    probed = [("diffrep", run, backbone)] + ([("control: random-init U-Net", rrun, random_backbone)] if rrun else [])
    with watch("chosen keys under every noise seed"):
        probed = [_with_noise_seeds(name, r, rb, args, data, progress) for name, r, rb in probed]
    rows = _full_label_rows(args, probed, data, probe, watch, progress)
    with watch("label efficiency"):
        rows += _label_efficiency_rows(args, probed, data, probe)

    heat_path = out / f"classification_fmnist{suffix}_heatmap.png"
    heatmap({"diffrep (pretrained)": run, **({"random-init U-Net (control)": rrun} if rrun else {})}, nodes, list(args.timesteps), backbone,
            heat_path, f"Fashion-MNIST linear probe: validation accuracy (fit {run.report['n_grid_fit']}, "
                       f"val {run.report['n_val']}), noise {args.noise}, seed {args.seed}")
    targets = _targets(args, rows, run)
    payload = _payload(args, meta, watch, backbone, run, rrun, init_seed, data.info, rows, targets, heat_path)
    path = write_json(payload, out / f"classification_fmnist{suffix}.json")
    if progress:
        _print_summary(rows, targets, payload, path, heat_path)
    return payload


if __name__ == "__main__":
    main()

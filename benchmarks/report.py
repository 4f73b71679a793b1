"""Print the README's result tables as Markdown, quoted from the JSON files under benchmarks/results/.

    python benchmarks/report.py            # paste the output into README.md's Results section
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def pretraining() -> list[str]:
    lines = []
    for name in ("fmnist-ddpm", "fmnist-ddpm-long", "brain-ddpm"):
        losses = _load(RESULTS / "pretraining" / name / "heldout_losses.json")
        if not losses:
            continue
        ts = list(losses["trained_ema"])
        config = _load(RESULTS / "pretraining" / name / "config.json") or {}
        start = config.get("provenance", {}).get("recipe", {}).get("init_from")
        steps = f"{losses['steps']} steps" + (f" after a warm start from {start}" if start else "")
        lines += [f"**{name}** ({steps}; `benchmarks/results/pretraining/{name}/heldout_losses.json`, "
                  f"written by `diffrep train --config configs/train/{name}.yaml`)", "",
                  "| t | noise level | held-out eps-MSE, trained (EMA) | fresh init |", "|---|---|---|---|"]
        for t in ts:
            lines.append(f"| {t} | {losses['noise_level'][t]:.3f} | {losses['trained_ema'][t]:.4f} | {losses['fresh_init'][t]:.4f} |")
        lines.append("")
    return lines


def extraction() -> list[str]:
    data = _load(RESULTS / "extraction_speed.json")
    if not data:
        return []
    r, cfg, q = data["ratios"], data["config"], data.get("ratio_quartiles")
    how = (f"median over {cfg['repeats']} rounds of the per-round ratio, order alternating; [quartiles]" if q
           else f"medians of {cfg['repeats']} interleaved repeats")

    def cell(name: str) -> str:
        return f"{r[name]:.3f}" + (f" [{q[name]['q1']:.3f}, {q[name]['q3']:.3f}]" if q else "")
    return [f"**Extraction speed** (`{data['command']}`; {cfg['backbone']}, batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, "
            f"{cfg['threads']} thread(s), {how})", "",
            "| ratio | value | target |", "|---|---|---|",
            f"| extractor (all nodes) / bare U-Net forward | {cell('extractor_over_bare_forward')} | <= 1.05 |",
            f"| early exit (encoder nodes) / full forward | {cell('early_exit_over_full_forward')} | <= 0.6 |",
            f"| {cfg['k']} timesteps batched / {cfg['k']} separate forwards | {cell('k_batched_over_k_separate')} | < 1 |", ""]


def _pm(stats: dict, scale: float = 1.0, digits: int = 1) -> str:
    """``mean +- std`` of a mean_std dict (std left out for a single value)."""
    mean = f"{scale * stats['mean']:.{digits}f}"
    return mean if stats.get("n", 1) < 2 else f"{mean} +- {scale * stats['std']:.{digits}f}"


def classification(name: str = "classification_fmnist.json") -> list[str]:
    data = _load(RESULTS / name)
    if not data:
        return []
    prov = data["backbone"]["provenance"]
    start = prov.get("recipe", {}).get("init_from")
    trained = f"{prov.get('steps')} training steps" + (f" warm-started from {start}" if start else "")
    lines = [f"**Fashion-MNIST linear probe** (`{data['command']}`; backbone {data['backbone']['name']} "
             f"({trained}); pooling: {data['protocol']['pooling']}; "
             f"`benchmarks/results/{name}`, heatmap `{data['heatmap']}`)", "",
             "| method | labels per class | (node, t) | test accuracy (%) |", "|---|---|---|---|"]
    for r in data["rows"]:
        acc = r.get("test_acc") or {"mean": r["test_acc_mean"], "std": r["test_acc_std"], "n": len(r["seeds"])}
        lines.append(f"| {r['method']} | {r['labels_per_class'] or 'all (60k)'} | {r['key'] or '-'} | {_pm(acc, 100)} |")
    t = data["targets"]
    gain = t["labels10_gain_over_raw_pixels"]
    lines += ["", f"Targets: >= {100 * t['full_labels_test_acc_min']:.0f}% at full labels (measured "
              f"{100 * t['full_labels_test_acc']:.1f}%); >= {100 * t['labels10_gain_over_raw_pixels_min']:.0f} points "
              f"over raw pixels at 10 labels per class (measured {'n/a' if gain is None else f'{100 * gain:+.1f}'}); "
              f"met: {t['met']}.", ""]
    return lines


def segmentation(name: str = "segmentation_brain.json") -> list[str]:
    data = _load(RESULTS / name)
    if not data:
        return []
    chosen = {k: v["chosen"] for k, v in data["selection"].items()}
    lines = [f"**Brain tissue segmentation** (`{data['command']}`; `benchmarks/results/{name}`; test: "
             f"{data['data']['n_test']} slices; mean +- std over seeds {data['rows'][0]['seeds']}). Nodes and "
             "timesteps chosen on validation slices: "
             + "; ".join(f"{k}: {'+'.join(c['nodes'])} at t={c['timesteps']}" for k, c in chosen.items()), "",
             "| method | N | mIoU | tissue mIoU | IoU bg | IoU CSF | IoU GM | IoU WM | mean Dice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        iou = [_pm(v) for v in r["iou"].values()]
        lines.append(f"| {r['method']} | {r['n_labelled']} | {_pm(r['miou'])} | {_pm(r['miou_tissue'])} | "
                     + " | ".join(iou) + f" | {_pm(r['mdice'])} |")
    mem = data.get("memory")
    if mem:
        d, n = mem["runs"]["diffrep"], mem["runs"]["naive"]
        lines += ["", f"Memory ({mem['n_train_images']} training images, each pipeline in a fresh process): work peak "
                  f"(peak RSS above the RSS after imports and warm-up) {d['work_peak_mb']:.0f} MB diffrep vs "
                  f"{n['work_peak_mb']:.0f} MB naive = **{mem['work_peak_ratio']:.1f}x**; total peak RSS "
                  f"{d['peak_rss_mb']:.0f} MB vs {n['peak_rss_mb']:.0f} MB = {mem['total_peak_ratio']:.1f}x; "
                  f"mIoU {d['miou']:.1f} vs {n['miou']:.1f}."]
    lines += [""] + [f"- {t['name']}: {t['value']:.2f} (target >= {t['threshold']}), met: {t['met']}"
                     for t in data["targets"]] + [""]
    return lines


def anomaly(name: str = "anomaly_brain.json") -> list[str]:
    data = _load(RESULTS / name)
    if not data:
        return []
    noise_seeds = data["grid"].get("noise_seeds", [0])
    lines = [f"**Brain MRI anomaly detection** (`{data['command']}`; `benchmarks/results/{name}`, figure "
             f"`{data['figure']}`; test: {data['data']['slices']['test']} held-out slices x lesion copies; mean +- std "
             f"over lesion seeds {data['seeds']} x noise seeds {noise_seeds} (noise-free rows: lesion seeds only); "
             "AUPRC spread = std over lesion seeds / mean std over noise seeds; settings chosen on validation)", "",
             "| method | U-Net calls / slice | pixel AUPRC | AUPRC spread (lesion / noise) | best Dice | "
             "Dice @ 1% healthy FPR | pixel AUROC | image AUROC | s / slice | time vs AnoDDPM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        part = r.get("spread", {}).get("pixel_auprc", {})
        noise = "-" if part.get("noise_seeds") is None else f"{part['noise_seeds']:.3f}"
        spread = f"{part['lesion_seeds']:.3f} / {noise}" if part else "-"
        lines.append(f"| {r['method']} | {r['unet_calls_per_slice']} | {_pm(r['pixel_auprc'], digits=3)} | {spread} | "
                     f"{_pm(r['best_dice'], digits=3)} | {_pm(r['dice_at_fpr'], digits=3)} | "
                     f"{_pm(r['pixel_auroc'], digits=3)} | {_pm(r['image_auroc'], digits=3)} | "
                     f"{r['seconds_per_slice']:.3f} | {r['time_ratio_to_anoddpm']:.3f} |")
    t = data["targets"]
    lines += ["", f"Headline (chosen on validation among scorers with <= {t['max_unet_calls']} calls): "
              f"**{t['headline']}**. Beats the DAE on AUPRC and best Dice: {t['beats_dae_auprc_and_best_dice']}; "
              f"AUPRC vs {t['anoddpm_reference']}: {100 * t['auprc_gain_over_anoddpm']:+.1f}% with "
              f"{t['calls_ratio_anoddpm']:.0f}x fewer calls; all targets met: {t['met']}.", ""]
    return lines


def main() -> None:
    sections = (pretraining() + extraction() + classification() + classification("classification_fmnist_grid2.json")
                + classification("classification_fmnist_grid2_long.json"))
    print("\n".join(sections + segmentation() + anomaly()))


if __name__ == "__main__":
    main()

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
    for name in ("fmnist-ddpm", "brain-ddpm"):
        losses = _load(RESULTS / "pretraining" / name / "heldout_losses.json")
        if not losses:
            continue
        ts = list(losses["trained_ema"])
        lines += [f"**{name}** ({losses['steps']} steps; `benchmarks/results/pretraining/{name}/heldout_losses.json`, "
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
    r, cfg = data["ratios"], data["config"]
    return [f"**Extraction speed** (`{data['command']}`; {cfg['backbone']}, batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, "
            f"{cfg['threads']} thread(s), medians of {cfg['repeats']} interleaved repeats)", "",
            "| ratio | value | target |", "|---|---|---|",
            f"| extractor (all nodes) / bare U-Net forward | {r['extractor_over_bare_forward']:.3f} | <= 1.05 |",
            f"| early exit (encoder nodes) / full forward | {r['early_exit_over_full_forward']:.3f} | <= 0.6 |",
            f"| {cfg['k']} timesteps batched / {cfg['k']} separate forwards | {r['k_batched_over_k_separate']:.3f} | < 1 |", ""]


def main() -> None:
    print("\n".join(pretraining() + extraction()))


if __name__ == "__main__":
    main()

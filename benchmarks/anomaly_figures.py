"""Figure for benchmarks/anomaly_brain.py: input, ground truth and anomaly maps of several methods."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffrep._atomic import atomic_savefig


def pick_slices(test: dict, n: int) -> list[int]:
    """Up to ``n`` lesioned images, one per lesion kind first, then the largest remaining lesions."""
    lesioned = [i for i in range(len(test["labels"])) if test["labels"][i]]
    chosen, kinds = [], set()
    for i in sorted(lesioned, key=lambda i: -int(test["lesion"][i].sum())):
        if test["kinds"][i] not in kinds and len(chosen) < n:
            chosen.append(i)
            kinds.add(test["kinds"][i])
    chosen += [i for i in sorted(lesioned, key=lambda i: -int(test["lesion"][i].sum())) if i not in chosen]
    return sorted(chosen[:n])


def plot_maps(path: str | Path, test: dict, maps: dict[str, np.ndarray], n: int = 4) -> Path:
    """One row per slice: input with the lesion outline, the truth, then each method's map.

    Each method's colour scale runs from 0 to its 99.5th percentile over the shown slices, so the
    panels compare where a method puts its evidence, not absolute residual sizes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = pick_slices(test, n)
    cols = 2 + len(maps)
    fig, axes = plt.subplots(len(idx), cols, figsize=(1.6 * cols, 1.7 * len(idx) + 0.6), squeeze=False)
    for r, i in enumerate(idx):
        panels = [("input", test["images"][i, 0], "gray", 1.0), ("truth", test["lesion"][i], "gray", 1.0)]
        for name, m in maps.items():
            panels.append((name, m[i], "inferno", float(np.percentile(m[idx], 99.5)) or 1.0))
        for c, (title, img, cmap, vmax) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap, vmin=0.0, vmax=vmax)
            if c == 0:
                ax.contour(test["lesion"][i], levels=[0.5], colors="lime", linewidths=0.6)
                ax.set_ylabel(test["kinds"][i], fontsize=7)
            if r == 0:
                ax.set_title(title.replace(", ", ",\n", 1), fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path = atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path

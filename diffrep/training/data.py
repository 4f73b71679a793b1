"""In-memory training sets for DDPM pretraining, with deterministic per-step batches.

Every batch is a pure function of (seed, step): the epoch permutation, the augmentation seed, the
timesteps and the noise. Resuming therefore needs only the step counter, and a run under torchrun
shards exactly the batch a single process would draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import DataConfig


@dataclass
class TrainingData:
    """Training images (N, C, *spatial) in [0, 1], a held-out set for losses, an optional augmenter."""

    images: torch.Tensor
    heldout: torch.Tensor
    description: dict
    augment: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    masks: torch.Tensor | None = None

    def batch_indices(self, seed: int, step: int, batch_size: int) -> torch.Tensor:
        """Indices of the global batch at ``step``: consecutive slices of a seeded per-epoch permutation."""
        n = self.images.shape[0]
        start = step * batch_size
        out = []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            take = min(batch_size - len(out), n - offset)
            out.extend(perm[offset:offset + take].tolist())
        return torch.tensor(out, dtype=torch.long)

    def batch(self, seed: int, step: int, batch_size: int) -> torch.Tensor:
        index = self.batch_indices(seed, step, batch_size)
        images = self.images[index]
        if self.augment is not None:
            masks = self.masks[index] if self.masks is not None else torch.ones_like(images)
            images = self.augment(images, masks, seed * 1_000_003 + step)
        return images

    def position(self, step: int, batch_size: int) -> dict:
        """The data position reached after ``step`` steps, for checkpoints and logs."""
        epoch, offset = divmod(step * batch_size, self.images.shape[0])
        return {"epoch": epoch, "offset": offset, "images_seen": step * batch_size}


def build_training_data(config: DataConfig, seed: int, channels: int = 1) -> TrainingData:
    """Load the dataset a recipe names and return it as tensors in [0, 1] (``channels``: the U-Net's input
    channels, which decide how a folder's images are read)."""
    if config.dataset == "folder":
        return _folder_data(config, seed, channels)
    if config.dataset == "fmnist":
        from ..data.fashion_mnist import load_fashion_mnist, to_tensor_images

        train, _ = load_fashion_mnist("train", path=config.path)
        test, _ = load_fashion_mnist("test", path=config.path)
        return TrainingData(
            images=to_tensor_images(train, pad_to=config.pad_to),
            heldout=to_tensor_images(test[: config.heldout_size], pad_to=config.pad_to),
            description={"dataset": "fashion-mnist", "train": "train split (60000)",
                         "heldout": f"first {config.heldout_size} test images", "pad_to": config.pad_to},
        )
    if config.dataset == "brain":
        from ..data.augment import brain_augment
        from ..data.brain import load_brain_split

        train = load_brain_split("train", size=config.size, volumes=config.path)
        val = load_brain_split("val", size=config.size, volumes=config.path)
        augment = brain_augment()

        def augment_images(images: torch.Tensor, masks: torch.Tensor, batch_seed: int) -> torch.Tensor:
            return augment(images, masks, batch_seed)[0]
        return TrainingData(
            images=torch.as_tensor(train.images).float(),
            heldout=torch.as_tensor(val.images).float(),
            masks=torch.as_tensor(train.masks).float(),
            augment=augment_images if config.augment else None,
            description={"dataset": "mni152-2009a-axial", "size": config.size, "train_slices": len(train),
                         "heldout": f"val split ({len(val)} slices)", "augment": config.augment,
                         "source": str(train.source) if hasattr(train, "source") else None},
        )
    generator = torch.Generator().manual_seed(seed)
    images = _synthetic_blobs(config.synthetic_count + 16, config.size, generator)
    return TrainingData(images=images[16:], heldout=images[:16],
                        description={"dataset": "synthetic-blobs", "count": config.synthetic_count, "size": config.size})


def _folder_data(config: DataConfig, seed: int, channels: int) -> TrainingData:
    """The images of a folder, a seeded held-out subset (at most a tenth, at least one) set aside."""
    from ..data.image_folder import load_image_folder

    found = load_image_folder(config.path, channels, size=config.size)
    n = len(found.files)
    if n < 2:
        raise ValueError(f"data.path: expected at least 2 images in {config.path} (one is held out), got {n}")
    heldout = max(1, min(config.heldout_size, n // 10))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, train = order[:heldout].sort().values, order[heldout:].sort().values
    return TrainingData(images=found.images[train], heldout=found.images[held],
                        description={**found.describe(), "dataset": "folder", "train_images": n - heldout,
                                     "heldout": f"{heldout} images (seeded, seed {seed})",
                                     "heldout_files": [found.files[i] for i in held.tolist()]})


def _synthetic_blobs(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random blobs in [0, 1], for tests that need a training set without real data."""
    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centre = torch.rand(count, 2, generator=generator) * 1.2 - 0.6
    radius = torch.rand(count, 1, 1, generator=generator) * 0.4 + 0.2
    dist = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
    return torch.exp(-dist / (2 * radius**2)).unsqueeze(1)

"""Out-of-distribution input sets available offline, as float32 (N, 1, S, S) images in [0, 1] on the 8-bit grid.

Every set is drawn with a seed and has the size asked for:

- ``digits``: scikit-learn's 8 x 8 handwritten digits (1797, values 0..16 / 16), resized bilinearly
  (antialiased) to S x S; bright strokes on a dark background, like MNIST;
- ``patches``: S x S crops at native resolution from scikit-image's grey sample images (RGB ones
  converted by ``rgb2gray``): camera, coins, moon, page, text, brick, grass, gravel, cell, clock and the
  colour photographs astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry;
- ``brain``: MNI152 axial slices (``diffrep.data.brain``, 64 x 64, every slice with >= 5% brain) resized
  to S x S;
- ``fashion``: Fashion-MNIST test images resized to S x S (an OOD set for the brain model);
- ``noise``: i.i.d. uniform 8-bit pixels;
- ``constant``: one uniform random grey level per image.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from diffrep.data.slicing import resize_images

GREY_IMAGES = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "cell", "clock")
COLOUR_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def _eight_bit(images: np.ndarray) -> np.ndarray:
    """(N, S, S) floats in [0, 1] -> (N, 1, S, S) float32 on the 8-bit grid k / 255."""
    return (np.clip(np.rint(np.asarray(images, np.float64) * 255), 0, 255) / 255).astype(np.float32)[:, None]


def _choose(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct indices of ``total`` (all of them, shuffled, repeated if n > total)."""
    if n <= total:
        return rng.choice(total, size=n, replace=False)
    return np.concatenate([rng.permutation(total) for _ in range(-(-n // total))])[:n]


def digits(n: int, size: int, seed: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = load_digits().images / 16.0
    rng = np.random.default_rng(seed)
    return _eight_bit(resize_images(images[_choose(len(images), n, rng)], size))


def sample_image_patches(n: int, size: int, seed: int) -> np.ndarray:
    import skimage.data
    from skimage.color import rgb2gray

    rng = np.random.default_rng(seed)
    sources = [getattr(skimage.data, name)() / 255.0 for name in GREY_IMAGES]
    sources += [rgb2gray(getattr(skimage.data, name)()) for name in COLOUR_IMAGES]
    patches = []
    for k in range(n):
        image = sources[k % len(sources)]
        row, col = rng.integers(0, image.shape[0] - size + 1), rng.integers(0, image.shape[1] - size + 1)
        patches.append(image[row:row + size, col:col + size])
    return _eight_bit(np.stack(patches)[rng.permutation(n)])


def brain(n: int, size: int, seed: int) -> np.ndarray:
    from diffrep.data.brain import load_brain_slices

    slices = load_brain_slices(64).images[:, 0]
    rng = np.random.default_rng(seed)
    return _eight_bit(resize_images(slices[_choose(len(slices), n, rng)], size))


def fashion(n: int, size: int, seed: int) -> np.ndarray:
    from diffrep.data.fashion_mnist import load_fashion_mnist

    images = load_fashion_mnist("test")[0] / 255.0
    rng = np.random.default_rng(seed)
    return _eight_bit(resize_images(images[_choose(len(images), n, rng)], size))


def uniform_noise(n: int, size: int, seed: int) -> np.ndarray:
    return _eight_bit(np.random.default_rng(seed).integers(0, 256, (n, size, size)) / 255.0)


def constant(n: int, size: int, seed: int) -> np.ndarray:
    levels = np.random.default_rng(seed).integers(0, 256, n) / 255.0
    return _eight_bit(np.broadcast_to(levels[:, None, None], (n, size, size)))


SETS: dict[str, Callable[[int, int, int], np.ndarray]] = {
    "digits": digits, "patches": sample_image_patches, "brain": brain, "fashion": fashion,
    "noise": uniform_noise, "constant": constant,
}

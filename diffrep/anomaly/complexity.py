"""Input complexity: the length of an image under a generic lossless compressor, in bits per dimension.

Serra et al. 2020 ("Input complexity and out-of-distribution detection with likelihood-based generative
models", ICLR) observe that a generative model's likelihood is dominated by how complex an input is:
simple inputs (constant images, digits) get high likelihoods whatever the model learned. They estimate
the complexity L(x) by the code length of the 8-bit image under a generic lossless compressor (PNG,
JPEG2000, FLIF) and score S(x) = NLL(x) - L(x), both in bits per dimension: how many more bits the model
needs than a compressor that knows nothing about the training data.

Here L is the byte length of the PNG file Pillow writes (``compress_level=9``, no optimisation pass,
headers included: a constant offset for a given image size and mode), times 8, divided by the number of
dimensions C x H x W. Images with 1 channel are coded as grey ("L"), with 3 as RGB; 3D images are coded
slice by slice (along the first spatial axis) and the lengths added.
"""
from __future__ import annotations

import io

import numpy as np

PNG_COMPRESS_LEVEL = 9


def to_uint8(images: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Images (N, C, *spatial) in the data range [low, high] as 8-bit codes 0..255 (rounded, clipped)."""
    if not high > low:
        raise ValueError(f"to_uint8: expected a data range with high > low, got [{low}, {high}]")
    scaled = (np.asarray(images, dtype=np.float64) - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def png_length_bits(image: np.ndarray) -> int:
    """The PNG code length in bits of one 8-bit image (C, H, W) with C = 1 (grey) or 3 (RGB), or of a
    3D image (C, D, H, W) coded slice by slice."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"png_length_bits: expected uint8 codes 0..255, got dtype {image.dtype}")
    if image.ndim == 4:
        return sum(png_length_bits(image[:, k]) for k in range(image.shape[1]))
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"png_length_bits: expected an image (C, H, W) with C = 1 or 3, got shape {image.shape}")
    pixels = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return 8 * buffer.getbuffer().nbytes


def png_bits_per_dim(codes: np.ndarray) -> np.ndarray:
    """L(x) of Serra et al. 2020 per image: PNG length in bits / dimensions, for 8-bit codes (N, C, *spatial)."""
    codes = np.asarray(codes)
    if codes.ndim < 4:
        raise ValueError(f"png_bits_per_dim: expected a batch (N, C, *spatial), got shape {codes.shape}")
    dims = int(np.prod(codes.shape[1:]))
    return np.array([png_length_bits(image) / dims for image in codes], dtype=np.float64)

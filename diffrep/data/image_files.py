"""Decoding one image file (PNG, JPEG, TIFF; 8- or 16-bit; grey or RGB) into a float array in [0, 1]."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def read_image_file(file: str | os.PathLike, channels: int) -> np.ndarray:
    """One PNG/JPEG/TIFF as a float32 (channels, H, W) array in [0, 1], scaled by the file's own bit depth.

    8-bit images are divided by 255, 16-bit ones by 65535 (never clipped; Pillow reads 16-bit RGB
    PNGs at 8-bit precision, correctly scaled). Grey files need
    ``channels == 1``, RGB ones ``channels == 3`` (an RGB file whose three channels are identical
    counts as grey); a mismatch, transparency, an unsupported pixel format or a corrupt/truncated
    file is a ValueError naming the file.
    """
    from PIL import Image

    file = Path(file)
    try:
        with Image.open(file) as image:
            image.load()
            mode, fmt = image.mode, image.format
            if mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                mode = image.mode
            pixels = np.asarray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"input: {file} is not a readable image ({err})") from err
    scale = {"1": 1, "L": 255, "LA": 255, "RGB": 255, "RGBA": 255, "I;16": 65535, "I;16B": 65535,
             "I;16L": 65535, "I": 65535}.get(mode)
    if scale is None or (mode == "I" and fmt != "PNG"):  # "I" is 16-bit only when it comes from a PNG
        raise ValueError(f"input: {file} has pixel format {mode!r}; expected 8- or 16-bit grey or RGB")
    pixels = pixels.astype(np.float32)
    if pixels.ndim == 3 and mode in ("LA", "RGBA"):
        if (pixels[..., -1] < 255).any():
            raise ValueError(f"input: {file} has transparent pixels; expected opaque grey or RGB images")
        pixels = pixels[..., :-1]
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if pixels.shape[-1] == 3 and channels == 1 and (pixels == pixels[..., :1]).all():
        pixels = pixels[..., :1]
    if pixels.shape[-1] != channels:
        kind = {1: "grey", 3: "RGB"}
        raise ValueError(f"input: {file} is {kind.get(pixels.shape[-1], pixels.shape[-1])} but the backbone takes "
                         f"{channels} channel(s) ({kind.get(channels, '')}); convert the image first")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) / scale)

"""Reading image inputs for the CLI and writing extracted features with their metadata."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import save_file

from .._atomic import atomic_path
from ..backbones.backbone import Backbone
from .._types import FeatureKey
from ..compute import ComputeOptions
from ..data.image_files import IMAGE_SUFFIXES, read_image_file  # noqa: F401  (read_image_file: re-exported)
from ..errors import as_dtype
from .extractor import FeatureDict, FeatureExtractor




def read_images(path: str | os.PathLike, backbone: Backbone) -> torch.Tensor:
    """Read a ``.npy`` array ((N,C,H,W), or (N,H,W) for one channel) or a folder of PNG/JPEG/TIFF images.

    Integer images are scaled to the backbone's data range by their own bit depth (8-bit by 255,
    16-bit by 65535; see ``read_image_file``); float ``.npy`` input must already be in the data range.
    Folders are read in sorted file-name order; any other file in the folder is an error. Callers
    check the result with ``Backbone.check_images(images, name=...)`` naming ``path`` their own way
    (rank, channels, finite values, data range).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input: {path} does not exist; expected a .npy file or a folder of images")
    if path.is_dir():
        tensor = _read_folder(path, backbone)
    elif path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"input: {path} is not a readable .npy array ({err})") from err
        if array.ndim == backbone.spatial_dims + 1 and backbone.in_channels == 1:
            array = array[:, None]
        tensor = backbone.normalise(array)
    else:
        raise ValueError(f"input: expected a .npy file or a folder of {'/'.join(IMAGE_SUFFIXES)} images, got {path}")
    return tensor


def image_names(path: str | os.PathLike) -> list[str] | None:
    """The file names ``read_images`` reads from a folder, in its order; None for a ``.npy`` input."""
    path = Path(path)
    return [p.name for p in sorted(path.iterdir())] if path.is_dir() else None


def _read_folder(path: Path, backbone: Backbone) -> torch.Tensor:
    """Every image of a folder as one (N, C, H, W) float batch in the data range."""
    if backbone.spatial_dims != 2:
        raise ValueError(f"input: image folders hold 2D images, but this backbone is {backbone.spatial_dims}D; "
                         f"pass a .npy array instead of {path}")
    entries = sorted(path.iterdir())
    others = [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file()]
    if others:
        raise ValueError(f"input: {path} holds {len(others)} entr{'y' if len(others) == 1 else 'ies'} that are not "
                         f"{'/'.join(IMAGE_SUFFIXES)} images: {others[:10]}; move them out of the folder")
    if not entries:
        raise ValueError(f"input: expected {'/'.join(IMAGE_SUFFIXES)} images in {path}, found none")
    arrays = [read_image_file(f, backbone.in_channels) for f in entries]
    sizes: dict[tuple[int, ...], str] = {}
    for f, a in zip(entries, arrays):
        sizes.setdefault(a.shape[1:], f.name)
    if len(sizes) != 1:
        raise ValueError(f"input: expected images of one size in {path}, got "
                         + ", ".join(f"{s[0]}x{s[1]} (e.g. {name})" for s, name in sizes.items()))
    norm = backbone.config.normalisation
    return torch.from_numpy(np.stack(arrays)) * (norm.high - norm.low) + norm.low


def extract_to_file(backbone: Backbone, images: Any, nodes: Iterable[str], timesteps: Iterable[int],
                    out: str | os.PathLike, noise: str = "shared", seed: int = 0, batch_size: int = 64,
                    dtype: str | torch.dtype = torch.float32, progress: bool = False,
                    compute: ComputeOptions | None = None, files: list[str] | None = None) -> Path:
    """Extract features of ``images`` (a tensor or array, e.g. a memory-mapped .npy) straight to one
    ``.safetensors`` file (tensor names ``node@t``, the FeatureDict metadata in its header), chunk by chunk
    of ``batch_size`` images (each forward holds all ``timesteps`` of its images), stored in ``dtype`` (a torch
    dtype or its name). ``compute``: autocast precision and channels-last layout (``diffrep.compute``), recorded in
    the header and the resume fingerprint. ``files``: the image file names, one per image, written into the
    header (``diffrep extract`` on a folder gives them), so every row of the features names its file.

    Memory holds one chunk of images and features, never the whole output. An interrupted run leaves
    ``OUT.partial`` and its progress record; the same call again computes only the missing chunks
    (see :mod:`diffrep.features.stream`). The file equals ``save_features(extractor(images))`` bit for bit
    (same batching, see FeatureExtractor). Under torchrun (an initialised process group) every process
    takes every world_size-th chunk and writes it into the same file: the result is the same file.
    """
    from .._provenance import feature_code_digest
    from ..digests import backbone_identity
    from .stream import SafetensorsStream

    compute = compute or ComputeOptions()
    extractor = FeatureExtractor(backbone, list(nodes), list(timesteps), noise=noise, seed=seed, batch_size=batch_size,
                                 compute=compute)
    dtype = as_dtype(dtype)
    n = len(images)
    if n == 0:
        raise ValueError("images: expected a non-empty batch, got 0 images")
    chunks = list(extractor.chunks(n))
    digest = _check_and_digest(backbone, images, chunks)  # every image checked before any work
    first = backbone.check_images(images[:1])
    keys = [FeatureKey(node, t) for node in extractor.nodes for t in extractor.timesteps]
    info = {i.name: i for i in backbone.feature_info()}
    specs = {f"{k.node}@{k.timestep}": (dtype, info[k.node].shape(n, tuple(first.shape[2:]))) for k in keys}
    metadata = {"keys": [{"node": k.node, "timestep": k.timestep, "noise_level": backbone.noise_level(k.timestep),
                          "shape": list(specs[f"{k.node}@{k.timestep}"][1])} for k in keys],
                "noise": str(extractor.noise), "seed": extractor.seed, "backbone": _backbone_name(backbone)}
    if files is not None:
        if len(files) != n:
            raise ValueError(f"files: expected one name per image ({n}), got {len(files)}")
        metadata["files"] = list(files)
    if compute != ComputeOptions():  # the default adds nothing: files of the default settings are unchanged
        metadata["compute"] = compute.describe()
    fingerprint = {"code": feature_code_digest(), "backbone": backbone_identity(backbone),
                   "images": digest, "keys": list(specs), "noise": str(extractor.noise),
                   "seed": seed, "batch_size": batch_size, "dtype": str(dtype)}
    if compute != ComputeOptions():
        fingerprint["compute"] = compute.describe()
    rank, world_size, barrier = _process_group()
    stream = SafetensorsStream(_safetensors_name(out), specs, {"diffrep": json.dumps(metadata)}, fingerprint,
                               rank=rank, world_size=world_size, barrier=barrier)
    todo = [i for i in range(len(chunks)) if i % world_size == rank and i not in stream.done]
    try:
        from tqdm.auto import tqdm

        for i in tqdm(todo, desc="extract", unit="chunk", disable=not progress or rank != 0):
            features = extractor(backbone.check_images(images[chunks[i]]))
            for key in keys:
                stream.write_rows(f"{key.node}@{key.timestep}", chunks[i].start, features[key].to(dtype))
            stream.mark_done(i)
    except BaseException:
        stream.abort()
        raise
    return stream.close(len(chunks))


def _process_group() -> tuple[int, int, Any]:
    """(rank, world size, barrier) of the torch.distributed group when one is initialised (torchrun),
    else a single process: ranks take chunks i with i % world_size == rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None


def _check_and_digest(backbone: Backbone, images: Any, chunks: list[slice]) -> str:
    """Check every chunk of images for the backbone and digest their shape, dtype and values, one chunk in
    memory at a time (works on memory-mapped arrays)."""
    from ..digests import chunked_digest

    return chunked_digest(backbone.check_images(images[index]) for index in chunks)


def _safetensors_name(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")


def _backbone_name(backbone: Backbone) -> str:
    return backbone.config.provenance.get("recipe", {}).get("name", "unnamed")


def save_features(features: FeatureDict, out: str | os.PathLike, backbone_name: str = "unnamed") -> Path:
    """Write one ``.safetensors`` file (tensor names ``node@t``) with the FeatureDict metadata in its header."""
    tensors = {f"{k.node}@{k.timestep}": v.contiguous() for k, v in features.items()}
    metadata = {**features.metadata(), "backbone": backbone_name}
    out = _safetensors_name(out)
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata={"diffrep": json.dumps(metadata)})
    return out

"""Hugging Face Hub repository ids (``"google/ddpm-cifar10-32"``, ``"org/name@revision"``) as backbones.

``load_backbone("org/name")`` resolves the id through ``huggingface_hub.snapshot_download``: the files
come from the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, or ``cache_dir``) and are
downloaded into it only when a network is reachable and ``local_files_only`` is false. Offline
(``HF_HUB_OFFLINE=1``, or no network), a repository that is not in the cache is an error naming the
id, the revision and the cache folder. The snapshot folder is then read by the same code as a local
diffusers folder (:mod:`diffrep.backbones.diffusers_import`), so a hub model and its downloaded copy
give the same backbone.

Only the files a diffusers UNet2DModel pipeline needs are fetched (JSON configs, the U-Net and
scheduler folders, safetensors weights). Pickled ``.bin`` weights are not fetched: a repository that
holds only those loads as a local folder after a manual download (diffusers reads them with
``weights_only``), and through an id it fails with the "could not read the UNet weights" error.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError

#: ``owner/name`` with an optional ``@revision`` (branch, tag or commit), as on the Hub.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<revision>[\w./-]+))?$")

#: Files of a diffusers pipeline or model repository that diffrep reads.
ALLOW_PATTERNS = ["*.json", "unet/*.json", "unet/*.safetensors", "scheduler/*.json", "*.safetensors"]


@dataclass(frozen=True)
class HubId:
    """A parsed repository id: ``repo`` (``owner/name``) and an optional ``revision``."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"


def parse_hub_id(text: str) -> HubId | None:
    """The :class:`HubId` that ``text`` spells (``owner/name[@revision]``), or None if it is not one."""
    match = HUB_ID.match(str(text))
    if match is None or ".." in match["repo"]:
        return None
    return HubId(match["repo"], match["revision"])


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face cache folder that ``snapshot_download`` uses for ``cache_dir`` (None: the default)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_hub_id(hub_id: HubId | str, cache_dir: str | os.PathLike | None = None,
                   local_files_only: bool | None = None) -> Path:
    """The local snapshot folder of a Hub repository (downloaded into the cache if allowed and needed).

    Args:
        hub_id: ``owner/name[@revision]`` or a :class:`HubId`; the revision pins a branch, tag or commit.
        cache_dir: the Hugging Face cache folder (default: the one ``huggingface_hub`` is configured with).
        local_files_only: True reads the cache only; None follows ``HF_HUB_OFFLINE``.

    Raises:
        CheckpointError: the id is malformed, ``huggingface_hub`` is missing, or the repository (at that
            revision) is neither in the cache nor downloadable; the message names the id and the cache.
    """
    parsed = parse_hub_id(hub_id) if isinstance(hub_id, str) else hub_id
    if parsed is None:
        raise CheckpointError(f"{hub_id!r}: expected a Hugging Face repository id 'owner/name' or 'owner/name@revision'")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"{parsed}: loading a Hub repository needs huggingface_hub "
                              "(pip install 'diffrep[diffusers]')") from exc
    offline = constants.HF_HUB_OFFLINE if local_files_only is None else bool(local_files_only)
    cache = hub_cache_dir(cache_dir)
    try:
        folder = snapshot_download(parsed.repo, revision=parsed.revision, cache_dir=cache_dir,
                                   local_files_only=offline, allow_patterns=ALLOW_PATTERNS)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        where = "is not in the local cache" if offline else "could not be downloaded and is not in the local cache"
        raise CheckpointError(
            f"Hub repository {str(parsed)!r} {where} {cache}; download it on a machine with network "
            f"(huggingface-cli download {parsed.repo}"
            f"{'' if parsed.revision is None else ' --revision ' + parsed.revision}) and copy the cache, "
            f"or pass the downloaded folder ({type(exc).__name__}: {exc})") from exc
    return Path(folder)

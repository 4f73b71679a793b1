"""Hub repository ids: resolved through huggingface_hub's cache, offline, to the same backbone as the folder."""
from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("huggingface_hub")

from diffrep.backbones import load_backbone  # noqa: E402
from diffrep.backbones.checkpoint import CheckpointError  # noqa: E402
from diffrep.backbones.hub import HubId, parse_hub_id  # noqa: E402
from diffrep.cli import main  # noqa: E402

from .test_diffusers_import import _pipeline, _user_model  # noqa: E402

COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def _hub_cache(tmp_path, repo: str = "org/tiny-ddpm"):
    """A Hugging Face cache holding ``repo`` at two revisions (main and tag v1, different weights).

    The layout is huggingface_hub's: ``models--org--name/refs/<revision>`` holds a commit hash and
    ``snapshots/<hash>/`` the files. Returns the cache folder and each revision's source folder.
    """
    cache = tmp_path / "hf-cache"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    sources = {}
    for seed, (revision, commit) in enumerate(COMMITS.items()):
        model = _user_model()
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.conv_out.parameters():
                p.normal_(0, 0.1)
        sources[revision] = _pipeline(tmp_path / revision, model)
        shutil.copytree(sources[revision], repo_dir / "snapshots" / commit)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / revision).write_text(commit)
    return cache, sources


def _outputs(backbone) -> torch.Tensor:
    x = torch.rand(2, backbone.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return backbone.unet(x, torch.tensor([10, 500]))


@pytest.mark.parametrize("text, expected", [
    ("google/ddpm-cifar10-32", HubId("google/ddpm-cifar10-32")),
    ("org/name@v1.0", HubId("org/name", "v1.0")),
    ("org/name@" + "c" * 40, HubId("org/name", "c" * 40)),
    ("fmnist-ddpm", None), ("a/b/c", None), ("/abs/path", None), ("../up", None), ("./x/y", None),
    ("org/name@", None), ("", None),
])
def test_hub_ids_are_parsed_strictly(text, expected):
    assert parse_hub_id(text) == expected


@pytest.mark.parametrize("revision", ["main", "v1"])
def test_a_cached_hub_id_loads_the_same_backbone_as_its_folder(tmp_path, revision):
    cache, sources = _hub_cache(tmp_path)
    name = "org/tiny-ddpm" if revision == "main" else f"org/tiny-ddpm@{revision}"
    from_hub = load_backbone(name, cache_dir=cache, local_files_only=True)
    from_folder = load_backbone(sources[revision])
    assert torch.equal(_outputs(from_hub), _outputs(from_folder))
    other = load_backbone(sources["v1" if revision == "main" else "main"])
    assert not torch.allclose(_outputs(from_hub), _outputs(other))  # the revision pin picked its own weights
    assert from_hub.feature_info() == from_folder.feature_info()


@pytest.mark.parametrize("name", ["org/absent", "org/tiny-ddpm@no-such-tag"])
def test_an_uncached_hub_id_offline_names_the_id_and_the_cache(tmp_path, name):
    cache, _ = _hub_cache(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_backbone(name, cache_dir=cache, local_files_only=True)
    message = str(info.value)
    assert name in message and str(cache) in message and "not in the local cache" in message


def test_the_cli_reads_hub_ids_from_the_configured_cache(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    cache, _ = _hub_cache(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["nodes", "org/tiny-ddpm"]) == 0
    assert "mid" in capsys.readouterr().out
    assert main(["nodes", "org/absent"]) == 2
    err = capsys.readouterr().err
    assert "org/absent" in err and str(cache) in err and "Traceback" not in err

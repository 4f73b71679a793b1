"""The user's own image folders: reading (layout, labels, sizes), and `diffrep train` on a folder of PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffrep import load_backbone
from diffrep.cli import main
from diffrep.data.image_folder import load_image_folder


def _save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _tree(root: Path, size: int = 16) -> dict[str, np.ndarray]:
    """An ImageFolder tree: 8-bit and 16-bit grey PNGs and a JPEG in two classes, nested, and a hidden file."""
    rng = np.random.default_rng(0)
    arrays = {"cats/a.png": rng.integers(0, 256, (size, size), dtype=np.uint8),
              "cats/deep/b.png": (rng.integers(0, 65536, (size, size))).astype(np.uint16),
              "dogs/c.jpg": np.full((size, size), 200, np.uint8),
              "dogs/d.png": rng.integers(0, 256, (size, size), dtype=np.uint8)}
    for name, array in arrays.items():
        _save(root / name, array, **({"quality": 100} if name.endswith(".jpg") else {}))
    (root / "dogs" / ".DS_Store").write_bytes(b"finder")
    return arrays


def test_an_imagefolder_tree_gives_classes_labels_and_exact_values(tmp_path):
    arrays = _tree(tmp_path)
    found = load_image_folder(tmp_path, channels=1)
    assert found.files == ["cats/a.png", "cats/deep/b.png", "dogs/c.jpg", "dogs/d.png"]
    assert found.classes == ["cats", "dogs"] and found.labels.tolist() == [0, 0, 1, 1]
    assert found.images.shape == (4, 1, 16, 16) and found.images.dtype == torch.float32
    torch.testing.assert_close(found.images[0, 0], torch.from_numpy(arrays["cats/a.png"] / np.float32(255)))
    torch.testing.assert_close(found.images[1, 0], torch.from_numpy(arrays["cats/deep/b.png"] / np.float32(65535)))
    assert abs(float(found.images[2].mean()) - 200 / 255) < 2 / 255  # JPEG: lossy within a grey level or two
    assert found.describe()["images"] == 4 and len(found.digest) == 64


def test_a_flat_folder_has_no_labels_and_the_digest_follows_the_bytes(tmp_path):
    _save(tmp_path / "x.png", np.zeros((8, 8), np.uint8))
    _save(tmp_path / "y.png", np.ones((8, 8), np.uint8))
    first = load_image_folder(tmp_path, channels=1)
    assert first.classes is None and first.labels is None
    _save(tmp_path / "y.png", np.full((8, 8), 2, np.uint8))
    assert load_image_folder(tmp_path, channels=1).digest != first.digest


def test_mixed_sizes_are_refused_without_a_size_and_resized_with_one(tmp_path):
    _save(tmp_path / "small.png", np.full((8, 8), 255, np.uint8))
    _save(tmp_path / "large.png", np.full((32, 24), 255, np.uint8))
    with pytest.raises(ValueError, match=r"expected images of one size, got 32x24 \(e\.g\. large\.png\), 8x8"):
        load_image_folder(tmp_path, channels=1)
    found = load_image_folder(tmp_path, channels=1, size=16)
    assert found.images.shape == (2, 1, 16, 16) and found.resized == 2
    torch.testing.assert_close(found.images, torch.ones_like(found.images))  # a constant image stays constant


def test_rgb_images_for_an_rgb_unet(tmp_path):
    rgb = np.dstack([np.full((8, 8), v, np.uint8) for v in (10, 100, 250)])
    _save(tmp_path / "c.png", rgb)
    found = load_image_folder(tmp_path, channels=3)
    torch.testing.assert_close(found.images[0, :, 0, 0], torch.tensor([10, 100, 250]) / torch.tensor(255.0))
    with pytest.raises(ValueError, match=r"c\.png is RGB but the backbone takes 1 channel"):
        load_image_folder(tmp_path, channels=1)


def _recipe(tmp: Path, data: dict, in_channels: int = 1) -> str:
    recipe = {"name": "mine", "max_steps": 2, "checkpoint_every": 2, "log_every": 1, "sample_steps": 2,
              "eval_timesteps": [10, 500], "data": data,
              "backbone": {"unet": {"channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 8,
                                    "num_head_channels": 8, "in_channels": in_channels, "out_channels": in_channels}},
              "optim": {"batch_size": 2, "warmup_steps": 1}}
    (tmp / "mine.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp / "mine.yaml")


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
def test_diffrep_train_on_a_folder_of_pngs(channels, tmp_path):
    rng = np.random.default_rng(1)
    for i in range(12):  # two sizes: the recipe's size resizes them
        shape = (16, 16) if i % 2 else (20, 24)
        _save(tmp_path / "pngs" / f"{i:02d}.png", rng.integers(0, 256, shape + ((3,) if channels == 3 else ()),
                                                                   dtype=np.uint8))
    config = _recipe(tmp_path, {"dataset": "folder", "path": str(tmp_path / "pngs"), "size": 16}, channels)
    assert main(["train", "--config", config, "--out", str(tmp_path / "run")]) == 0
    backbone = load_backbone(tmp_path / "run" / "backbone")
    data = backbone.config.provenance["data"]
    assert data["dataset"] == "folder" and data["images"] == 12 and data["resized"] == 6
    assert data["train_images"] == 11 and len(data["heldout_files"]) == 1 and len(data["files_sha256"]) == 64
    assert backbone.in_channels == channels


def _class_tree(root: Path, per_class: int = 10, classes: tuple[str, ...] = ("bright", "dark")) -> None:
    rng = np.random.default_rng(2)
    for c, name in enumerate(classes):
        for i in range(per_class):
            base = 200 if name == "bright" else 40
            _save(root / name / f"{i:02d}.png", np.clip(base + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8))


def _probe_argv(tmp: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["probe", "--backbone", str(ckpt), "--timesteps", "10", "--nodes", "mid", "--quiet",
            "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "out"), "--val-fraction", "0.25", *extra]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    from diffrep.backbones import save_backbone

    from .conftest import make_backbone

    return save_backbone(make_backbone("2d-2level"), tmp_path / "ckpt")


def test_probe_on_an_imagefolder_tree_with_a_test_fraction(tmp_path, checkpoint):
    _class_tree(tmp_path / "train")
    assert main(_probe_argv(tmp_path, checkpoint, "--train-dir", str(tmp_path / "train"), "--test-fraction", "0.3")) == 0
    report = __import__("json").loads((tmp_path / "out" / "probe_folder.json").read_text())
    data = report["data"]
    assert data["classes"] == ["bright", "dark"] and data["n_train"] == 14 and data["n_test"] == 6
    assert sorted(Path(f).parts[0] for f in data["test_files"]) == ["bright"] * 3 + ["dark"] * 3  # stratified
    assert report["choices"]["single"]["test_acc"] == 1.0  # bright vs dark is trivially separable


def test_probe_with_a_test_tree_matches_classes_by_name(tmp_path, checkpoint):
    _class_tree(tmp_path / "train")
    _class_tree(tmp_path / "test", per_class=3, classes=("dark",))  # one class only: index 1 of the train tree
    assert main(_probe_argv(tmp_path, checkpoint, "--train-dir", str(tmp_path / "train"),
                            "--test-dir", str(tmp_path / "test"))) == 0
    report = __import__("json").loads((tmp_path / "out" / "probe_folder.json").read_text())
    assert report["data"]["n_test"] == 3 and report["choices"]["single"]["test_acc"] == 1.0
    _class_tree(tmp_path / "other", per_class=3, classes=("cats",))
    assert main(_probe_argv(tmp_path, checkpoint, "--train-dir", str(tmp_path / "train"),
                            "--test-dir", str(tmp_path / "other"))) == 2


@pytest.mark.parametrize("extra, match", [
    ((), r"expected either --dataset or --train-dir"),
    (("--dataset", "fmnist", "--train-dir", "x"), r"expected either --dataset or --train-dir"),
    (("--dataset", "fmnist", "--test-dir", "x"), r"--test-dir: expected it together with --train-dir"),
    (("--train-dir", "FLAT"), r"expected an ImageFolder tree \(one subfolder per class"),
])
def test_probe_folder_arguments_are_checked(extra, match, tmp_path, checkpoint, capsys):
    _save(tmp_path / "flat" / "a.png", np.zeros((16, 16), np.uint8))
    extra = tuple(str(tmp_path / "flat") if e == "FLAT" else e for e in extra)
    assert main(_probe_argv(tmp_path, checkpoint, *extra)) == 2
    assert __import__("re").search(match, capsys.readouterr().err)


def test_the_readme_recipe_for_your_own_images_trains(tmp_path):
    """The recipe of README's "Your own data" section, as written (only the folder and step count changed)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("cat > mine.yaml <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    recipe = yaml.safe_load(block)
    assert recipe["data"]["dataset"] == "folder" and recipe["data"]["path"] == "my_images"
    rng = np.random.default_rng(3)
    for i in range(6):
        _save(tmp_path / "my_images" / f"{i}.png", rng.integers(0, 256, (40, 40), dtype=np.uint8))
    recipe["data"]["path"] = str(tmp_path / "my_images")
    recipe.update(max_steps=2, checkpoint_every=2, log_every=1, sample_steps=2)
    recipe["optim"] = {"batch_size": 2, "warmup_steps": 1}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", str(tmp_path / "mine.yaml"), "--out", str(tmp_path / "runs" / "mine")]) == 0
    assert load_backbone(tmp_path / "runs" / "mine" / "backbone").config.provenance["data"]["resized"] == 6

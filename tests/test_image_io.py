"""Reading image inputs (issue 11): PNG/JPEG/TIFF folders at 8 and 16 bits, grey or RGB, and refusals."""
from __future__ import annotations

import json

import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffrep.backbones import Backbone, BackboneConfig
from diffrep.errors import check_data_range
from diffrep.features.io import read_images

from .conftest import TINY_CONFIGS, make_backbone


def _rgb_backbone() -> Backbone:
    unet = TINY_CONFIGS["2d-2level"]
    return Backbone(BackboneConfig(unet=type(unet)(**{**unet.__dict__, "in_channels": 3, "out_channels": 3})))


def _ramp(bits: int) -> np.ndarray:
    top = 2**bits - 1
    return np.linspace(0, top, 16 * 16).round().astype(np.uint16 if bits == 16 else np.uint8).reshape(16, 16)


def test_16bit_png_and_tiff_are_scaled_by_their_bit_depth_not_clipped(tmp_path):
    ramp = _ramp(16)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    Image.fromarray(ramp).save(tmp_path / "b.tif")
    images = read_images(tmp_path, make_backbone())
    assert images.shape == (2, 1, 16, 16)
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535)
    for i in range(2):
        torch.testing.assert_close(images[i, 0], expected)
    assert float((images == 1.0).float().mean()) < 0.01  # the bug: 94% of pixels saturated at 1.0


def test_8bit_png_jpeg_and_tiff_in_one_folder_are_all_read(tmp_path):
    ramp = _ramp(8)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    Image.fromarray(ramp).save(tmp_path / "b.jpg", quality=100)
    Image.fromarray(ramp).save(tmp_path / "c.tiff")
    images = read_images(tmp_path, make_backbone())
    assert images.shape[0] == 3
    torch.testing.assert_close(images[0, 0], torch.from_numpy(ramp / 255.0).float())
    torch.testing.assert_close(images[2, 0], images[0, 0])
    assert float((images[1] - images[0]).abs().max()) < 0.05  # JPEG is lossy, but on the same scale


def test_rgb_images_for_a_three_channel_model_keep_their_colours(tmp_path):
    rgb = np.stack([_ramp(8), _ramp(8)[::-1], np.full((16, 16), 7, np.uint8)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    images = read_images(tmp_path, _rgb_backbone())
    torch.testing.assert_close(images[0], torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0).float())


def test_channel_mismatch_is_an_error_naming_the_file(tmp_path):
    rgb = np.stack([_ramp(8), _ramp(8)[::-1], _ramp(8)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match=r"colour\.png is RGB but the backbone takes 1 channel"):
        read_images(tmp_path, make_backbone())
    grey_dir = tmp_path / "grey"
    grey_dir.mkdir()
    Image.fromarray(_ramp(8)).save(grey_dir / "g.png")
    with pytest.raises(ValueError, match=r"g\.png is grey but the backbone takes 3 channel"):
        read_images(grey_dir, _rgb_backbone())


def test_rgb_file_with_identical_channels_is_grey(tmp_path):
    from diffrep.features.io import read_image_file

    grey = _ramp(8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "a.png")
    torch.testing.assert_close(read_image_file(tmp_path / "a.png", 1)[0], grey / np.float32(255))


def test_other_files_in_the_folder_are_listed_not_dropped(tmp_path):
    Image.fromarray(_ramp(8)).save(tmp_path / "a.png")
    Image.fromarray(_ramp(8)).save(tmp_path / "b.bmp")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"2 entries that are not .*\['b\.bmp', 'notes\.txt'\]"):
        read_images(tmp_path, make_backbone())


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_image_is_an_error_naming_the_file(tmp_path, damage):
    Image.fromarray(_ramp(8)).save(tmp_path / "ok.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "bad.png")
    data = (tmp_path / "bad.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a png at all")
    with pytest.raises(ValueError, match=r"bad\.png is not a readable image"):
        read_images(tmp_path, make_backbone())


def test_empty_folder_and_mixed_sizes(tmp_path):
    with pytest.raises(ValueError, match="found none"):
        read_images(tmp_path, make_backbone())
    Image.fromarray(_ramp(8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"one size .*16x16 \(e\.g\. a\.png\), 8x8 \(e\.g\. b\.png\)"):
        read_images(tmp_path, make_backbone())


def test_float_images_far_outside_the_data_range_are_refused(tmp_path):
    backbone = make_backbone()
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x255.npy", (rng.random((2, 16, 16)) * 255).astype(np.float32))
    with pytest.raises(ValueError, match=r"x255\.npy: values span .*data range \[0, 1\].*Backbone\.normalise"):
        backbone.check_images(read_images(tmp_path / "x255.npy", backbone), name=str(tmp_path / "x255.npy"))
    with pytest.raises(ValueError, match=r"data range \[0, 1\]"):  # the library refuses the same way
        backbone.check_images(torch.rand(2, 1, 16, 16) * 255)
    with pytest.raises(ValueError, match=r"data range \[0, 1\]"):  # [-1, 1] data for a [0, 1] model
        backbone.check_images(torch.rand(2, 1, 16, 16) * 2 - 1)
    noisy = np.clip(rng.random((2, 16, 16)) + rng.normal(0, 0.1, (2, 16, 16)), -0.3, 1.3).astype(np.float32)
    np.save(tmp_path / "noisy.npy", noisy)
    assert backbone.check_images(read_images(tmp_path / "noisy.npy", backbone)).shape == (2, 1, 16, 16)  # accepted


def test_data_range_tolerance_is_half_the_range_width():
    check_data_range(torch.tensor([-0.5, 1.5]), 0.0, 1.0)
    check_data_range(torch.tensor([-4.0, 4.0]), -2.0, 2.0)
    for bad in ([-0.51, 1.0], [0.0, 1.51]):
        with pytest.raises(ValueError, match=r"accepted are values in \[-0.5, 1.5\]"):
            check_data_range(torch.tensor(bad), 0.0, 1.0)


def test_npy_of_the_wrong_rank_names_the_file(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 16), np.float32))
    with pytest.raises(ValueError, match=r"flat\.npy: expected a tensor of rank 4"):
        make_backbone().check_images(read_images(tmp_path / "flat.npy", make_backbone()), name="flat.npy")


def test_trained_image_size_is_read_from_provenance():
    from diffrep.backbones.checkpoint import read_config
    from diffrep.backbones.zoo import ZOO_DIR

    config = BackboneConfig(unet=TINY_CONFIGS["2d-2level"])
    assert config.trained_image_size() is None
    for provenance, size in [({"data": {"dataset": "mni152-2009a-axial", "size": 64}}, (64, 64)),
                             ({"data": {"dataset": "fashion-mnist", "pad_to": None}}, (28, 28)),
                             ({"data": {"dataset": "fashion-mnist", "pad_to": 32}}, (32, 32)),
                             ({"image_size": [24, 16], "data": {"size": 64}}, (24, 16))]:
        config.provenance = provenance
        assert config.trained_image_size() == size, provenance
    if (ZOO_DIR / "brain-ddpm").is_dir():
        assert read_config(ZOO_DIR / "brain-ddpm").trained_image_size() == (64, 64)
        assert read_config(ZOO_DIR / "fmnist-ddpm").trained_image_size() == (28, 28)


def test_other_image_size_warns_in_the_library(recwarn):
    from diffrep.backbones.backbone import ImageSizeWarning

    backbone = make_backbone()
    backbone.check_images(torch.rand(1, 1, 32, 32))  # no recorded size: nothing to compare with
    assert not [w for w in recwarn if issubclass(w.category, ImageSizeWarning)]
    backbone.config.provenance = {"image_size": 16}
    backbone.check_images(torch.rand(1, 1, 16, 16))
    assert not [w for w in recwarn if issubclass(w.category, ImageSizeWarning)]
    with pytest.warns(ImageSizeWarning, match=r"\(32, 32\) differs from the size this backbone was trained on \(16, 16\)"):
        backbone.check_images(torch.rand(1, 1, 32, 32))


def test_extract_cli_refuses_another_size_unless_allowed(tmp_path, capsys):
    from diffrep.backbones import save_backbone
    from diffrep.cli import main

    backbone = make_backbone()
    backbone.config.provenance = {"image_size": 16}
    save_backbone(backbone, tmp_path / "ckpt")
    np.save(tmp_path / "big.npy", np.random.default_rng(0).random((2, 32, 32)).astype(np.float32))
    argv = ["extract", str(tmp_path / "ckpt"), str(tmp_path / "big.npy"), "--nodes", "mid", "--timesteps", "3",
            "--out", str(tmp_path / "f.safetensors")]
    assert main(argv) == 2
    assert re.search(r"big\.npy: spatial size \(32, 32\) differs .* \(16, 16\).*--allow-other-size", capsys.readouterr().err)
    assert not (tmp_path / "f.safetensors").exists()
    with pytest.warns(UserWarning, match="differs from the size"):
        assert main(argv + ["--allow-other-size"]) == 0
    assert (tmp_path / "f.safetensors").is_file()


def test_extract_cli_reads_a_16bit_png_folder(tmp_path):
    from safetensors.torch import load_file

    from diffrep.backbones import save_backbone
    from diffrep.cli import main
    from diffrep.features import FeatureExtractor

    backbone = make_backbone()
    save_backbone(backbone, tmp_path / "ckpt")
    (tmp_path / "png").mkdir()
    Image.fromarray(_ramp(16)).save(tmp_path / "png" / "b.png")
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(tmp_path / "png" / "a.png")
    assert main(["extract", str(tmp_path / "ckpt"), str(tmp_path / "png"), "--nodes", "mid", "--timesteps", "3",
                 "--out", str(tmp_path / "f.safetensors")]) == 0
    expected = FeatureExtractor(backbone, ["mid"], [3])(torch.from_numpy(_ramp(16) / np.float32(65535))[None, None])
    torch.testing.assert_close(load_file(tmp_path / "f.safetensors")["mid@3"][1:], expected[("mid", 3)])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f.safetensors"), "pt") as handle:  # every row names its file, in row order
        assert json.loads(handle.metadata()["diffrep"])["files"] == ["a.png", "b.png"]


def test_16bit_rgb_png_is_scaled_by_its_bit_depth(tmp_path):
    """Pillow has no 48-bit writer, so the PNG is encoded by hand (IHDR bit depth 16, colour type 2)."""
    import struct
    import zlib

    from diffrep.features.io import read_image_file

    pixels = (np.arange(4 * 4 * 3).reshape(4, 4, 3) * 1300).astype(">u2")
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
                                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    got = read_image_file(tmp_path / "rgb16.png", 3).transpose(1, 2, 0)
    np.testing.assert_allclose(got, pixels.astype(np.float32) / 65535, atol=1 / 255)  # Pillow keeps 8 bits

"""Importing other users' MONAI DiffusionModelUNets: live modules and state-dict files."""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from diffrep.backbones import CheckpointError
from diffrep.backbones.monai_import import from_monai_unet, import_monai_state_dict, infer_unet_config

from .conftest import informative_init_

ARCH = dict(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
            num_res_blocks=1, norm_num_groups=8, num_head_channels=8)


def _user_unet(**overrides) -> DiffusionModelUNet:
    torch.manual_seed(3)
    unet = DiffusionModelUNet(**{**ARCH, **overrides})
    # MONAI zero-initialises the output conv and every residual branch's last conv: re-initialise them all,
    # so that a weight imported into the wrong place changes the output
    return informative_init_(unet).eval()


@pytest.mark.parametrize("overrides", [{}, {"spatial_dims": 3}, {"resblock_updown": True}])
def test_wrapped_unet_gives_the_same_outputs(overrides):
    unet = _user_unet(**overrides)
    backbone = from_monai_unet(unet)
    spatial = (8, 8, 8) if overrides.get("spatial_dims") == 3 else (8, 8)
    x, t = torch.randn(2, 1, *spatial), torch.tensor([5, 700])
    with torch.no_grad():
        assert torch.equal(unet(x, t), backbone(x, t))
    assert infer_unet_config(unet).resblock_updown == overrides.get("resblock_updown", False)


def test_import_state_dict_file(tmp_path):
    unet = _user_unet()
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    backbone = import_monai_state_dict(tmp_path / "unet.pt", {"unet": dict(ARCH), "schedule": {"schedule": "cosine"}})
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(unet(x, t), backbone(x, t))
    assert backbone.config.schedule.schedule == "cosine"


def test_import_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        import_monai_state_dict(tmp_path / "none.pt", {"unet": dict(ARCH)})
    torch.save(_user_unet().state_dict(), tmp_path / "unet.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        import_monai_state_dict(tmp_path / "unet.pt", {"unet": {**ARCH, "channels": (8, 24)}})
    with pytest.raises(ValueError, match="unknown key"):
        import_monai_state_dict(tmp_path / "unet.pt", {"unet": dict(ARCH), "sched": {}})
    with pytest.raises(TypeError, match="DiffusionModelUNet"):
        from_monai_unet(torch.nn.Linear(2, 2))


def test_import_cli(tmp_path):
    import yaml

    from diffrep import load_backbone
    from diffrep.cli import main

    unet = _user_unet()
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    arch = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items()}}
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(arch))
    assert main(["import-monai", str(tmp_path / "unet.pt"), "--arch", str(tmp_path / "arch.yaml"),
                 "--out", str(tmp_path / "ckpt")]) == 0
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(load_backbone(tmp_path / "ckpt")(x, t), unet(x, t))


def test_omitted_arguments_take_monais_defaults_and_reproduce_the_model(tmp_path, capsys):
    """A user model built with MONAI's defaults (norm_num_groups=32, num_head_channels=8, two res
    blocks...) and an arch.yaml naming only the required arguments: the import reproduces it exactly."""
    import yaml

    from diffrep import load_backbone
    from diffrep.cli import main

    from .conftest import informative_init_

    torch.manual_seed(5)
    user = informative_init_(DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1,
                                                channels=(32, 64, 64, 64))).eval()
    torch.save(user.state_dict(), tmp_path / "unet.pt")
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump({"unet": {"spatial_dims": 2, "in_channels": 1,
                                                                 "out_channels": 1}}))
    assert main(["import-monai", str(tmp_path / "unet.pt"), "--arch", str(tmp_path / "arch.yaml"),
                 "--out", str(tmp_path / "ckpt")]) == 0, capsys.readouterr().err
    imported = load_backbone(tmp_path / "ckpt")
    assert imported.config.unet.norm_num_groups == 32 and imported.config.unet.num_head_channels == 8
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 600])
    with torch.no_grad():
        assert torch.equal(imported(x, t), user(x, t))


def test_import_refuses_what_it_cannot_reproduce(tmp_path):
    torch.save(_user_unet().state_dict(), tmp_path / "unet.pt")
    with pytest.raises(ValueError, match=r"unknown DiffusionModelUNet argument\(s\) \['channel'\]"):
        import_monai_state_dict(tmp_path / "unet.pt", {"unet": {**ARCH, "channel": (8, 16)}})
    with pytest.raises(ValueError, match=r"missing required DiffusionModelUNet argument\(s\) \['in_channels'\]"):
        import_monai_state_dict(tmp_path / "unet.pt", {"unet": {k: v for k, v in ARCH.items() if k != "in_channels"}})
    with pytest.raises(ValueError, match=r"got \{'norm_eps': 1e-05\}; such a model cannot be reproduced"):
        import_monai_state_dict(tmp_path / "unet.pt", {"unet": {**ARCH, "norm_eps": 1e-5}})
    import_monai_state_dict(tmp_path / "unet.pt", {"unet": {**ARCH, "norm_eps": 1e-6}})  # MONAI's default: fine
    with pytest.raises(CheckpointError, match=r"unet\.pt does not match its config: .*missing key"):
        import_monai_state_dict(tmp_path / "unet.pt", {"unet": {**ARCH, "num_res_blocks": 2}})

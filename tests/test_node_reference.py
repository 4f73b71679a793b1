"""Per-node reference: every node the extractor returns equals a forward written out by hand.

The reference below walks the U-Net's submodules in the order MONAI's ``DiffusionModelUNet.forward``
(and diffusers' ``UNet2DModel.forward``) uses them: time embedding, ``conv_in``, each down block's
resnets / attentions and downsampler (keeping the skip connections), the middle block, each up block
(skips concatenated before each resnet) and its upsampler, then the output head. It records each
node at the place the node table documents (``down.i``: before the downsampler; ``up.i``: after the
upsampler). The reference is first checked against the U-Net's own output, then every node of the
extractor is compared with it, so a hook on the wrong module of a block (same shape, other values)
is caught. The fixtures' U-Nets have no zero-initialised layers (see conftest.make_backbone), so
neighbouring modules of a block really differ.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffrep import FeatureExtractor, FeatureKey

from .conftest import TINY_CONFIGS, make_backbone, make_images

TIMESTEPS = [0, 250]
TOLERANCE = dict(atol=1e-5, rtol=1e-5)  # the extractor's stated tolerance across different batching


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Ho et al.'s timestep embedding as MONAI writes it: [cos(t f), sin(t f)], f = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def monai_reference(unet, x: torch.Tensor, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every node of a MONAI DiffusionModelUNet, and its output, by a forward through its submodules."""
    emb = unet.time_embed(sinusoidal_embedding(t, unet.block_out_channels[0]))
    h = unet.conv_in(x)
    skips, nodes = [h], {}
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions):
            h = resnet(h, emb)
            if attention is not None:
                h = attention(h)
            skips.append(h)
        nodes[f"down.{i}"] = h
        if block.downsampler is not None:
            h = block.downsampler(h, emb)
            skips.append(h)
    mid = unet.middle_block
    h = mid.resnet_2(mid.attention(mid.resnet_1(h, emb)), emb)
    nodes["mid"] = h
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if attention is not None:
                h = attention(h)
        if block.upsampler is not None:
            h = block.upsampler(h, emb)
        nodes[f"up.{i}"] = h
    assert not skips, "every skip connection is used once"
    return nodes, unet.out(h)


def diffusers_reference(model, x: torch.Tensor, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every node of a diffusers UNet2DModel (conv down/upsamplers), and its output, submodule by submodule."""
    emb = model.time_embedding(model.time_proj(t))
    h = model.conv_in(x)
    skips, nodes = [h], {}
    for i, block in enumerate(model.down_blocks):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions):
            h = resnet(h, emb)
            if attention is not None:
                h = attention(h)
            skips.append(h)
        nodes[f"down.{i}"] = h
        for downsampler in block.downsamplers or []:
            h = downsampler(h)
            skips.append(h)
    mid = model.mid_block
    h = mid.resnets[0](h, emb)
    for attention, resnet in zip(mid.attentions, mid.resnets[1:]):
        h = resnet(h if attention is None else attention(h, temb=emb), emb)
    nodes["mid"] = h
    for i, block in enumerate(model.up_blocks):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if attention is not None:
                h = attention(h)
        for upsampler in block.upsamplers or []:
            h = upsampler(h)
        nodes[f"up.{i}"] = h
    assert not skips, "every skip connection is used once"
    return nodes, model.conv_out(model.conv_act(model.conv_norm_out(h)))


def mismatched_nodes(backbone, images: torch.Tensor, reference) -> list[str]:
    """Nodes whose extracted features (noise="none", every node, TIMESTEPS) differ from ``reference``'s."""
    features = FeatureExtractor(backbone, backbone.node_names, TIMESTEPS, noise="none", early_exit=False)(images)
    x = backbone.to_model_range(images)
    wrong = []
    for step in TIMESTEPS:
        t = torch.full((x.shape[0],), step, dtype=torch.long)
        with torch.no_grad():
            nodes, out = reference(x, t)
            torch.testing.assert_close(out, backbone(x, t), **TOLERANCE)  # the reference is the U-Net's forward
        assert sorted(nodes) == sorted(backbone.node_names)
        for name, expected in nodes.items():
            value = features[FeatureKey(name, step)]
            if value.shape != expected.shape or not torch.allclose(value, expected, **TOLERANCE):
                wrong.append(name)
    return sorted(set(wrong))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_every_node_equals_the_manual_forward(name):
    backbone = make_backbone(name)
    images = make_images(backbone, n=2)
    assert mismatched_nodes(backbone, images, lambda x, t: monai_reference(backbone.unet, x, t)) == []


@pytest.mark.parametrize("name, node, wrong_module", [
    ("2d-3level-attn", "down.1", lambda unet: unet.down_blocks[1].resnets[0]),  # first of two resnets
    ("2d-3level-attn", "down.2", lambda unet: unet.down_blocks[2].resnets[-1]),  # the resnet before the attention
    ("3d-2level", "down.0", lambda unet: unet.conv_in),  # the block's input, not its output
])
def test_a_hook_on_another_module_of_the_same_shape_is_detected(name, node, wrong_module, monkeypatch):
    backbone = make_backbone(name)
    images = make_images(backbone, n=2)
    module = wrong_module(backbone.unet)
    assert module is not backbone.node_module(node)
    monkeypatch.setitem(backbone._modules, node, module)  # a node table pointing one module off
    assert mismatched_nodes(backbone, images, lambda x, t: monai_reference(backbone.unet, x, t)) == [node]


@pytest.mark.parametrize("layout", ["no-attention", "attention"])
def test_diffusers_nodes_equal_the_manual_forward(tmp_path, layout, monkeypatch):
    from diffrep import load_backbone

    from .test_diffusers_import import _pipeline, _user_model  # skips when diffusers is not installed

    backbone = load_backbone(_pipeline(tmp_path, _user_model(layout, layers_per_block=2)))
    model = backbone.unet.model
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert mismatched_nodes(backbone, images, lambda x, t: diffusers_reference(model, x, t)) == []
    monkeypatch.setitem(backbone._modules, "down.0", model.down_blocks[0].resnets[0])  # first of two resnets
    assert mismatched_nodes(backbone, images, lambda x, t: diffusers_reference(model, x, t)) == ["down.0"]


def test_feature_info_names_the_module_read_and_a_wrong_table_is_refused_at_construction(monkeypatch):
    """Each FeatureInfo carries its module path (the module hooked for that node); a node table whose
    promise does not match the network (shape of the dry run) is refused when the backbone is built."""
    from diffrep.backbones import Backbone, BackboneConfig
    from diffrep.backbones import backbone as backbone_module

    backbone = make_backbone("2d-3level-attn")
    for info in backbone.feature_info():
        assert backbone.node_module(info.name) is backbone.unet.get_submodule(info.module)
    assert backbone.feature_info()[2].module == "down_blocks.2.attentions.1"  # attention level: its last attention

    original = backbone_module.monai_node_table

    def off_by_one_level(unet, channels):
        table = original(unet, channels)
        table[1] = dataclasses.replace(table[1], module="down_blocks.0.resnets.0")  # stride 1, not 2
        return table

    monkeypatch.setattr(backbone_module, "monai_node_table", off_by_one_level)
    with pytest.raises(ValueError, match=r"down\.1 \(down_blocks\.0\.resnets\.0\): got \(1, 8, 8, 8\), expected \(1, 16, 4, 4\)"):
        Backbone(BackboneConfig(unet=TINY_CONFIGS["2d-3level-attn"]))

"""U-Net backbones: a denoising U-Net with its noise schedule, normalisation and named feature nodes.

Lives here: the Backbone (MONAI DiffusionModelUNet, 2D/3D) and its node table, the diffusers
UNet2DModel adapter, MONAI state-dict import, checkpoint I/O (config.json + model.safetensors) and the
zoo of shipped defaults. May import only the shared helpers (_atomic, _types, config, diffusion,
errors); everything else in diffrep may import it.
"""
from .backbone import Backbone, build_unet
from .checkpoint import CheckpointError, load_checkpoint, save_backbone
from .diffusers_import import DiffusersUNet, load_diffusers_unet
from .monai_import import from_monai_unet, import_monai_state_dict
from .config import BackboneConfig, Normalisation, ScheduleConfig, UNetConfig
from .zoo import load_backbone, zoo_entries, zoo_names

__all__ = [
    "Backbone", "BackboneConfig", "CheckpointError", "DiffusersUNet", "load_diffusers_unet", "Normalisation", "ScheduleConfig", "UNetConfig",
    "build_unet", "from_monai_unet", "import_monai_state_dict", "load_backbone", "load_checkpoint", "save_backbone", "zoo_entries", "zoo_names",
]

"""The denoising-autoencoder baseline of Kascenas et al. (MIDL 2022, "Denoising autoencoders for
unsupervised anomaly detection in brain MRI"; MedIA 2023, "The role of noise in denoising models
for anomaly detection in medical images").

A 2D U-Net (MONAI ``UNet``) learns to remove *coarse* noise (N(0, 0.2^2) drawn on a 16 x 16 grid,
upsampled bilinearly, randomly rolled, foreground only) from healthy images with an L2 loss. At test
time one forward pass reconstructs the image; the anomaly map is |x - DAE(x)| (one network call per
slice). The reference recipe post-processes with an eroded brain mask and a 5 x 5 median filter
(``erode``, ``median``).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data.augment import Augment, brain_augment  # noqa: F401  (re-exported by diffrep.anomaly)
from ..errors import as_float_images, check_positive_int
from .base import AnomalyScorer
from .postprocess import check_masks


class DAEScorer(AnomalyScorer):
    """Coarse-noise denoising autoencoder; ``fit`` trains it, ``score`` = |x - DAE(x)|.

    Args:
        model: an image-to-image module to train (None = a MONAI UNet built from the next arguments;
            only such a model can be saved).
        channels, strides, num_res_units: MONAI ``UNet`` architecture (2D, in = out = ``in_channels``).
        noise_resolution, noise_std: the coarse noise (Kascenas et al.: 16 x 16, std 0.2).
        erode, median, top_fraction, batch_size: see AnomalyScorer (``batch_size``: images per scoring
            forward). device: where the model runs.
        steps, train_batch_size, lr: training steps, images per training batch, Adam learning rate.
        seed: the initial weights, the batches, the noise and the augmentation seeds all derive from it.
        augment: ``augment(images, masks, seed) -> (images, masks)`` run per training batch (see
            :func:`brain_augment`), or None. A saved scorer records whether one was used
            (``training_["augment"]``) but not the callable itself: it is saved as None.
        progress: a tqdm bar while training.

    ``save`` / :func:`diffrep.persistence.save_fitted` writes ``config.json`` + ``state.safetensors``;
    ``DAEScorer.load`` also reads the earlier ``config.json`` + ``model.safetensors`` folders.
    """

    _fitted_attribute = "model_"

    def __init__(self, model: nn.Module | None = None, channels: Sequence[int] = (32, 64, 128, 256),
                 strides: Sequence[int] = (2, 2, 2), num_res_units: int = 2, in_channels: int = 1,
                 noise_resolution: int = 16, noise_std: float = 0.2, erode: int = 0, median: int = 0,
                 top_fraction: float = 0.01, batch_size: int = 32, device: str = "cpu", steps: int = 1000,
                 train_batch_size: int = 16, lr: float = 1e-4, seed: int = 0, augment: Augment | None = None,
                 progress: bool = True) -> None:
        self.model = model
        self.channels = channels
        self.strides = strides
        self.num_res_units = num_res_units
        self.in_channels = in_channels
        self.noise_resolution = noise_resolution
        self.noise_std = noise_std
        self.erode = erode
        self.median = median
        self.top_fraction = top_fraction
        self.batch_size = batch_size
        self.device = device
        self.steps = steps
        self.train_batch_size = train_batch_size
        self.lr = lr
        self.seed = seed
        self.augment = augment
        self.progress = progress

    def build_model(self) -> nn.Module:
        """The MONAI 2D UNet described by this scorer's architecture arguments."""
        from monai.networks.nets import UNet

        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides: expected len(channels) - 1 = {len(self.channels) - 1} entries, got {len(self.strides)}")
        return UNet(spatial_dims=2, in_channels=self.in_channels, out_channels=self.in_channels,
                    channels=tuple(self.channels), strides=tuple(self.strides), num_res_units=self.num_res_units)

    @property
    def unet_calls_per_image(self) -> int:
        """One forward pass per image."""
        return 1

    def _check_images(self, images: Any) -> torch.Tensor:
        x = as_float_images(images, in_channels=self.in_channels, spatial_dims=2)
        multiple = int(np.prod(self.strides)) if self.model is None else 1
        if any(s % multiple for s in x.shape[2:]):
            raise ValueError(f"images: expected spatial sizes divisible by {multiple} (product of strides), "
                             f"got {tuple(x.shape[2:])}")
        return x

    # ------------------------------------------------------------------- train
    def fit(self, healthy_images: Any, masks: Any = None) -> "DAEScorer":
        """Train the DAE on healthy images with the L2 loss ||DAE(x + n) - x||^2, n coarse noise.

        The noise is applied inside ``masks`` only (foreground) when masks are given. The training
        settings (``steps``, ``train_batch_size``, ``lr``, ``seed``, ``augment``) are ``__init__`` arguments.
        """
        from tqdm.auto import tqdm

        from ..noise import make_noise

        self._validate()
        steps = check_positive_int(self.steps, "steps")
        batch_size = check_positive_int(self.train_batch_size, "train_batch_size")
        seed, lr, augment, progress = self.seed, self.lr, self.augment, self.progress
        x = self._check_images(healthy_images)
        m = check_masks(masks, tuple(x.shape))
        m = torch.from_numpy(m)[:, None].float() if m is not None else torch.ones_like(x[:, :1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = self.build_model() if self.model is None else copy.deepcopy(self.model)
        model.to(self.device).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(int(seed))
        history = []
        for step in tqdm(range(steps), desc="DAE training", disable=not progress):
            index = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
            xb, mb = x[index], m[index]
            if augment is not None:
                xb, mb = augment(xb, mb, int(seed) * 1_000_003 + step)
            noise = make_noise("coarse", tuple(xb.shape), generator=generator, resolution=int(self.noise_resolution),
                               std=float(self.noise_std)) * mb
            xb = xb.to(self.device)
            loss = torch.nn.functional.mse_loss(model(xb + noise.to(self.device)), xb)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            history.append(float(loss.detach()))
        self.model_ = model.eval()
        self.loss_history_ = history
        self.training_ = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": int(seed),
                          "augment": augment is not None, "images": int(x.shape[0]), "final_loss": history[-1]}
        return self

    # ------------------------------------------------------------------- score
    @torch.inference_mode()
    def _raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        return (x - self.model_(x)).abs().mean(dim=1)

    # ---------------------------------------------------------------------- io
    def _saved_params(self) -> dict[str, Any]:
        """The parameters to save: a custom ``model`` cannot be (its architecture is unknown); a custom
        ``augment`` callable is saved as None (``training_`` records that one was used)."""
        if self.model is not None:
            raise ValueError("DAEScorer.save: only a model built from channels/strides/num_res_units can be saved "
                             "(its architecture goes into config.json); got a custom model")
        return dict(self.get_params(deep=False), augment=None)

    def _fitted_state(self) -> dict[str, Any]:
        """The trained weights, the loss per step and the training record."""
        self._require_fitted()
        return {"model_": dict(self.model_.state_dict()), "loss_history_": list(self.loss_history_),
                "training_": self.training_}

    def _set_fitted_state(self, state: dict[str, Any]) -> None:
        model = self.build_model()
        model.load_state_dict(state["model_"])
        self.model_ = model.to(self.device).eval()
        self.loss_history_ = list(state.get("loss_history_", []))
        self.training_ = state.get("training_")

    @classmethod
    def load(cls, directory: str | os.PathLike, backbone: Any = None, device: str = "cpu", **params: Any) -> "DAEScorer":
        """A trained DAEScorer saved by :meth:`save` (no pickle), or by diffrep's earlier DAE format
        (``config.json`` of format ``diffrep-dae`` + ``model.safetensors``)."""
        from .._legacy_formats import LEGACY_DAE_FORMAT, load_legacy_dae
        from ..persistence import load_fitted, read_config

        if read_config(directory).get("format") == LEGACY_DAE_FORMAT:
            return load_legacy_dae(cls, Path(directory), device)
        return load_fitted(directory, backbone=backbone, expected=cls, params={"device": device, **params})

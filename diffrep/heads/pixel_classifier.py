"""PixelClassifier: an ensemble of small pixel MLPs over diffusion-feature pixel descriptors.

Baranchuk et al. (ICLR 2022, "Label-efficient semantic segmentation with diffusion models") and
datasetGAN (Zhang et al., CVPR 2021) classify each pixel's descriptor with an ensemble of 10 MLPs
``d -> 128 -> 32 -> C`` (Linear, ReLU, BatchNorm; weights N(0, 0.02)), Adam lr 1e-3, batch 64
pixels, cross-entropy, and predict by majority vote. Differences here, all deliberate:

* training pixels come from a :class:`~diffrep.features.pixel_store.BalancedPixelSampler`: each
  epoch draws a fresh class-balanced sample of at most ``max_pixels_in_memory`` pixels, read image
  by image from disk (or from in-memory arrays), so peak memory does not grow with the number of
  labelled images (the reference holds every pixel as float32 in RAM);
* a fixed number of epochs replaces the reference's batch-loss early stopping;
* inputs are standardised per feature (mean/std of the first sample) unless ``standardise=False``;
* the K members are trained together as one batched module (each member its own minibatch order
  and initialisation; its gradient and Adam state are its own), which is just faster on CPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import nn

from ..errors import check_positive_int
from ..features.pixel_store import ArrayPixels, BalancedPixelSampler, PixelSource, check_pixel_labels
from ..persistence import CONFIG_NAME, STATE_NAME
from .label_maps import check_label_classes, segmentation_metrics

# A head folder holds diffrep.persistence's two files (earlier ones, head.json + head.safetensors, still load).
HEAD_WEIGHTS = STATE_NAME
HEAD_CONFIG = CONFIG_NAME
VOTES = ("majority", "mean")


class MLPEnsemble(nn.Module):
    """K independent MLPs ``d -> h1 -> ... -> C`` (Linear, ReLU, BatchNorm per hidden layer), batched.

    ``forward`` takes (K, B, d), one minibatch per member, or (B, d) shared by all, and returns
    logits (K, B, C).
    """

    def __init__(self, members: int, in_features: int, hidden: Sequence[int], num_classes: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.members = members
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            self.weights.append(nn.Parameter(torch.empty(members, a, b).normal_(0.0, 0.02, generator=generator)))
            self.biases.append(nn.Parameter(torch.zeros(members, 1, b)))
            if i < len(widths) - 2:
                self.norms.append(nn.BatchNorm1d(members * b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.members
        for i, (w, bias) in enumerate(zip(self.weights, self.biases)):
            if x.ndim == 2:  # shared input: one (B, d) @ (d, K*h) product, no K copies of x
                b = x.shape[0]
                x = (x @ w.permute(1, 0, 2).reshape(w.shape[1], -1)).reshape(b, k, -1).transpose(0, 1) + bias
            else:
                b = x.shape[1]
                x = torch.baddbmm(bias, x, w)
            if i < len(self.norms):
                x = torch.relu(x)
                x = self.norms[i](x.transpose(0, 1).reshape(b, -1)).reshape(b, k, -1).transpose(0, 1)
        return x


def _is_source(x: Any) -> bool:
    return all(hasattr(x, name) for name in ("read", "read_labels", "num_features", "image_shape"))


def _as_descriptors(x: Any, name: str = "X") -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected descriptors (N, D, H, W) as an array/tensor or a pixel source "
                        f"(PixelStore, ArrayPixels), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected descriptors of shape (N, D, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image (N >= 1), got N = 0")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected floating-point descriptors, got dtype {x.dtype}")
    return x


class PixelClassifier(BaseEstimator):
    """Ensemble of K pixel MLPs (Baranchuk et al. 2022) trained within a fixed pixel-memory budget.

    Args:
        num_classes: C; labels must lie in 0..C-1 (or equal ``ignore_index``). None: the labels found, which
            must then be exactly 0..C-1 (see :func:`~diffrep.heads.label_maps.check_label_classes`).
        n_members: K, the number of MLPs (10 in the paper).
        hidden: hidden widths (128, 32 in the paper for C < 30).
        epochs: training epochs; each draws a new balanced pixel sample.
        batch_size: pixels per minibatch and member (64 in the paper).
        lr: Adam learning rate (1e-3 in the paper).
        max_pixels_in_memory: size of the per-epoch pixel sample, the only training data held in
            memory (float16: ``max_pixels_in_memory * D * 2`` bytes) besides one image's descriptor.
        vote: ``"majority"`` (the paper; ties go to the higher mean probability) or ``"mean"``
            (argmax of the members' mean probability).
        standardise: standardise each feature with the first sample's mean and std.
        ignore_index: the label of unlabelled pixels, left out of training, the class count and scoring.
        predict_batch_pixels: pixels per forward at prediction time (at most ``max_pixels_in_memory``).
        seed: seed of the sampler, the initialisation and the minibatch order.
        device: torch device for training and prediction.

    Fitted attributes: ``ensemble_``, ``classes_``, ``n_features_in_``, ``mean_``, ``scale_``,
    ``loss_curve_`` (per epoch, mean loss per member), ``n_train_images_``, ``class_pixel_counts_``,
    ``sample_pixels_``, ``peak_sample_bytes_``.
    """

    def __init__(self, num_classes: int | None = None, n_members: int = 10, hidden: Sequence[int] = (128, 32),
                 epochs: int = 10, batch_size: int = 64, lr: float = 1e-3, max_pixels_in_memory: int = 100_000,
                 vote: str = "majority", standardise: bool = True, ignore_index: int | None = None,
                 predict_batch_pixels: int = 16_384, seed: int = 0, device: str = "cpu") -> None:
        self.num_classes = num_classes
        self.n_members = n_members
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.max_pixels_in_memory = max_pixels_in_memory
        self.vote = vote
        self.standardise = standardise
        self.ignore_index = ignore_index
        self.predict_batch_pixels = predict_batch_pixels
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------------------------- checks
    def _check_params(self) -> None:
        for name in ("n_members", "epochs", "batch_size", "max_pixels_in_memory", "predict_batch_pixels"):
            check_positive_int(getattr(self, name), name)
        if self.vote not in VOTES:
            raise ValueError(f"vote: expected one of {VOTES}, got {self.vote!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 2):
            raise ValueError(f"num_classes: expected an integer >= 2 or None, got {self.num_classes!r}")
        if self.max_pixels_in_memory < 2:
            raise ValueError(f"max_pixels_in_memory: expected >= 2 (BatchNorm needs 2 pixels), got {self.max_pixels_in_memory}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, (int, np.integer, type(None))):
            raise ValueError(f"ignore_index: expected an integer label value or None, got {self.ignore_index!r}")

    def _source(self, X: Any, y: Any) -> PixelSource:
        if _is_source(X):
            if y is not None:
                raise ValueError("y: expected None when X is a pixel source (it carries its labels), got an array")
            if len(X) == 0:
                raise ValueError("X: expected at least one labelled image (N >= 1), got N = 0")
            return X
        x = _as_descriptors(X)
        if y is None:
            raise ValueError("y: expected label maps (N, H, W) with in-memory descriptors, got None")
        labels = check_pixel_labels(y, self.num_classes, image_shape=tuple(x.shape[2:]), num_images=x.shape[0],
                                    ignore_index=self.ignore_index, name="y")
        return ArrayPixels(x, labels)

    # ---------------------------------------------------------------------------------------- fit
    def fit(self, X: Any, y: Any = None) -> "PixelClassifier":
        """Train on descriptors (N, D, H, W) + labels (N, H, W), or on a pixel source (e.g. a PixelStore)."""
        self._check_params()
        source = self._source(X, y)
        num_classes = check_label_classes((source.read_labels(i) for i in range(len(source))), self.num_classes,
                                          self.ignore_index)
        sampler = BalancedPixelSampler(source, num_classes, int(self.max_pixels_in_memory),
                                       seed=int(self.seed), ignore_index=self.ignore_index)
        device = torch.device(self.device)
        generator = torch.Generator().manual_seed(int(self.seed))
        d, k = int(source.num_features), int(self.n_members)
        ensemble = MLPEnsemble(k, d, tuple(int(h) for h in self.hidden), num_classes, generator).to(device)
        optimizer = torch.optim.Adam(ensemble.parameters(), lr=float(self.lr))
        loss_fn = nn.CrossEntropyLoss(reduction="none")
        self.loss_curve_: list[list[float]] = []
        mean = torch.zeros(d)
        scale = torch.ones(d)
        for epoch in range(int(self.epochs)):
            xs, ys = sampler.sample(epoch)
            _check_finite(xs, f"X (the epoch-{epoch} pixel sample)")
            if epoch == 0 and self.standardise:
                mean, scale = _moments(xs)
            m = xs.shape[0]
            if m < 2:
                raise ValueError(f"labels: expected at least 2 labelled pixels to train on, got {m}")
            batch = min(int(self.batch_size), m)
            steps = m // batch
            orders = torch.stack([torch.randperm(m, generator=generator) for _ in range(k)])
            ensemble.train()
            totals = torch.zeros(k)
            for step in range(steps):
                idx = orders[:, step * batch:(step + 1) * batch]
                xb = ((xs[idx].float() - mean) / scale).to(device)
                yb = ys[idx].to(device)
                logits = ensemble(xb)
                per_member = loss_fn(logits.reshape(-1, num_classes), yb.reshape(-1)).reshape(k, -1).mean(dim=1)
                optimizer.zero_grad(set_to_none=True)
                per_member.sum().backward()
                optimizer.step()
                totals += per_member.detach().cpu()
            self.loss_curve_.append((totals / max(steps, 1)).tolist())
            del xs, ys
        ensemble.eval()
        self.ensemble_ = ensemble
        self.mean_, self.scale_ = mean, scale
        self.classes_ = np.arange(num_classes)
        self.n_features_in_ = d
        self.n_train_images_ = len(source)
        self.class_pixel_counts_ = sampler.totals.copy()
        self.sample_pixels_ = int(min(sampler.max_pixels, sampler.totals.sum()))
        self.peak_sample_bytes_ = int(sampler.peak_bytes_)
        return self

    # ------------------------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "ensemble_"):
            raise NotFittedError("PixelClassifier: call fit() (or PixelClassifier.load) before predicting")

    @torch.inference_mode()
    def member_probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """Each member's class probabilities for pixel descriptors (P, D): (K, P, C)."""
        self._check_fitted()
        if pixels.ndim != 2 or pixels.shape[1] != self.n_features_in_:
            raise ValueError(f"pixels: expected shape (P, {self.n_features_in_}), got {tuple(pixels.shape)}")
        _check_finite(pixels, "pixels")
        device = next(self.ensemble_.parameters()).device
        rows = int(min(self.predict_batch_pixels, self.max_pixels_in_memory))
        out = []
        for start in range(0, pixels.shape[0], rows):
            xb = (pixels[start:start + rows].float() - self.mean_) / self.scale_
            out.append(torch.softmax(self.ensemble_(xb.to(device)), dim=-1).cpu())
        return torch.cat(out, dim=1)

    def _predict_image(self, descriptor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, h, w = descriptor.shape
        probs = self.member_probabilities(descriptor.reshape(d, -1).T)  # (K, P, C)
        labels, mean_prob, uncertainty = combine_members(probs, self.vote)
        return labels.reshape(h, w), mean_prob.T.reshape(-1, h, w), uncertainty.reshape(h, w)

    def _iter_images(self, X: Any):
        self._check_fitted()
        if _is_source(X):
            if X.num_features != self.n_features_in_:
                raise ValueError(f"X: expected {self.n_features_in_} features per pixel, got {X.num_features}")
            for i in range(len(X)):
                yield X.read(i)[0]
            return
        x = _as_descriptors(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X: expected {self.n_features_in_} features per pixel (dim 1), got {x.shape[1]}")
        for i in range(x.shape[0]):
            yield x[i]

    def predict_with_uncertainty(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 (N, H, W), uncertainty float32 (N, H, W)); uncertainty = entropy (nats) of the
        members' votes, 0 where every member predicts the same class. Images are processed one at a time."""
        labels, uncertainty = [], []
        for descriptor in self._iter_images(X):
            lab, _, unc = self._predict_image(descriptor)
            labels.append(lab.numpy())
            uncertainty.append(unc.numpy())
        return np.stack(labels), np.stack(uncertainty)

    def predict(self, X: Any) -> np.ndarray:
        """Label maps (N, H, W) by ``vote`` over members."""
        return self.predict_with_uncertainty(X)[0]

    def predict_proba(self, X: Any) -> np.ndarray:
        """Mean member probabilities (N, C, H, W)."""
        return np.stack([self._predict_image(x)[1].numpy() for x in self._iter_images(X)])

    def score(self, X: Any, y: Any = None) -> float:
        """Mean IoU over classes present in truth or prediction (descriptors + labels, or a pixel source)."""
        if _is_source(X):
            truth = np.stack([X.read_labels(i).numpy() for i in range(len(X))])
        else:
            truth = check_pixel_labels(y, len(self.classes_), ignore_index=self.ignore_index, name="y").numpy()
        return segmentation_metrics(self.predict(X), truth, len(self.classes_), self.ignore_index)["miou"]

    # --------------------------------------------------------------------------------- persistence
    def _fitted_state(self) -> dict[str, Any]:
        """The fitted attributes saved by :func:`diffrep.persistence.save_fitted`."""
        self._check_fitted()
        names = ("mean_", "scale_", "classes_", "n_features_in_", "n_train_images_", "class_pixel_counts_",
                 "loss_curve_", "sample_pixels_", "peak_sample_bytes_")
        state = {name: getattr(self, name) for name in names if hasattr(self, name)}
        ensemble = {k: v.detach().cpu() for k, v in self.ensemble_.state_dict().items()}
        return {**state, "ensemble_": ensemble, "metadata_": getattr(self, "metadata_", {})}

    def _set_fitted_state(self, state: dict[str, Any]) -> None:
        """Rebuild the ensemble from its weights and set the other fitted attributes."""
        state = dict(state)
        c, d = len(state["classes_"]), int(state["n_features_in_"])
        self.ensemble_ = MLPEnsemble(int(self.n_members), d, tuple(int(h) for h in self.hidden), c)
        self.ensemble_.load_state_dict(state.pop("ensemble_"))
        self.ensemble_.to(self.device).eval()
        for name, value in state.items():
            setattr(self, name, value)

    def save(self, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` (params, metadata) + ``state.safetensors`` (weights, standardisation), no
        pickle (:func:`diffrep.persistence.save_fitted`); ``metadata`` (if given) becomes ``metadata_``."""
        from ..persistence import save_fitted

        self._check_fitted()
        if metadata is not None:
            self.metadata_ = dict(metadata)
        return save_fitted(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu") -> "PixelClassifier":
        """A fitted classifier from :meth:`save`'s folder, or from an earlier ``head.json`` + ``head.safetensors``
        folder; a garbled or non-finite head names its file."""
        from .._legacy_formats import LEGACY_HEAD_CONFIG, load_legacy_head
        from ..persistence import load_fitted

        directory = Path(directory)
        if not (directory / HEAD_CONFIG).is_file() and (directory / LEGACY_HEAD_CONFIG).is_file():
            return load_legacy_head(cls, directory, device)
        if not (directory / HEAD_CONFIG).is_file():
            raise FileNotFoundError(f"pixel classifier: expected {directory / HEAD_CONFIG} (or an earlier "
                                    f"{LEGACY_HEAD_CONFIG}), it does not exist")
        return load_fitted(directory, expected=cls, params={"device": device})


# ----------------------------------------------------------------------------------------- helpers
def _check_finite(x: torch.Tensor, name: str) -> None:
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name}: expected finite descriptors, got {bad} NaN/Inf value(s) (check the backbone's weights)")


def _moments(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of (M, D) rows, in float64 chunks of about 16 MB (no full-size copy)."""
    chunk = max(1, (1 << 21) // max(1, xs.shape[1]))
    total = torch.zeros(xs.shape[1], dtype=torch.float64)
    square = torch.zeros(xs.shape[1], dtype=torch.float64)
    for start in range(0, xs.shape[0], chunk):
        part = xs[start:start + chunk].double()
        total += part.sum(0)
        square += (part * part).sum(0)
    mean = total / xs.shape[0]
    std = (square / xs.shape[0] - mean * mean).clamp_min(0).sqrt()
    return mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()


def combine_members(probs: torch.Tensor, vote: str = "majority") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine member probabilities (K, P, C) into (labels (P,), mean probability (P, C), vote entropy (P,)).

    ``majority``: the most voted class (ties go to the higher mean probability); ``mean``: argmax of
    the mean probability. Uncertainty is the entropy (nats) of the vote histogram, 0 iff all agree.
    """
    if vote not in VOTES:
        raise ValueError(f"vote: expected one of {VOTES}, got {vote!r}")
    k, _, c = probs.shape
    mean_prob = probs.mean(dim=0)
    votes = torch.nn.functional.one_hot(probs.argmax(dim=-1), c).sum(dim=0).float()  # (P, C)
    if vote == "majority":
        labels = (votes + 0.5 * mean_prob).argmax(dim=-1)  # mean_prob < 1: only breaks ties
    else:
        labels = mean_prob.argmax(dim=-1)
    frac = votes / k
    entropy = -(frac * torch.log(frac.clamp_min(1e-12))).sum(dim=-1)
    return labels, mean_prob, entropy.clamp_min(0.0)

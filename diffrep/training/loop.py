"""DDPM pretraining (Ho et al. 2020): epsilon prediction with MONAI's U-Net and schedule.

Single process or under ``torchrun --nproc_per_node=K`` (DistributedDataParallel; gloo on CPU, nccl
on GPU). Periodic atomic checkpoints hold everything needed for an exact ``--resume``.
"""
from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .._atomic import atomic_write_json
from ..backbones.backbone import Backbone
from ..backbones.checkpoint import save_backbone
from ..compute import ComputeOptions
from ..config import to_dict
from ..devices import resolve_device
from ..errors import check_positive_int
from .config import TrainConfig, check_data_fits
from .data import TrainingData, build_training_data
from ..distributed import DistContext, barrier, init_distributed, shutdown
from .evaluate import heldout_losses
from .guard import check_step_finite, check_weights_finite, describe_checkpoint, refuse_existing_run
from .reports import write_loss_curve, write_sample_grid
from .state import STATE_NAME, load_state, save_state


def step_noise(config: TrainConfig, step: int, images: torch.Tensor, num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps and Gaussian noise for the global batch at ``step``: a pure function of (seed, step)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_033 + step)
    timesteps = torch.randint(0, num_timesteps, (images.shape[0],), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    return timesteps, noise


def same_recipe(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a saved recipe equals this one; an unset ``init_from`` matches states saved before it existed."""
    def canonical(recipe: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in recipe.items() if not (k == "init_from" and v is None)}
    return canonical(recorded) == canonical(current)


def warm_start(config: TrainConfig, model: torch.nn.Module, ema: ModelEmaV3) -> int:
    """Start ``model`` and its EMA from the weights in ``config.init_from`` (another run's training state).

    The optimiser, LR schedule (warm-up included) and step counter start fresh: this is a warm restart
    that extends a finished run with a new schedule, not a resume (use ``--resume`` for that).
    Returns the earlier run's step count: the EMA keeps counting from it, so its first update
    averages into the earlier EMA instead of copying the weights (timm's EMA copies at step 1).
    """
    if not Path(config.init_from).is_file():
        raise FileNotFoundError(f"init_from: expected a train_state.pt written by `diffrep train`, "
                                f"got {config.init_from!r} (no such file)")
    state = load_state(Path(config.init_from))
    theirs = state["recipe"]["backbone"]
    if theirs != to_dict(config.backbone):
        raise ValueError(f"init_from: {config.init_from} was trained with backbone {theirs}, "
                         f"but this recipe's backbone is {to_dict(config.backbone)}; they must match")
    model.load_state_dict(state["model"])
    ema.module.load_state_dict(state["ema"])
    return int(state["step"]) + int(state.get("ema_step_offset", 0))


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False, max_steps: int | None = None,
          progress: bool = True, data: TrainingData | None = None, num_threads: int | None = None,
          device: str | torch.device | None = None, compute: ComputeOptions | None = None) -> Path:
    """Train (or resume) the recipe ``config`` into ``out_dir``; return the exported backbone directory.

    ``max_steps`` stops this invocation at that global step without changing the recipe's LR
    schedule, so a long run can be split over sessions with ``resume=True``. Without ``resume``, an
    ``out_dir`` that already holds a run is refused (FileExistsError) before any work. A non-finite
    loss, gradient or weight stops training with ``DivergenceError`` naming the step; the last
    checkpoint on disk (always finite) is kept and no backbone is exported.

    ``device``: where to train (default: each process's GPU when CUDA is available, else the CPU);
    ``compute``: bfloat16 autocast and/or channels-last layout (``diffrep.compute``; float16 is refused:
    it needs loss scaling). Neither is part of the recipe; both are recorded in the provenance.
    """
    config.validate()
    compute = compute or ComputeOptions()
    if compute.autocast == "float16":
        raise ValueError("autocast 'float16': training supports 'bfloat16' only (float16 needs loss scaling)")
    device = None if device is None else resolve_device(device)
    for key, value in (("max_steps (--max-steps)", max_steps), ("num_threads (--threads)", num_threads)):
        if value is not None:
            check_positive_int(value, key)
    out_dir = Path(out_dir)
    if not resume:
        refuse_existing_run(out_dir)
    if num_threads:
        torch.set_num_threads(num_threads)
    ctx = init_distributed(device)
    try:
        return _train(config, out_dir, resume, max_steps, progress, data, ctx, compute)
    finally:
        shutdown(ctx)


class _Run(NamedTuple):
    """The objects one training invocation steps together."""

    backbone: Backbone
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: CosineLRScheduler
    ema: ModelEmaV3
    data: TrainingData
    ctx: DistContext
    state_path: Path
    compute: ComputeOptions


class _LogWindow:
    """Mean loss and images/s since the last log line; appends a line to ``log.jsonl`` (main process only)."""

    def __init__(self, path: Path, batch_size: int, bar: tqdm, is_main: bool) -> None:
        self.path, self.batch_size, self.bar, self.is_main = path, batch_size, bar, is_main
        self.loss, self.count, self.start = 0.0, 0, time.perf_counter()

    def add(self, loss: float) -> None:
        self.loss += loss
        self.count += 1

    def flush(self, step: int, lr: float) -> None:
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "loss": self.loss / self.count, "lr": lr,
                  "images_per_s": self.count * self.batch_size / max(elapsed, 1e-9), "time": time.time()}
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if self.is_main:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        self.loss, self.count, self.start = 0.0, 0, time.perf_counter()


def _train(config: TrainConfig, out_dir: Path, resume: bool, max_steps: int | None, progress: bool,
           data: TrainingData | None, ctx: DistContext, compute: ComputeOptions) -> Path:
    """The body of :func:`train` inside an initialised process group: set up, step, checkpoint, export."""
    torch.manual_seed(config.seed)
    backbone = Backbone(copy.deepcopy(config.backbone))
    model = compute.prepare_module(backbone.unet.to(ctx.device), config.backbone.unet.spatial_dims).train()
    fresh_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer, lr_schedule, ema = _optimisation(config, model)
    step, ema_step_offset, saved_step = 0, 0, None
    state_path = out_dir / STATE_NAME
    if config.init_from is not None and not resume:
        ema_step_offset = warm_start(config, model, ema)
    if resume:
        step, ema_step_offset = _resume(config, state_path, model, ema, optimizer, lr_schedule)
        saved_step = step
    data = data or build_training_data(config.data, config.seed, channels=config.backbone.unet.in_channels)
    check_data_fits(config.backbone.unet, channels=data.images.shape[1], spatial=tuple(data.images.shape[2:]),
                    what=f"the training images of shape {tuple(data.images.shape)}")
    net = DistributedDataParallel(model) if ctx.world_size > 1 else model
    run = _Run(backbone, model, net, optimizer, lr_schedule, ema, data, ctx, state_path, compute)
    stop = min(config.max_steps, max_steps if max_steps is not None else config.max_steps)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    shard = ctx.shard(config.optim.batch_size)
    bar = tqdm(total=stop, initial=step, disable=not (progress and ctx.is_main), desc=config.name, dynamic_ncols=True)
    window = _LogWindow(out_dir / "log.jsonl", config.optim.batch_size, bar, ctx.is_main)
    while step < stop:
        loss = _train_step(config, run, shard, step, saved_step)
        step += 1
        ema.update(model, step=step + ema_step_offset)
        window.add(loss.item())
        bar.update(1)
        if step % config.log_every == 0 or step == stop:
            window.flush(step, optimizer.param_groups[0]["lr"])
        if step % config.checkpoint_every == 0 or step == stop:
            _checkpoint(config, run, step, ema_step_offset, saved_step)
            saved_step = step
    bar.close()
    barrier(ctx)
    export_dir = out_dir / "backbone"
    if ctx.is_main:
        _export(config, backbone, ema, fresh_state, data, step, out_dir, export_dir,
                {"device": ctx.device.type, **compute.describe()})
    barrier(ctx)
    return export_dir


def _optimisation(config: TrainConfig, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, CosineLRScheduler, ModelEmaV3]:
    """The recipe's AdamW optimiser, warm-up + cosine LR schedule and EMA of ``model``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    lr_schedule = CosineLRScheduler(optimizer, t_initial=config.max_steps, lr_min=config.optim.min_lr,
                                    warmup_t=config.optim.warmup_steps, warmup_lr_init=config.optim.lr * 0.01,
                                    t_in_epochs=False)
    ema = ModelEmaV3(model, decay=config.optim.ema_decay, use_warmup=config.optim.ema_warmup)
    return optimizer, lr_schedule, ema


def _train_step(config: TrainConfig, run: _Run, shard: Any, step: int, saved_step: int | None) -> torch.Tensor:
    """One optimiser step on this rank's share of the global batch at ``step``; returns its loss.

    A non-finite loss or gradient raises DivergenceError (naming ``step + 1``) before the weights change.
    """
    run.lr_schedule.step_update(num_updates=step)
    images = run.data.batch(config.seed, step, config.optim.batch_size)
    timesteps, noise = step_noise(config, step, images, run.backbone.num_timesteps)
    device = run.ctx.device
    images, timesteps, noise = images[shard].to(device), timesteps[shard].to(device), noise[shard].to(device)
    x_t = run.backbone.schedule.add_noise(run.backbone.to_model_range(images), noise, timesteps)
    with run.compute.autocast_context(device):
        loss = F.mse_loss(run.net(run.compute.prepare_input(x_t), timesteps).float(), noise)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.optim.grad_clip)
    check_step_finite(loss, grad_norm, step + 1, config.optim.lr, describe_checkpoint(run.state_path, saved_step),
                      run.ctx)
    run.optimizer.step()
    return loss


def _checkpoint(config: TrainConfig, run: _Run, step: int, ema_step_offset: int, saved_step: int | None) -> None:
    """Check the weights are finite, then write the training state atomically (main process only)."""
    for what, weights in (("model", run.model.state_dict()), ("EMA", run.ema.module.state_dict())):  # same on every rank
        check_weights_finite(weights, what, step, describe_checkpoint(run.state_path, saved_step))
    if run.ctx.is_main:
        save_state(run.state_path, {
            "recipe": to_dict(config), "step": step, "model": run.model.state_dict(), "ema": run.ema.module.state_dict(),
            "optimizer": run.optimizer.state_dict(), "lr_schedule": run.lr_schedule.state_dict(),
            "torch_rng": torch.get_rng_state(), "ema_step_offset": ema_step_offset,
            "data_position": run.data.position(step, config.optim.batch_size),
        })


def _resume(config: TrainConfig, state_path: Path, model: torch.nn.Module, ema: ModelEmaV3,
            optimizer: torch.optim.Optimizer, lr_schedule: CosineLRScheduler) -> tuple[int, int]:
    """Load the training state at ``state_path`` into the run; returns (step, EMA step offset)."""
    state = load_state(state_path)
    if not same_recipe(state["recipe"], to_dict(config)):
        raise ValueError(f"--resume: the recipe differs from the one in {state_path}; resume with the same config")
    model.load_state_dict(state["model"])
    ema.module.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), int(state.get("ema_step_offset", 0))


def _export(config: TrainConfig, backbone: Backbone, ema: ModelEmaV3, fresh_state: dict, data: TrainingData,
            step: int, out_dir: Path, export_dir: Path, hardware: dict) -> None:
    """Write the EMA backbone with full provenance (``hardware``: device type and compute options), held-out losses, loss curve and sample grid."""
    trained = Backbone(copy.deepcopy(config.backbone))
    weights = {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
    check_weights_finite(weights, "EMA", step, f"The training state is {out_dir / STATE_NAME}")
    trained.unet.load_state_dict(weights)
    fresh = Backbone(copy.deepcopy(config.backbone))
    fresh.unet.load_state_dict({k: v.cpu() for k, v in fresh_state.items()})
    losses = heldout_losses(trained, data.heldout, config.eval_timesteps, seed=config.seed)
    fresh_losses = heldout_losses(fresh, data.heldout, config.eval_timesteps, seed=config.seed)
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    provenance: dict[str, Any] = {
        "recipe": to_dict(config), "steps": step, "complete": step >= config.max_steps, "seed": config.seed,
        "data": data.description, "final_train_loss": records[-1]["loss"] if records else None,
        "heldout_loss": {str(t): v for t, v in losses.items()},
        "heldout_loss_fresh_init": {str(t): v for t, v in fresh_losses.items()},
        "ema_decay": config.optim.ema_decay, "weights": "EMA", "hardware": hardware,
        "versions": {"torch": torch.__version__, "python": platform.python_version(), **_versions()},
    }
    trained.config.provenance = provenance
    save_backbone(trained, export_dir)
    atomic_write_json(out_dir / "heldout_losses.json",
                      {"trained_ema": provenance["heldout_loss"], "fresh_init": provenance["heldout_loss_fresh_init"],
                       "noise_level": {str(t): trained.noise_level(t) for t in config.eval_timesteps}, "steps": step})
    write_loss_curve(records, out_dir / "loss_curve.png", title=f"{config.name}: training loss")
    spatial = tuple(data.images.shape[2:])
    write_sample_grid(trained, spatial, out_dir / "samples.png", steps=config.sample_steps, seed=config.seed,
                      title=f"{config.name}: {config.sample_steps}-step DDIM samples after {step} steps")


def _versions() -> dict[str, str]:
    import monai
    import timm

    return {"monai": monai.__version__, "timm": timm.__version__}

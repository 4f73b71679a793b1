"""Guards around a training run: refuse to overwrite another run, stop on divergence, never save NaNs."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed import DistContext
from .state import STATE_NAME

RUN_FILES = (STATE_NAME, "log.jsonl", "backbone", "heldout_losses.json")


class DivergenceError(ValueError):
    """Training produced a non-finite loss, gradient or weight; the last finite checkpoint is kept."""


def refuse_existing_run(out_dir: Path) -> None:
    """Raise FileExistsError if ``out_dir`` already holds (part of) a training run.

    Called before any work when training without ``--resume``, so a finished or interrupted run is
    never overwritten or appended to.
    """
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found:
        raise FileExistsError(f"{out_dir} already holds a training run ({', '.join(found)}); pass --resume to "
                              f"continue it, or choose another --out for a new run")


def check_step_finite(loss: torch.Tensor, grad_norm: torch.Tensor, step: int, lr: float,
                      checkpoint: str, ctx: DistContext) -> None:
    """Raise DivergenceError if this rank's loss or the (all-reduced) gradient norm is not finite.

    Checked before ``optimizer.step()`` so the weights stay those of the last finite step. Under
    torchrun the flag is all-reduced, so every rank stops at the same step.
    """
    bad = torch.stack([(~torch.isfinite(loss.detach())).float().reshape(()),
                       (~torch.isfinite(grad_norm.detach())).float().reshape(())])
    if ctx.world_size > 1:
        dist.all_reduce(bad)
    if bool(bad.any()):
        raise DivergenceError(f"training diverged at step {step}: loss {float(loss.detach()):.4g}, gradient norm "
                              f"{float(grad_norm.detach()):.4g} (expected finite values); try a lower optim.lr (now {lr:g}). "
                              f"{checkpoint}; no backbone was exported")


def check_weights_finite(state: dict[str, torch.Tensor], what: str, step: int, checkpoint: str) -> None:
    """Raise DivergenceError naming the first tensors of ``state`` that hold NaN or Inf."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DivergenceError(f"training diverged at step {step}: {len(bad)} {what} tensor(s) are not finite, "
                              f"e.g. {bad[:3]}. {checkpoint}; no backbone was exported")


def describe_checkpoint(state_path: Path, step: int | None) -> str:
    """Where the last finite training state is, for divergence messages."""
    if step is None:
        return f"No checkpoint was written ({state_path} does not exist)"
    return f"The last finite checkpoint, {state_path} (step {step}), is kept"

"""Learning-rate (and momentum) schedules as pure functions of the optimizer-step index.

The training loop counts its own steps (0-based: step 0 is the first batch of epoch 1) and sets
`group["lr"]` / `group["momentum"]` from these functions before each optimizer step, so a schedule
can be plotted, tested and logged without an optimizer. They agree with torch's CyclicLR and
OneCycleLR, which the tests check step by step.
"""

from __future__ import annotations

import math

from onecycle.config import TrainParams


def _check_lr_range(lr_min: float, lr_max: float) -> None:
    if not (math.isfinite(lr_min) and math.isfinite(lr_max) and 0 < lr_min < lr_max):
        raise ValueError(f"need 0 < lr_min < lr_max, got lr_min={lr_min!r}, lr_max={lr_max!r}")


def _lerp(start: float, end: float, fraction: float) -> float:
    """start at fraction 0, end at fraction 1, linear between; both ends exact in floating point."""
    return (1 - fraction) * start + fraction * end


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: ceil(n_images / batch_size), the last partial batch kept.

    50,000 CIFAR-10 training images at batch size 512 give 98 steps (97 full batches and one of 336).
    """
    if n_images < 1 or batch_size < 1:
        raise ValueError(f"need n_images >= 1 and batch_size >= 1, got {n_images} and {batch_size}")
    return math.ceil(n_images / batch_size)


def triangular_lr(step: int, *, step_size: int, lr_min: float, lr_max: float) -> float:
    """Smith (2015) triangular cyclic LR at optimizer step `step` (0-based).

    The LR climbs linearly from lr_min to lr_max over `step_size` steps, falls back to lr_min over the
    next `step_size` steps, and repeats: one cycle is 2 * step_size steps. Equals
    torch.optim.lr_scheduler.CyclicLR(mode="triangular", base_lr=lr_min, max_lr=lr_max, step_size_up=step_size).
    """
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    _check_lr_range(lr_min, lr_max)
    position = step % (2 * step_size)  # steps into the current cycle
    distance_from_peak = abs(position - step_size)  # step_size at the cycle's ends, 0 at its peak
    return _lerp(lr_min, lr_max, 1 - distance_from_peak / step_size)


def one_cycle(
    step: int,
    *,
    total_steps: int,
    peak_step: int,
    lr_min: float,
    lr_max: float,
    momentum_at_min: float,
    momentum_at_max: float,
) -> tuple[float, float]:
    """(lr, momentum) of the One Cycle Policy at optimizer step `step` (0-based), without annihilation.

    The LR rises linearly from lr_min at step 0 to lr_max at `peak_step`, then falls linearly to exactly
    lr_min at the last step, total_steps - 1; it never goes below lr_min. Momentum moves the other way,
    from momentum_at_min (where the LR is lr_min) to momentum_at_max (at the peak) and back: a high LR
    with high momentum would overshoot.

    Equals torch.optim.lr_scheduler.OneCycleLR(max_lr=lr_max, total_steps=total_steps,
    pct_start=(peak_step + 1) / total_steps, anneal_strategy="linear", div_factor=lr_max / lr_min,
    final_div_factor=1.0, three_phase=False, base_momentum=momentum_at_max, max_momentum=momentum_at_min)
    to rounding: torch ends its first phase at pct_start * total_steps - 1 = peak_step.
    """
    if total_steps < 3:
        raise ValueError(f"total_steps must be >= 3 (a rise and a fall), got {total_steps}")
    if not 1 <= peak_step <= total_steps - 2:
        raise ValueError(f"peak_step must be from 1 to total_steps - 2 = {total_steps - 2}, got {peak_step}")
    if not 0 <= step <= total_steps - 1:
        raise ValueError(f"step must be from 0 to total_steps - 1 = {total_steps - 1}, got {step}")
    _check_lr_range(lr_min, lr_max)
    for name, value in (("momentum_at_min", momentum_at_min), ("momentum_at_max", momentum_at_max)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")

    # How far up the cycle we are: 0 at lr_min, 1 at lr_max. Written so that it is exactly 0 at the first and
    # last step and exactly 1 at the peak: the LR ends on lr_min itself, not a rounding error below it.
    if step <= peak_step:
        height = step / peak_step
    else:
        last = total_steps - 1
        height = (last - step) / (last - peak_step)
    return _lerp(lr_min, lr_max, height), _lerp(momentum_at_min, momentum_at_max, height)


def one_cycle_peak_step(epochs: int, peak_epoch: int, steps_per_epoch: int) -> int:
    """The 0-based step index at which the LR reaches LRMAX: the last step of epoch `peak_epoch` (1-based).

    This is what "LR at its maximum at epoch 5" means: over 24 epochs of 98 steps (2,352 steps, indices
    0..2351) the LR climbs through epochs 1..5 and reaches LRMAX on epoch 5's last batch, step
    5 * 98 - 1 = 489; it then falls for the remaining 19 epochs and ends at LRMIN on the last batch of
    epoch 24, step 2351. The LR in force at the end of epoch 5 (what the per-epoch history logs) is LRMAX.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if not 1 <= peak_epoch < epochs:
        raise ValueError(f"peak_epoch must be from 1 to epochs - 1 = {epochs - 1}, got {peak_epoch}")
    peak_step = peak_epoch * steps_per_epoch - 1
    if peak_step < 1:
        raise ValueError(
            f"the LR needs at least 2 steps to rise, but peak_epoch={peak_epoch} x {steps_per_epoch} step(s) "
            "per epoch gives 1: use a later peak_epoch, or more steps per epoch (more images, or smaller batches)"
        )
    return peak_step


def one_cycle_table(
    params: TrainParams, steps_per_epoch: int, lr_min: float, lr_max: float
) -> list[tuple[float, float]]:
    """(lr, momentum) for every optimizer step of the run described by `params` (for plots and checks).

    params.momentum is the pair (momentum at LRMIN, momentum at LRMAX).
    """
    total_steps = params.epochs * steps_per_epoch
    peak_step = one_cycle_peak_step(params.epochs, params.peak_epoch, steps_per_epoch)
    momentum_at_min, momentum_at_max = params.momentum
    return [
        one_cycle(
            step,
            total_steps=total_steps,
            peak_step=peak_step,
            lr_min=lr_min,
            lr_max=lr_max,
            momentum_at_min=momentum_at_min,
            momentum_at_max=momentum_at_max,
        )
        for step in range(total_steps)
    ]

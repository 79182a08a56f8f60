from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from onecycle.config import TrainParams
from onecycle.schedules import one_cycle, one_cycle_peak_step, one_cycle_table, steps_per_epoch, triangular_lr

LR_MIN, LR_MAX = 0.002, 0.02
MOMENTUM_AT_MIN, MOMENTUM_AT_MAX = 0.95, 0.85


def _sgd() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR_MIN, momentum=0.9)


def _one_cycle_kwargs(total_steps: int, peak_step: int) -> dict:
    return dict(
        total_steps=total_steps,
        peak_step=peak_step,
        lr_min=LR_MIN,
        lr_max=LR_MAX,
        momentum_at_min=MOMENTUM_AT_MIN,
        momentum_at_max=MOMENTUM_AT_MAX,
    )


# --- steps per epoch and the peak ---------------------------------------------------------------------------


def test_cifar10_run_has_98_steps_per_epoch_2352_in_all_and_peaks_at_the_end_of_epoch_5():
    spe = steps_per_epoch(50_000, 512)
    assert spe == 98  # 97 full batches of 512 and a last one of 336, kept
    assert 24 * spe == 2352
    assert one_cycle_peak_step(24, 5, spe) == 489  # 5 * 98 - 1: the last batch of epoch 5
    assert one_cycle_peak_step(24, 5, spe) // spe + 1 == 5  # step 489 belongs to epoch 5 (1-based)


@pytest.mark.parametrize(("n", "batch", "expected"), [(1, 512, 1), (512, 512, 1), (513, 512, 2), (10, 3, 4)])
def test_steps_per_epoch_keeps_the_last_partial_batch(n, batch, expected):
    assert steps_per_epoch(n, batch) == expected


@pytest.mark.parametrize(("n", "batch"), [(0, 512), (100, 0)])
def test_steps_per_epoch_rejects_empty_inputs(n, batch):
    with pytest.raises(ValueError):
        steps_per_epoch(n, batch)


def test_peak_step_rejects_a_peak_that_leaves_no_fall_or_no_rise():
    with pytest.raises(ValueError, match="peak_epoch"):
        one_cycle_peak_step(24, 24, 98)  # no steps left to fall
    with pytest.raises(ValueError, match="peak_epoch"):
        one_cycle_peak_step(24, 0, 98)
    with pytest.raises(ValueError, match="2 steps"):
        one_cycle_peak_step(24, 1, 1)  # the peak would be step 0: nothing to rise through
    assert one_cycle_peak_step(3, 1, 2) == 1


# --- triangular cyclic LR -----------------------------------------------------------------------------------


@pytest.mark.parametrize("step_size", [1, 2, 5, 98, 490])
def test_triangular_matches_torch_cyclic_lr_step_by_step(step_size):
    optimizer = _sgd()
    scheduler = CyclicLR(
        optimizer, base_lr=LR_MIN, max_lr=LR_MAX, step_size_up=step_size, mode="triangular", cycle_momentum=False
    )
    for step in range(max(6 * step_size + 3, 50)):
        expected = optimizer.param_groups[0]["lr"]
        ours = triangular_lr(step, step_size=step_size, lr_min=LR_MIN, lr_max=LR_MAX)
        assert math.isclose(ours, expected, rel_tol=1e-12), step
        optimizer.step()
        scheduler.step()


def test_triangular_corners_are_exact():
    for cycle in range(3):
        start = cycle * 2 * 10
        assert triangular_lr(start, step_size=10, lr_min=LR_MIN, lr_max=LR_MAX) == LR_MIN
        assert triangular_lr(start + 10, step_size=10, lr_min=LR_MIN, lr_max=LR_MAX) == LR_MAX
    halfway = triangular_lr(5, step_size=10, lr_min=LR_MIN, lr_max=LR_MAX)
    assert math.isclose(halfway, (LR_MIN + LR_MAX) / 2, rel_tol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(step=-1, step_size=5, lr_min=0.1, lr_max=1.0),
        dict(step=0, step_size=0, lr_min=0.1, lr_max=1.0),
        dict(step=0, step_size=5, lr_min=1.0, lr_max=0.1),
        dict(step=0, step_size=5, lr_min=0.0, lr_max=1.0),
    ],
)
def test_triangular_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        triangular_lr(**kwargs)


# --- one cycle ------------------------------------------------------------------------------------------------


def _torch_one_cycle(total_steps: int, peak_step: int) -> list[tuple[float, float]]:
    """(lr, momentum) that torch's OneCycleLR puts in an SGD optimizer before each of the total_steps steps."""
    optimizer = _sgd()
    scheduler = OneCycleLR(
        optimizer,
        max_lr=LR_MAX,
        total_steps=total_steps,
        pct_start=(peak_step + 1) / total_steps,
        anneal_strategy="linear",
        div_factor=LR_MAX / LR_MIN,
        final_div_factor=1.0,
        three_phase=False,
        cycle_momentum=True,
        base_momentum=MOMENTUM_AT_MAX,
        max_momentum=MOMENTUM_AT_MIN,
    )
    values = []
    for step in range(total_steps):
        group = optimizer.param_groups[0]
        values.append((group["lr"], group["momentum"]))
        if step < total_steps - 1:
            optimizer.step()
            scheduler.step()
    return values


@pytest.mark.parametrize(("total_steps", "peak_step"), [(24 * 98, 489), (3, 1), (10, 4), (10, 8), (7, 1), (50, 25)])
def test_one_cycle_matches_torch_one_cycle_lr_step_by_step(total_steps, peak_step):
    expected = _torch_one_cycle(total_steps, peak_step)
    for step, (torch_lr, torch_momentum) in enumerate(expected):
        lr, momentum = one_cycle(step, **_one_cycle_kwargs(total_steps, peak_step))
        assert math.isclose(lr, torch_lr, rel_tol=1e-12), step
        assert math.isclose(momentum, torch_momentum, rel_tol=1e-12), step


def test_one_cycle_starts_at_lr_min_peaks_at_lr_max_and_ends_exactly_at_lr_min():
    spe = steps_per_epoch(50_000, 512)
    params = TrainParams(epochs=24, peak_epoch=5, momentum=(MOMENTUM_AT_MIN, MOMENTUM_AT_MAX))
    table = one_cycle_table(params, spe, LR_MIN, LR_MAX)
    lrs = [lr for lr, _ in table]
    assert len(table) == 2352
    assert lrs[0] == LR_MIN
    assert lrs[489] == LR_MAX
    assert max(lrs) == lrs[489]
    assert lrs[-1] == LR_MIN
    assert min(lrs) >= LR_MIN  # no annihilation: never below LRMIN
    # The LR logged at the end of each epoch (its last step): LRMAX at epoch 5, LRMIN at epoch 24.
    assert math.isclose(lrs[5 * spe - 1], LR_MAX, rel_tol=1e-12)
    assert math.isclose(lrs[24 * spe - 1], LR_MIN, rel_tol=1e-12)


def test_one_cycle_rises_strictly_to_the_peak_then_falls_strictly():
    lrs = [lr for lr, _ in (one_cycle(s, **_one_cycle_kwargs(2352, 489)) for s in range(2352))]
    assert all(a < b for a, b in zip(lrs[:489], lrs[1:490], strict=True))
    assert all(a > b for a, b in zip(lrs[489:-1], lrs[490:], strict=True))


def test_one_cycle_rises_and_falls_linearly():
    lrs = [one_cycle(s, **_one_cycle_kwargs(2352, 489))[0] for s in range(2352)]
    rise = (LR_MAX - LR_MIN) / 489
    fall = (LR_MAX - LR_MIN) / (2351 - 489)
    for step in range(1, 2352):
        expected_delta = rise if step <= 489 else -fall
        assert math.isclose(lrs[step] - lrs[step - 1], expected_delta, rel_tol=1e-6), step


def test_momentum_moves_opposite_to_the_lr_as_an_affine_function_of_it():
    for step in range(2352):
        lr, momentum = one_cycle(step, **_one_cycle_kwargs(2352, 489))
        # momentum_at_min at lr_min, momentum_at_max at lr_max, on the straight line between them
        height = (lr - LR_MIN) / (LR_MAX - LR_MIN)
        expected = MOMENTUM_AT_MIN + (MOMENTUM_AT_MAX - MOMENTUM_AT_MIN) * height
        assert math.isclose(momentum, expected, rel_tol=1e-9, abs_tol=1e-12), step
    assert one_cycle(0, **_one_cycle_kwargs(2352, 489))[1] == MOMENTUM_AT_MIN
    assert one_cycle(489, **_one_cycle_kwargs(2352, 489))[1] == MOMENTUM_AT_MAX
    assert one_cycle(2351, **_one_cycle_kwargs(2352, 489))[1] == MOMENTUM_AT_MIN


def test_one_cycle_table_uses_the_momentum_pair_in_order_at_lrmin_then_at_lrmax():
    params = TrainParams(epochs=4, peak_epoch=1, momentum=(0.9, 0.8))
    table = one_cycle_table(params, 10, 0.01, 0.1)
    assert len(table) == 40
    assert table[0] == (0.01, 0.9)
    assert table[9] == (0.1, 0.8)
    assert table[-1] == (0.01, 0.9)


@pytest.mark.parametrize(
    "change",
    [
        dict(step=-1),
        dict(step=2352),
        dict(peak_step=0),
        dict(peak_step=2351),
        dict(total_steps=2),
        dict(lr_min=0.02, lr_max=0.002),
        dict(lr_min=0.0),
        dict(momentum_at_min=1.0),
        dict(momentum_at_max=-0.1),
    ],
)
def test_one_cycle_rejects_bad_arguments(change):
    kwargs = dict(step=0, **_one_cycle_kwargs(2352, 489))
    kwargs.update(change)
    with pytest.raises(ValueError):
        one_cycle(**kwargs)

"""The LR range test: the sweep, its stop on divergence, the restored state, and the rules that pick LRMAX."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from onecycle import data, lr_finder
from onecycle.config import LRFinderParams, parse_params
from onecycle.errors import UserError
from onecycle.lr_finder import Curve, pick_range, range_test, sweep_lr
from onecycle.model import CustomResNet


def synthetic(lr: np.ndarray, loss: np.ndarray, accuracy: np.ndarray | None = None) -> Curve:
    acc = list(accuracy) if accuracy is not None else [10.0] * len(lr)
    return Curve(list(lr), list(loss), list(loss), acc, acc, "finished", 512 * len(lr))


LRS = np.geomspace(1e-4, 1.0, 97)  # 24 steps per decade: 0.1 is LRS[72], 0.01 is LRS[48]


def bowl(lr: np.ndarray, best: float) -> np.ndarray:
    """A loss that falls and rises again, lowest at `best`."""
    return 2.3 + (np.log10(lr) - np.log10(best)) ** 2


def test_min_loss_picks_the_lowest_point_and_lr_min_is_lr_max_over_min_div():
    found = pick_range(synthetic(LRS, bowl(LRS, 0.1)), LRFinderParams(pick="min_loss", min_div=10))
    assert math.isclose(found.lr_max, 0.1) and math.isclose(found.lr_min, 0.01)
    assert math.isclose(found.lr_at_min_loss, 0.1)
    found = pick_range(synthetic(LRS, bowl(LRS, 0.1)), LRFinderParams(pick="min_loss", min_div=4))
    assert math.isclose(found.lr_min, 0.025)


def test_min_loss_div10_picks_a_tenth_of_the_lowest_point():
    found = pick_range(synthetic(LRS, bowl(LRS, 0.1)), LRFinderParams(pick="min_loss_div10"))
    assert math.isclose(found.lr_max, 0.01)


def test_steepest_picks_the_fastest_fall_before_the_minimum():
    # a sigmoid drop centred at 1e-2 in log(LR), then a rise after 0.3
    x = np.log10(LRS)
    loss = 2.3 - 1.5 / (1 + np.exp(-(x + 2) * 6)) + np.where(LRS > 0.3, (x - np.log10(0.3)) * 20, 0)
    found = pick_range(synthetic(LRS, loss), LRFinderParams(pick="steepest"))
    assert math.isclose(found.lr_max, 0.01, rel_tol=1e-9)


def test_max_acc_picks_the_highest_accuracy():
    accuracy = 60 - 30 * (np.log10(LRS) - np.log10(0.05)) ** 2
    found = pick_range(synthetic(LRS, bowl(LRS, 0.1), accuracy), LRFinderParams(pick="max_acc"))
    assert math.isclose(found.lr_max, LRS[np.argmax(accuracy)]) and 0.04 < found.lr_max < 0.06


def test_a_curve_that_never_descends_gives_a_clear_error():
    rising = 2.3 + np.linspace(0, 3, 50)
    with pytest.raises(UserError, match="the loss never fell in the LR range test.*Lower lr_finder.start_lr"):
        pick_range(synthetic(LRS[:50], rising), LRFinderParams())


def test_a_sweep_that_is_nan_from_the_start_gives_a_clear_error():
    empty = Curve([], [], [], [], [], "non-finite loss", 0)
    with pytest.raises(UserError, match="non-finite loss at its first step"):
        pick_range(empty, LRFinderParams())


def test_sweep_lr_runs_from_start_to_end():
    exp = LRFinderParams(start_lr=1e-4, end_lr=1.0, num_iter=5, step_mode="exp")
    assert [round(sweep_lr(i, exp), 12) for i in range(5)] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    lin = LRFinderParams(start_lr=0.1, end_lr=0.5, num_iter=5, step_mode="linear")
    assert [round(sweep_lr(i, lin), 12) for i in range(5)] == [0.1, 0.2, 0.3, 0.4, 0.5]


# ---- the sweep itself, on a real model


def learnable_batches(n_batches: int = 1000, seed: int = 0):
    """Endless batches of a separable 10-class problem (class = brightest of 10 channels of noise)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        y = torch.randint(0, 10, (64,), generator=g)
        x = torch.randn(64, 10, generator=g) + 3 * nn.functional.one_hot(y, 10)
        yield x, y


def test_sweep_stops_once_the_loss_diverges_and_records_each_step():
    torch.manual_seed(0)
    model = nn.Linear(10, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    params = LRFinderParams(start_lr=1e-3, end_lr=1e4, num_iter=80)
    curve = range_test(model, optimizer, learnable_batches(), params, progress=False)
    assert curve.stop_reason in ("diverged", "non-finite loss")
    assert 10 < len(curve.lr) < 80
    assert curve.images_seen == 64 * len(curve.lr)
    if curve.stop_reason == "diverged":
        assert curve.smoothed_loss[-1] > 4 * min(curve.smoothed_loss)
    assert curve.lr == [sweep_lr(i, params) for i in range(len(curve.lr))]
    assert min(curve.smoothed_loss) < curve.smoothed_loss[0], "the loss fell before it diverged"
    found = pick_range(curve, params)
    assert params.start_lr < found.lr_max < curve.lr[-1]


def test_smoothing_is_a_bias_corrected_moving_average():
    torch.manual_seed(0)
    model = nn.Linear(10, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    params = LRFinderParams(start_lr=1e-4, end_lr=1e-2, num_iter=20, smooth_beta=0.9)
    curve = range_test(model, optimizer, learnable_batches(), params, progress=False)
    avg = 0.0
    for i, raw in enumerate(curve.loss):
        avg = 0.9 * avg + 0.1 * raw
        assert math.isclose(curve.smoothed_loss[i], avg / (1 - 0.9 ** (i + 1)), rel_tol=1e-12)
    assert curve.smoothed_loss[0] == curve.loss[0]


def test_sweep_stops_at_a_non_finite_loss():
    model = nn.Linear(10, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def poisoned():
        for i, (x, y) in enumerate(learnable_batches()):
            yield (x * float("nan") if i == 7 else x), y

    curve = range_test(model, optimizer, poisoned(), LRFinderParams(num_iter=50), progress=False)
    assert curve.stop_reason == "non-finite loss" and len(curve.lr) == 7


def test_model_and_optimizer_come_back_bit_for_bit():
    torch.manual_seed(0)
    model = CustomResNet(width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(16, 3, 32, 32)
    labels = torch.arange(16) % 10
    for _ in range(2):  # momentum buffers and BN running statistics are not at their initial values
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_optimizer = optimizer.state_dict()
    before_buffers = {k: v["momentum_buffer"].clone() for k, v in before_optimizer["state"].items()}

    batches = ((images + 0.1 * torch.randn_like(images), labels) for _ in range(100))
    curve = range_test(model, optimizer, batches, LRFinderParams(num_iter=12, end_lr=1.0), progress=False)
    assert len(curve.lr) > 1, "the sweep trained the model"

    after = model.state_dict()
    assert after.keys() == before_model.keys()
    for key, value in before_model.items():
        assert torch.equal(after[key], value), key
    state = optimizer.state_dict()
    assert [g["lr"] for g in state["param_groups"]] == [0.01]
    for key, buffer in before_buffers.items():
        assert torch.equal(state["state"][key]["momentum_buffer"], buffer)
    assert not model.training, "train/eval mode restored"


def test_the_range_test_stops_before_its_sweep_when_training_could_not_use_the_batch_size(small_archive):
    path, md5 = small_archive
    params = parse_params({"data": {"url": str(path), "md5": md5}, "model": {"width": 2}, "train": {"batch_size": 700}})
    dataset = data.decode_archive(path, params.data)  # 600 training images
    with pytest.raises(UserError, match="train.batch_size = 700 is more than the 600 training images"):
        lr_finder.find_range(params, dataset, torch.device("cpu"), progress=False)

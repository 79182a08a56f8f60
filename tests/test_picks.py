"""The pick rules of other tools, each on a curve whose answer was worked out by hand from the tool's source."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from onecycle import picks
from onecycle.config import LRFinderParams, parse_params
from onecycle.lr_finder import Curve, pick_range, smooth

LR = np.geomspace(1e-4, 1.0, 41)  # 10 steps per decade: LR[i] = 1e-4 * 10 ** (i / 10)


def sweep(loss, accuracy=None, num_iter: int = 41) -> picks.Sweep:
    loss = np.asarray(loss, float)
    acc = np.full(len(loss), 10.0) if accuracy is None else np.asarray(accuracy, float)
    return picks.Sweep(LR[: len(loss)], loss, loss, acc, acc, num_iter)


def test_every_rule_is_a_valid_pick_and_has_words_for_the_plot():
    for name in picks.NAMES:  # params.yaml takes every rule's name as lr_finder.pick
        assert parse_params({"lr_finder": {"pick": name}}).lr_finder.pick == name
    assert all(rule.words and rule.source for rule in picks.RULES.values())


def test_fastai_valley_is_two_thirds_down_the_longest_fall_with_fastais_indexing():
    # trimmed by num_iter // 10 = 4 at the start and 5 at the end: points 4..35 (32 of them). The loss falls
    # strictly from point 10 to 25 (16 points), rises elsewhere. fastai: lds[25] = 16 + lds of the points before
    # 10 that are higher than all of the fall: none (they are lower), so the longest decreasing run is 10..25,
    # i.e. trimmed indices 6..21: max_end = 21, max_start = 21 - 16 = 5; sections = 16 / 3 = 5.33;
    # idx = 5 + 5 + 2 = 12 -> point 16
    loss = np.concatenate([np.linspace(1.0, 1.5, 10), np.linspace(3.0, 1.5, 16), np.linspace(1.6, 5.0, 15)])
    assert picks.fastai_valley(sweep(loss)) == pytest.approx(LR[16])


def test_fastai_slide_walks_left_until_the_slopes_15_steps_apart_agree():
    # a loss with a constant slope per step everywhere agrees at once: the suggestion is 15 steps before the end
    # of the trimmed curve (point 35), i.e. point 20
    assert picks.fastai_slide(sweep(np.linspace(3.0, 1.0, 41))) == pytest.approx(LR[20])
    # slope -0.01 per step up to point 30, then +0.2: the walk starts with the right end at 35 (slope +0.2) and
    # stops once both ends are on the same side (the left end at 31 or later is not reachable before the right
    # end's slope changes): right end r and left end r - 15 agree when r <= 29 (np.gradient mixes 30 and 31)
    loss = np.concatenate([3.0 - 0.01 * np.arange(31), 2.7 + 0.2 * np.arange(1, 11)])
    found = picks.fastai_slide(sweep(loss))
    r = 29  # the first right end (walking left from 35) whose slope matches the flat part's
    assert found == pytest.approx(LR[r - 15 + 1])


def test_fastai_minimum_and_steep():
    bowl = 2.3 + (np.log10(LR) + 2) ** 2  # lowest at LR 0.01 (point 20)
    assert picks.fastai_minimum(sweep(bowl)) == pytest.approx(LR[20] / 10)
    falling = np.concatenate([np.linspace(3.0, 2.5, 12), [2.0], np.linspace(1.95, 1.5, 28)])  # the big drop: 11->12
    assert picks.fastai_steep(sweep(falling)) == pytest.approx(LR[11])


def test_torch_lr_finder_is_the_steepest_fall_per_step_of_its_own_smoothing():
    # raw loss 2.3, then 1.0 from point 30 on. Its smoothing s = 0.05 raw + 0.95 s: s29 = 2.3, s30 = 2.235,
    # s31 = 2.17325, s32 = 2.1146; np.gradient at 30 is (s31 - s29) / 2 = -0.0634, at 31 (s32 - s30) / 2 = -0.0602,
    # and smaller after: point 30
    raw = np.where(np.arange(41) < 30, 2.3, 1.0)
    assert picks.torch_lr_finder(sweep(raw)) == pytest.approx(LR[30])


def test_torch_lr_finder_stops_where_its_smoothed_loss_passes_5x_its_best():
    # raw 2.0, then 100 at points 20 and 21: its smoothing is 6.9 at 20 and 11.555 > 5 x 2.0 at 21, where it
    # stops; the steep fall after (raw 0.5 from point 22) is never seen. Its window, points 10..16, is flat:
    # np.gradient is 0 everywhere, and argmin takes the first point, 10
    raw = np.concatenate([np.full(20, 2.0), [100.0, 100.0], np.full(19, 0.5)])
    assert picks.torch_lr_finder(sweep(raw)) == pytest.approx(LR[10])


def test_lightning_takes_the_steepest_fall_per_unit_of_lr():
    # raw 3.0, then 1.0 from point 25: its moving average is flat (exactly: bias-corrected, of a constant) up to
    # 24 and falls from 25 on, by a little less each step, while the LR steps grow by 26% each: per unit of LR,
    # the fall is steepest right at the drop. np.gradient's non-uniform central difference at 24 sees half of it
    # (one side flat), at 25 both sides falling: point 25
    raw = np.where(np.arange(41) < 25, 3.0, 1.0)
    assert picks.lightning(sweep(raw)) == pytest.approx(LR[25])
    # and it reads per unit of LR, not per decade: on a loss that falls as fast per decade everywhere, it picks
    # low, where fastai's steep (per decade, on the same smoothing) picks late, where the lag has worn off
    log_linear = 3.0 - 0.3 * np.log10(LR / 1e-4)
    assert picks.lightning(sweep(log_linear)) < 0.01 < picks.fastai_steep(sweep(smooth(log_linear, 0.98)))


def test_lightning_smooths_as_its_callback_does():
    raw = list(np.linspace(3, 1, 41))
    smoothed, avg = [], 0.0
    for i, value in enumerate(raw):
        avg = 0.98 * avg + 0.02 * value
        smoothed.append(avg / (1 - 0.98 ** (i + 2)))  # global_step is i + 1 after the i-th step, then + 1
    # the bias correction one step further on: not the range test's own smoothing
    assert smoothed != pytest.approx(smooth(raw, 0.98))


def test_lowest_loss_lr_finds_the_bottom_between_steps_and_moves_with_it_by_a_little():
    # a parabola in log LR with its bottom at 0.0123, between the steps at 0.01 and 0.0126: the vertex of the
    # three points around the lowest step is the bottom itself, where min_loss can only name a step
    bowl = 2.0 + (np.log(LR) - np.log(0.0123)) ** 2
    assert picks.lowest_loss_lr(sweep(bowl)) == pytest.approx(0.0123, rel=1e-9)
    assert picks.min_loss(sweep(bowl)) == pytest.approx(LR[21])  # 0.0126
    # a rounding-sized change of the lowest point moves the vertex by a rounding-sized factor
    nudged = bowl.copy()
    nudged[21] += 1e-6
    assert picks.lowest_loss_lr(sweep(nudged)) == pytest.approx(0.0123, rel=1e-4)


def test_budget_scales_the_lowest_loss_lr_by_a_power_of_the_training_length_and_stays_in_the_swept_range():
    bowl = 2.0 + (np.log(LR) - np.log(0.01)) ** 2
    at_reference = picks.Sweep(LR, bowl, bowl, bowl, bowl, num_iter=41, train_steps=picks.BUDGET_REFERENCE_STEPS)
    assert picks.budget(at_reference) == pytest.approx(0.01)  # the lowest loss's LR itself
    # an 8x longer training: 8 ** power x the LR; an 8x shorter one, 8 ** -power (the fitted constants)
    for factor in (8, 1 / 8):
        s = dataclasses.replace(at_reference, train_steps=picks.BUDGET_REFERENCE_STEPS * factor)
        assert picks.budget(s) == pytest.approx(0.01 * factor**picks.BUDGET_POWER)
        assert (picks.budget(s) > 0.01) == (factor > 1), "a longer training, a higher LRMAX"
    # a training long enough for 10x the sweep's last LR, whatever the fitted constants
    steps = round(picks.BUDGET_REFERENCE_STEPS * (10 * LR[-1] / 0.01) ** (1 / picks.BUDGET_POWER))
    long = picks.Sweep(LR, bowl, bowl, bowl, bowl, num_iter=41, train_steps=steps)
    assert picks.budget(long) == LR[-1]  # never past the LRs the sweep tried
    assert picks.budget(picks.Sweep(LR, bowl, bowl, bowl, bowl, num_iter=41)) is None  # the length unknown


def test_pick_range_passes_the_training_length_and_falls_back_to_min_loss_without_it():
    bowl = 2.0 + (np.log(LR) - np.log(0.01)) ** 2
    curve = Curve(list(LR), list(bowl), list(bowl), [10.0] * 41, [10.0] * 41, "finished", 0)
    params = LRFinderParams(num_iter=41, min_div=10, pick="budget")
    found = pick_range(curve, params, train_steps=picks.BUDGET_REFERENCE_STEPS)
    assert found.lr_max == pytest.approx(0.01) and found.lr_min == found.lr_max / 10
    assert found.pick == "budget" and found.note == ""
    unknown = pick_range(curve, params)
    assert unknown.lr_max == pytest.approx(0.01) and "budget found nothing" in unknown.note


def test_fine_reads_the_fine_sweeps_alone_and_finds_nothing_without_one():
    lr = np.geomspace(1e-4, 1, 60)
    coarse = picks.Sweep(lr, lr * 0, (np.log10(lr) + 2) ** 2, lr * 0, lr * 0, 60, 100)
    assert picks.fine_lowest(coarse) is None
    fine_lr = np.geomspace(1e-3, 1e-1, 48)
    fine = picks.Sweep(fine_lr, fine_lr * 0, (np.log10(fine_lr) + 1.5) ** 2, fine_lr * 0, fine_lr * 0, 48)
    both = dataclasses.replace(coarse, fine=fine)
    assert picks.fine_lowest(both) == pytest.approx(picks.lowest_loss_lr(fine) * picks.FINE_SCALE, rel=1e-12)
    assert picks.lowest_loss_lr(fine) == pytest.approx(10**-1.5, rel=1e-3), "the fine curve's lowest, not the coarse"
    second = dataclasses.replace(fine, smoothed_loss=(np.log10(fine_lr) + 2.5) ** 2)  # its lowest at 10**-2.5
    two = dataclasses.replace(coarse, fine=dataclasses.replace(fine, fine=second))
    assert picks.fine_lowest_mean(two) == pytest.approx(10**-2, rel=1e-3), "the rounds' geometric mean"
    assert picks.fine_lowest(two) == pytest.approx(picks.fine_lowest_mean(two) * picks.FINE_SCALE, rel=1e-12)
    assert picks.RULES["fine"].needs_fine and not picks.RULES["budget"].needs_fine

"""The rules that read LRMAX off an LR range test's curve, side by side (as fastai keeps its suggestion functions).

Each rule is a pure function of the sweep (`Sweep`: the LR, raw and smoothed loss and batch accuracy of each
step, and the planned number of steps), returning an LR, or None where the curve shows it nothing. `RULES`
names them for `lr_finder.pick` (config.py), the range-test plot and the benchmark (docs/lr-finder.md); a new
rule is one function and one entry.

The rules of other tools are re-implemented from their sources, on this project's sweep (its LRs, its stop):
- fastai's `valley`, `slide`, `minimum` and `steep` (fastai/callback/schedule.py): on the smoothed loss
  (fastai's Recorder keeps the same bias-corrected moving average, beta 0.98), trimmed as `Learner.lr_find`
  trims it (the first num_iter // 10 steps and the last 5);
- torch-lr-finder's suggestion (davidtvs/pytorch-lr-finder, `LRFinder.plot`): its own smoothing of the raw
  loss (0.05 of each new loss, not bias-corrected), its stop at 5x the best, trimmed by 10 and 5 steps, the
  steepest fall per step;
- Lightning's `_LRFinder.suggestion()` (lightning/pytorch/tuner/lr_finder.py): its moving average (beta 0.98,
  corrected one step further on), its stop at 4x the best after step 1, trimmed by 10 and 1, the steepest
  fall per unit of LR (not of log LR).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Width of the Gaussian that smooths the batch accuracy over log10(LR), in decades (a factor 10**0.15 = 1.41
# in LR either way). It has no lag, so a pick does not move with the sweep's length or smooth_beta, and it is
# scale-free in LR.
ACC_SMOOTH_DECADES = 0.15


@dataclass(frozen=True)
class Sweep:
    lr: np.ndarray  # each step's LR, rising
    loss: np.ndarray  # each step's batch loss, raw
    smoothed_loss: np.ndarray  # its bias-corrected moving average (lr_finder.smooth_beta)
    accuracy: np.ndarray  # each step's batch accuracy before the step, percent
    smoothed_accuracy: np.ndarray  # its moving average, as the loss's
    num_iter: int  # the steps the sweep was to take (it may have stopped earlier, on divergence)
    train_steps: int | None = None  # optimizer steps of the training the range serves (None: unknown)
    fine: Sweep | None = None  # the fine sweep around this one (lr_finder.fine_sweep), for a rule that reads it


@dataclass(frozen=True)
class Rule:
    pick: Callable[[Sweep], float | None]
    words: str  # for the range-test plot's title
    source: str  # where the rule comes from
    needs_fine: bool = False  # it reads Sweep.fine: the range test runs the fine sweep for it


def smooth_over_log_lr(lr: np.ndarray, values: np.ndarray, decades: float) -> np.ndarray:
    """`values` averaged with a Gaussian of `decades` standard deviation over log10(LR): centred, so no lag."""
    x = np.log10(lr)
    weights = np.exp(-0.5 * ((x[:, None] - x[None, :]) / decades) ** 2)
    return weights @ values / weights.sum(axis=1)


def min_loss(s: Sweep) -> float:
    # Smith's upper bound: the LR where the loss stops falling. The smoothing lags, so its lowest point sits a
    # little past the raw curve's: still below where the loss blows up.
    return float(s.lr[np.argmin(s.smoothed_loss)])


def min_loss_div10(s: Sweep) -> float:
    return min_loss(s) / 10  # a tenth of the LR at the lowest loss: still falling fast, not yet unstable


def steepest(s: Sweep) -> float:
    """The steepest fall of the smoothed loss against log LR, before its lowest point."""
    best = int(np.argmin(s.smoothed_loss))
    if best < 1:
        return float(s.lr[0])
    slope = np.gradient(s.smoothed_loss[: best + 1], np.log(s.lr[: best + 1]))
    return float(s.lr[int(np.argmin(slope))])


def max_acc(s: Sweep) -> float | None:
    """The reference run's rule: the LR of the highest smoothed batch accuracy; None if it never rose."""
    top = int(np.argmax(s.smoothed_accuracy))
    return None if top == 0 else float(s.lr[top])


def accuracy_drop_lr(lr: np.ndarray, accuracy: np.ndarray, decades: float = ACC_SMOOTH_DECADES) -> float | None:
    """The upper half-maximum point of the batch accuracy smoothed over log LR: the highest LR at which it still
    held half of its gain from the start of the sweep to its peak (above it, it never does again). Linear in log
    LR between the two steps around the crossing, so a small change of the curve moves the pick a little, never
    a whole step. None when the accuracy never rose, or was still above half its gain at the end of the sweep."""
    smooth = smooth_over_log_lr(lr, accuracy, decades)
    top = int(np.argmax(smooth))
    level = (smooth[top] + smooth[0]) / 2
    above = np.flatnonzero(smooth > level)  # none when the accuracy never rose (flat, to rounding, or falling)
    if top == 0 or len(above) == 0 or above[-1] == len(lr) - 1:
        return None
    i = int(above[-1])  # the last step above half
    x0, x1 = np.log10(lr[i]), np.log10(lr[i + 1])
    t = (smooth[i] - level) / (smooth[i] - smooth[i + 1])
    return float(10 ** (x0 + t * (x1 - x0)))


def acc_drop(s: Sweep) -> float | None:
    return accuracy_drop_lr(s.lr, s.accuracy)


# Fitted on the LR-finder benchmark's trained grids (docs/lr-finder.md): the best LRMAX over the lowest loss's LR
# grows with the length of the training the range serves, in optimizer steps, as (steps / reference) ** power.
# A long run can afford a peak above the LR where the sweep's fresh network stopped improving (it has the steps to
# settle after it); a short one wants less. Neither the warm-up's length nor the sweep's own fitted as well.
# FINE_SCALE, the `fine` rule's one constant, is the mean over the settings of log(best LRMAX / the fine sweeps'
# lowest-loss LRs' geometric mean). The lines between the marks are written by `python -m research.lr_report fit`
# from the committed results (a test checks that they are what it gives); never by hand.
# fit:begin
BUDGET_REFERENCE_STEPS = 1753221.7  # the training length at which LRMAX is the lowest loss's LR itself
BUDGET_POWER = 0.0845
FINE_SCALE = 0.4513  # LRMAX over the fine sweeps' lowest-loss LRs' geometric mean
# fit:end


def lowest_loss_lr(s: Sweep) -> float:
    """The LR of the smoothed loss's lowest point, between the sweep's steps: the vertex of the parabola through
    the lowest step and its two neighbours (in log LR). A rounding-sized change of the curve moves it a little,
    where min_loss jumps a whole step."""
    i = int(np.argmin(s.smoothed_loss))
    if i == 0 or i == len(s.lr) - 1:
        return float(s.lr[i])
    x, y = np.log(s.lr[i - 1 : i + 2]), s.smoothed_loss[i - 1 : i + 2]
    curvature = (y[2] - y[1]) / (x[2] - x[1]) - (y[1] - y[0]) / (x[1] - x[0])
    if curvature <= 0:
        return float(s.lr[i])
    # the vertex of the parabola through the three points, which lies between x[0] and x[2]
    vertex = (x[1] + x[2]) / 2 - (y[2] - y[1]) / (x[2] - x[1]) * (x[2] - x[0]) / (2 * curvature)
    return float(np.exp(np.clip(vertex, x[0], x[2])))


def budget(s: Sweep) -> float | None:
    """The lowest loss's LR (lowest_loss_lr) times (training steps / BUDGET_REFERENCE_STEPS) ** BUDGET_POWER,
    kept inside the LRs the sweep tried; None when the training's length is unknown."""
    if not s.train_steps:
        return None
    lr = lowest_loss_lr(s) * (s.train_steps / BUDGET_REFERENCE_STEPS) ** BUDGET_POWER
    return float(np.clip(lr, s.lr[0], s.lr[-1]))


def fine_rounds(s: Sweep) -> list[Sweep]:
    """The fine sweeps under `s` (s.fine, s.fine.fine, ...), first to last."""
    rounds = []
    while s.fine is not None:
        s = s.fine
        rounds.append(s)
    return rounds


def fine_lowest_mean(s: Sweep) -> float | None:
    """The geometric mean of the fine sweeps' lowest-loss LRs (lowest_loss_lr); None without a fine sweep."""
    rounds = fine_rounds(s)
    return float(np.exp(np.mean(np.log([lowest_loss_lr(r) for r in rounds])))) if rounds else None


def fine_lowest(s: Sweep) -> float | None:
    """The fine sweeps' lowest losses (fine_lowest_mean) times FINE_SCALE, kept inside the LRs they tried; None
    without a fine sweep. The fine sweeps' design is the project's (lr_finder.FINE_*), so the user's sweep knobs
    reach the pick only through where the first one's window lies: a longer, shorter, wider or lower sweep moves
    it less than it moves the user's own sweep's lowest loss (docs/lr-finder.md, the knob tables)."""
    rounds = fine_rounds(s)
    if not rounds:
        return None
    low, high = min(r.lr[0] for r in rounds), max(r.lr[-1] for r in rounds)
    return float(np.clip(fine_lowest_mean(s) * FINE_SCALE, low, high))


# --- other tools' rules, each as its source computes it ---


def _fastai_points(s: Sweep) -> tuple[np.ndarray, np.ndarray]:
    return s.lr[s.num_iter // 10 : -5], s.smoothed_loss[s.num_iter // 10 : -5]


def fastai_valley(s: Sweep) -> float | None:
    """fastai's default: two thirds of the way down the longest falling stretch of the smoothed loss (the
    longest decreasing subsequence, found in O(n^2) as fastai finds it)."""
    lrs, losses = _fastai_points(s)
    n = len(losses)
    if n < 2:
        return None
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


def fastai_slide(s: Sweep, lr_diff: int = 15, thresh: float = 0.005) -> float | None:
    """fastai's interval slide: from the end, walk left until the loss's slope per step 15 steps apart differs by
    at most 0.005."""
    lrs, losses = _fastai_points(s)
    if len(losses) <= lr_diff:
        return None
    grad = np.gradient(losses)
    r, left = -1, -1 - lr_diff
    found = lrs[left]
    while left >= -len(losses) and abs(grad[r] - grad[left]) > thresh:
        found = lrs[left]
        r -= 1
        left -= 1
    return float(found)


def fastai_minimum(s: Sweep) -> float | None:
    lrs, losses = _fastai_points(s)
    return float(lrs[np.argmin(losses)]) / 10 if len(losses) else None


def fastai_steep(s: Sweep) -> float | None:
    lrs, losses = _fastai_points(s)
    if len(losses) < 2:
        return None
    grads = np.diff(losses) / np.diff(np.log(lrs))
    return float(lrs[np.argmin(grads)])


def torch_lr_finder(s: Sweep) -> float | None:
    """torch-lr-finder's suggestion: the steepest fall per step of its own smoothed loss, trimmed 10 and 5."""
    smoothed: list[float] = []
    best = np.inf
    for i, raw in enumerate(s.loss):
        value = raw if i == 0 else 0.05 * raw + 0.95 * smoothed[-1]
        best = min(best, value)
        smoothed.append(value)
        if value > 5 * best:  # its stop: the diverging step is kept, then the sweep ends
            break
    losses = np.asarray(smoothed[10:-5])
    if len(losses) < 2:
        return None
    return float(s.lr[10 + int(np.argmin(np.gradient(losses)))])


def lightning(s: Sweep, beta: float = 0.98) -> float | None:
    """Lightning's suggestion: the steepest fall per unit of LR of its moving average, trimmed 10 and 1."""
    smoothed: list[float] = []
    avg, best = 0.0, 0.0
    for i, raw in enumerate(s.loss):
        step = i + 1  # trainer.global_step after the i-th optimizer step
        avg = beta * avg + (1 - beta) * raw
        value = avg / (1 - beta ** (step + 1))
        stop = step > 1 and value > 4 * best
        if value < best or step == 1:
            best = value
        smoothed.append(value)
        if stop:
            break
    losses, lrs = np.asarray(smoothed[10:-1]), s.lr[10 : len(smoothed) - 1]
    if len(losses) < 2:
        return None
    return float(lrs[int(np.argmin(np.gradient(losses, lrs)))])


RULES: dict[str, Rule] = {
    "min_loss": Rule(min_loss, "the LR at the lowest loss", "Smith 2017"),
    "min_loss_div10": Rule(min_loss_div10, "a tenth of the LR at the lowest loss", "fastai v1's lr_min"),
    "steepest": Rule(steepest, "steepest fall of the loss", "this project"),
    "max_acc": Rule(max_acc, "highest accuracy", "the reference run"),
    "acc_drop": Rule(acc_drop, "where the batch accuracy has lost half its gain", "this project"),
    "budget": Rule(
        budget, "the lowest loss's LR, scaled by the training's length", "this project (the LR-finder benchmark)"
    ),
    "fine": Rule(
        fine_lowest,
        "the fine sweeps' lowest losses, scaled",
        "this project (the LR-finder benchmark)",
        needs_fine=True,
    ),
    "fastai_valley": Rule(fastai_valley, "fastai's valley", "fastai callback/schedule.py"),
    "fastai_slide": Rule(fastai_slide, "fastai's slide", "fastai callback/schedule.py"),
    "fastai_minimum": Rule(fastai_minimum, "fastai's minimum (a tenth of it)", "fastai callback/schedule.py"),
    "fastai_steep": Rule(fastai_steep, "fastai's steep", "fastai callback/schedule.py"),
    "torch_lr_finder": Rule(torch_lr_finder, "torch-lr-finder's steepest gradient", "torch_lr_finder/lr_finder.py"),
    "lightning": Rule(lightning, "Lightning's suggestion", "lightning/pytorch/tuner/lr_finder.py"),
}
NAMES = tuple(RULES)

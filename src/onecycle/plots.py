"""The report pictures: one function per picture, each taking plain data and returning a Figure.

Figures are built with `matplotlib.figure.Figure` directly, never pyplot: no global figure state, no GUI
backend, nothing to close. `save` writes a PNG that is the same bytes for the same data (fixed dpi, no
software/date metadata) and replaces the old file in one step.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from onecycle import outputs, picks
from onecycle.schedules import triangular_lr

DPI = 110  # pixels per inch of every saved PNG: 8 x 5 inches -> 880 x 550 pixels
SIZE = (8.0, 5.0)  # inches, width x height of the line plots

# Read when the artists are created, so each figure carries them whatever the caller's rcParams are.
STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "legend.framealpha": 0.9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.8,
}

TRAIN_COLOR, TEST_COLOR = "tab:blue", "tab:orange"
LR_COLOR, MOMENTUM_COLOR = "tab:blue", "tab:green"
BOUND_COLOR = "tab:red"  # LRMIN / LRMAX lines


def _styled(build: Callable[..., Figure]) -> Callable[..., Figure]:
    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(STYLE):
            return build(*args, **kwargs)

    return wrapper


def _figure(size: tuple[float, float] = SIZE) -> Figure:
    # constrained layout: labels, legends and twin axes never overlap or get cut off
    return Figure(figsize=size, dpi=DPI, layout="constrained")


def save(fig: Figure, path: str | Path) -> None:
    """Write `fig` as a PNG at `path`: same figure, same bytes; a kill leaves the old file or the new one."""
    buffer = io.BytesIO()
    # metadata Software None: no matplotlib version in the file; PNG has no date unless one is given
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    outputs.write_bytes(Path(path), buffer.getvalue())


@_styled
def cyclic_lr(lr_min: float, lr_max: float, step_size: int, total_steps: int) -> Figure:
    """The triangular cyclic LR (Smith 2015) at every optimizer step, between the dashed LRMIN and LRMAX."""
    steps = np.arange(total_steps)
    lrs = [triangular_lr(int(s), step_size=step_size, lr_min=lr_min, lr_max=lr_max) for s in steps]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, lrs, color=LR_COLOR, label="learning rate")
    ax.axhline(lr_max, color=BOUND_COLOR, linestyle="--", linewidth=1.2, label=f"LRMAX = {lr_max:.3g}")
    ax.axhline(lr_min, color="tab:purple", linestyle="--", linewidth=1.2, label=f"LRMIN = {lr_min:.3g}")
    span = lr_max - lr_min
    ax.set_ylim(max(0.0, lr_min - 0.08 * span), lr_max + 0.2 * span)  # headroom for the legend
    ax.set_xlim(0, max(total_steps - 1, 1))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"Triangular cyclic LR: step size {step_size} steps (one cycle = {2 * step_size} steps)")
    ax.legend(loc="upper right", ncols=3)
    return fig


def _loss_limits(smoothed: np.ndarray, raw: np.ndarray) -> tuple[float, float]:
    """y range that keeps the descent readable: the end-of-sweep blow-up is cut at 1.5 x the starting loss."""
    values = np.concatenate([smoothed, raw])
    values = values[np.isfinite(values)]
    top = min(float(values.max()), 1.5 * float(smoothed[0]))
    bottom = float(values.min())
    margin = 0.05 * (top - bottom) or 0.05 * abs(top) or 0.1
    return bottom - margin, top + margin


@_styled
def lr_range(
    lr: Sequence[float],
    smoothed_loss: Sequence[float],
    loss: Sequence[float],
    lr_min: float,
    lr_max: float,
    pick: str,
    accuracy: Sequence[float] | None = None,
    fine: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
) -> Figure:
    """The LR range test: loss against LR (log scale), the found LRMIN and LRMAX, and optionally accuracy.

    `accuracy` is the smoothed batch accuracy in percent, one value per step, drawn on a second y axis. `fine`:
    each fine sweep's LRs and smoothed loss, when the pick read them.
    """
    lr_a = np.asarray(lr, dtype=float)
    smooth = np.asarray(smoothed_loss, dtype=float)
    raw = np.asarray(loss, dtype=float)
    fig = _figure((8.0, 5.6))  # the legend goes below the axes, where no curve can hide under it
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.plot(lr_a, raw, color="tab:blue", alpha=0.3, linewidth=1.0, label="loss (per batch)")
    ax.plot(lr_a, smooth, color="tab:blue", linewidth=2.4, label="smoothed loss")
    best = int(np.nanargmin(smooth))
    ax.plot(
        lr_a[best],
        smooth[best],
        "o",
        color="tab:blue",
        markersize=7,
        label=f"lowest: {smooth[best]:.3f} at LR {lr_a[best]:.3g}",
    )
    for i, (fine_lr, fine_loss) in enumerate(fine, 1):  # orange, the later rounds darker
        color = ("tab:orange", "saddlebrown", "black")[min(i, 3) - 1]
        ax.plot(fine_lr, fine_loss, color=color, linewidth=2.0, label=f"fine sweep {i}: smoothed loss")
    ax.axvline(lr_min, color="tab:purple", linestyle="--", linewidth=1.4, label=f"LRMIN = {lr_min:.3g}")
    ax.axvline(lr_max, color=BOUND_COLOR, linestyle="--", linewidth=1.4, label=f"LRMAX = {lr_max:.3g}")
    ax.set_ylim(*_loss_limits(smooth, raw))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (cross-entropy)")
    handles, labels = ax.get_legend_handles_labels()
    if accuracy is not None:
        acc_ax = ax.twinx()
        acc_ax.grid(False)  # one grid (the loss axis') is enough
        acc_ax.spines["right"].set_visible(True)
        acc_ax.plot(lr_a, accuracy, color="tab:green", linewidth=1.8, label="smoothed accuracy")
        acc_ax.set_ylabel("batch accuracy (%)", color="tab:green")
        acc_ax.tick_params(axis="y", colors="tab:green")
        acc_ax.set_ylim(0, min(100.0, max(float(np.nanmax(accuracy)) * 1.15, 10.0)))
        more_handles, more_labels = acc_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    fig.legend(handles, labels, loc="outside lower center", ncols=3)
    words = picks.RULES[pick].words if pick in picks.RULES else pick
    ax.set_title(f"LR range test: LRMAX {lr_max:.3g} ({words}), LRMIN {lr_min:.3g}")
    return fig


@_styled
def one_cycle(lr: Sequence[float], momentum: Sequence[float], steps_per_epoch: int, peak_epoch: int) -> Figure:
    """LR (top) and momentum (bottom) of every optimizer step of the One Cycle Policy, against epochs.

    Step s (0-based) ends at epoch (s + 1) / steps_per_epoch, so the peak, the last step of epoch
    `peak_epoch`, sits exactly on x = peak_epoch.
    """
    lr_a = np.asarray(lr, dtype=float)
    mom = np.asarray(momentum, dtype=float)
    epochs_x = (np.arange(len(lr_a)) + 1) / steps_per_epoch
    total_epochs = len(lr_a) / steps_per_epoch
    fig = _figure((8.0, 6.0))
    lr_ax, mom_ax = fig.subplots(2, 1, sharex=True)
    lr_ax.plot(epochs_x, lr_a, color=LR_COLOR, label=f"LR: {lr_a[0]:.3g} → {lr_a.max():.3g} → {lr_a[-1]:.3g}")
    mom_ax.plot(epochs_x, mom, color=MOMENTUM_COLOR, label=f"momentum: {mom[0]:.3g} → {mom.min():.3g} → {mom[-1]:.3g}")
    for ax in (lr_ax, mom_ax):
        ax.axvline(peak_epoch, color="gray", linestyle=":", linewidth=1.6, label=f"peak: end of epoch {peak_epoch}")
        ax.legend(loc="upper right")
    lr_ax.set_ylabel("learning rate")
    mom_ax.set_ylabel("momentum")
    span = lr_a.max() - lr_a.min()
    lr_ax.set_ylim(lr_a.min() - 0.05 * span, lr_a.max() + 0.3 * span)  # headroom for the legend
    mom_span = mom.max() - mom.min()
    mom_ax.set_ylim(mom.min() - 0.05 * mom_span, mom.max() + 0.3 * mom_span)
    mom_ax.set_xlabel("epoch")
    mom_ax.set_xlim(0, total_epochs)
    mom_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_ax.set_title(
        f"One Cycle Policy: {total_epochs:g} epochs of {steps_per_epoch} steps, LR peaks at epoch {peak_epoch}"
    )
    return fig


History = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]


def _history_columns(history: History, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of `history`, given as rows (dicts, e.g. from csv.DictReader) or as columns, as float arrays."""
    if isinstance(history, Mapping):
        return {name: np.asarray(history[name], dtype=float) for name in names}
    return {name: np.asarray([row[name] for row in history], dtype=float) for name in names}


def _per_epoch(history: History, what: str, ylabel: str) -> tuple[Figure, Any, dict[str, np.ndarray]]:
    cols = _history_columns(history, ("epoch", f"train_{what}", f"test_{what}"))
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(cols["epoch"], cols[f"train_{what}"], "o-", color=TRAIN_COLOR, markersize=4, label="train")
    ax.plot(cols["epoch"], cols[f"test_{what}"], "s-", color=TEST_COLOR, markersize=4, label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax, cols


@_styled
def accuracy(history: History) -> Figure:
    """Train and test accuracy per epoch (percent), the final test accuracy written at its point."""
    fig, ax, cols = _per_epoch(history, "acc", "accuracy (%)")
    epochs, test = cols["epoch"], cols["test_acc"]
    final, best = float(test[-1]), int(np.argmax(test))
    # The text sits in the lower right of the axes, above the legend: accuracy curves rise from the lower left
    # to the upper right, so that corner stays clear whichever of train and test ends higher.
    ax.annotate(
        f"final test {final:.2f}%",
        xy=(epochs[-1], final),
        xytext=(0.97, 0.5),
        textcoords="axes fraction",
        ha="right",
        fontsize=11,
        fontweight="bold",
        color=TEST_COLOR,
        arrowprops={"arrowstyle": "->", "color": TEST_COLOR},
    )
    ax.legend(loc="lower right")
    ax.set_title(f"Accuracy per epoch: final test {final:.2f}% (best {test[best]:.2f}% at epoch {epochs[best]:g})")
    return fig


@_styled
def loss(history: History) -> Figure:
    """Train and test loss per epoch (mean cross-entropy per image)."""
    fig, ax, cols = _per_epoch(history, "loss", "loss (mean cross-entropy per image)")
    ax.legend(loc="upper right")
    ax.set_title(f"Loss per epoch: final train {cols['train_loss'][-1]:.3f}, test {cols['test_loss'][-1]:.3f}")
    return fig


def _grid_shape(count: int, n: int) -> tuple[int, int]:
    """(rows, columns): as square as n allows (5 x 5 for 25), only as many rows as `count` images need."""
    cols = min(count, math.ceil(math.sqrt(n)))
    return math.ceil(count / cols), cols


@_styled
def misclassified(
    images: np.ndarray, true: Sequence[int], pred: Sequence[int], classes: Sequence[str], n: int = 25
) -> Figure:
    """The first `n` test images (in test-set order) the model gets wrong, each titled with both classes.

    images: uint8 (N, H, W, 3); true, pred: class indices, one per image.
    """
    true_a, pred_a = np.asarray(true), np.asarray(pred)
    wrong = np.flatnonzero(true_a != pred_a)
    total = len(true_a)
    shown = wrong[:n]
    if len(shown) == 0:
        fig = _figure((6.0, 2.5))
        fig.text(
            0.5,
            0.5,
            f"No misclassified test images:\nall {total} are predicted correctly.",
            ha="center",
            va="center",
            fontsize=14,
        )
        fig.suptitle("Misclassified test images")
        return fig
    rows, cols = _grid_shape(len(shown), n)
    # 1.7 inches per image: 32-pixel images at about 5 screen pixels each, room for a two-line title
    fig = _figure((1.7 * cols + 0.3, 1.95 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, shown, strict=False):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(f"true: {classes[true_a[i]]}\npred: {classes[pred_a[i]]}", fontsize=9, linespacing=1.2)
    which = f"the first {len(shown)} of {len(wrong)}" if len(shown) < len(wrong) else f"all {len(wrong)}"
    fig.suptitle(f"Misclassified test images: {which} wrong ({100 * len(wrong) / total:.2f}% of {total})", fontsize=12)
    return fig


def confusion_counts(true: Sequence[int], pred: Sequence[int], num_classes: int) -> np.ndarray:
    """counts[t, p] = number of images of true class t predicted as class p."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(true), np.asarray(pred)), 1)
    return counts


@_styled
def confusion_matrix(true: Sequence[int], pred: Sequence[int], classes: Sequence[str]) -> Figure:
    """Counts of true class (rows) against predicted class (columns), each written in its cell."""
    k = len(classes)
    counts = confusion_counts(true, pred, k)
    total = int(counts.sum())
    correct = int(np.trace(counts))
    fig = _figure((8.0, 7.0))
    ax = fig.add_subplot()
    ax.grid(False)
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest", vmin=0)
    colorbar = fig.colorbar(image, ax=ax, shrink=0.85)
    colorbar.set_label("images")
    threshold = counts.max() / 2  # white text on the dark cells, black on the light ones
    for t in range(k):
        for p in range(k):
            ax.text(
                p,
                t,
                str(counts[t, p]),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if counts[t, p] > threshold else "black",
            )
    ax.set_xticks(range(k), classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy_pct = 100 * correct / total if total else 0.0
    ax.set_title(f"Confusion matrix: accuracy {accuracy_pct:.2f}% ({correct} of {total} test images)")
    return fig

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from matplotlib.figure import Figure

from onecycle import plots
from onecycle.schedules import triangular_lr
from onecycle.training import HISTORY_COLUMNS

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _line(ax, label_start: str):
    """The one line of `ax` whose legend label starts with `label_start`."""
    found = [line for line in ax.get_lines() if line.get_label().startswith(label_start)]
    assert len(found) == 1, [line.get_label() for line in ax.get_lines()]
    return found[0]


def _history(epochs: int = 6) -> list[dict]:
    e = np.arange(1, epochs + 1)
    columns = {
        "epoch": e,
        "lr": np.full(epochs, 0.01),
        "momentum": np.full(epochs, 0.9),
        "train_loss": 2.0 / e,
        "train_acc": 40 + 8 * e,
        "test_loss": 1.8 / e + 0.1,
        "test_acc": 45 + 7 * e + 0.4,
        "seconds": np.full(epochs, 12.5),
    }
    return [{c: columns[c][i].item() for c in HISTORY_COLUMNS} for i in range(epochs)]


def test_cyclic_lr_draws_the_triangle_between_dashed_bounds():
    fig = plots.cyclic_lr(0.002, 0.02, step_size=10, total_steps=45)
    ax = fig.axes[0]
    lr = _line(ax, "learning rate")
    assert list(lr.get_xdata()) == list(range(45))
    expected = [triangular_lr(s, step_size=10, lr_min=0.002, lr_max=0.02) for s in range(45)]
    assert np.allclose(lr.get_ydata(), expected)
    for name, value in (("LRMIN", 0.002), ("LRMAX", 0.02)):
        bound = _line(ax, name)
        assert bound.get_linestyle() == "--"
        assert list(bound.get_ydata()) == [value, value]  # a horizontal line at the bound
        assert f"{value:g}" in bound.get_label()
    assert ax.get_xlabel() == "optimizer step"
    assert ax.get_ylabel() == "learning rate"
    assert "step size 10" in ax.get_title()


def _range_curve(n: int = 60):
    """An exponential sweep whose loss falls from 2.3, bottoms out, then blows up to 50."""
    lr = 1e-4 * 1e5 ** (np.arange(n) / (n - 1))
    x = np.log10(lr)
    loss = 2.3 - 0.8 / (1 + np.exp(-(x + 2) * 3)) + np.where(x > -0.5, 50 * (x + 0.5) ** 2, 0)
    return lr, loss, loss + 0.05 * np.sin(np.arange(n))


def test_lr_range_marks_the_found_range_on_a_log_axis_and_clips_the_blow_up():
    lr, smoothed, raw = _range_curve()
    fig = plots.lr_range(lr, smoothed, raw, 0.003, 0.03, "min_loss_div10")
    (ax,) = fig.axes  # no accuracy given: no second axis
    assert ax.get_xscale() == "log"
    assert np.allclose(_line(ax, "smoothed loss").get_ydata(), smoothed)
    assert np.allclose(_line(ax, "loss (per batch)").get_ydata(), raw)
    for name, value in (("LRMIN", 0.003), ("LRMAX", 0.03)):
        bound = _line(ax, name)
        assert list(bound.get_xdata()) == [value, value]  # a vertical line at the bound
        assert f"{value:g}" in bound.get_label()
    # the loss reaches 50 at the end of the sweep; the axis stops near 1.5 x the starting loss
    bottom, top = ax.get_ylim()
    assert 1.5 * smoothed[0] <= top < 1.7 * smoothed[0]
    assert bottom <= smoothed.min()
    assert "0.03" in ax.get_title() and "0.003" in ax.get_title()
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("LRMAX = 0.03") for t in legend_texts)


def test_lr_range_with_accuracy_adds_a_second_y_axis():
    lr, smoothed, raw = _range_curve()
    accuracy = np.linspace(10, 45, len(lr))
    fig = plots.lr_range(lr, smoothed, raw, 0.003, 0.03, "max_acc", accuracy=accuracy)
    loss_ax, acc_ax = fig.axes
    assert "accuracy" in acc_ax.get_ylabel()
    assert np.allclose(_line(acc_ax, "smoothed accuracy").get_ydata(), accuracy)
    assert "smoothed accuracy" in [t.get_text() for t in fig.legends[0].get_texts()]  # one legend for both axes


def test_one_cycle_puts_the_peak_marker_at_the_end_of_peak_epoch():
    steps_per_epoch, epochs, peak_epoch = 4, 6, 2
    peak_step = peak_epoch * steps_per_epoch - 1
    total = epochs * steps_per_epoch
    lr = [
        0.01 + 0.09 * (s / peak_step if s <= peak_step else (total - 1 - s) / (total - 1 - peak_step))
        for s in range(total)
    ]
    momentum = [0.95 - (x - 0.01) / 0.09 * 0.1 for x in lr]
    fig = plots.one_cycle(lr, momentum, steps_per_epoch, peak_epoch)
    lr_ax, mom_ax = fig.axes
    lr_line = _line(lr_ax, "LR")
    x = lr_line.get_xdata()
    assert x[-1] == epochs  # x is in epochs: the last step ends the last epoch
    assert x[int(np.argmax(lr_line.get_ydata()))] == peak_epoch  # the LR's maximum sits on the peak epoch
    assert np.allclose(_line(mom_ax, "momentum").get_ydata(), momentum)
    for ax in (lr_ax, mom_ax):
        marker = _line(ax, "peak")
        assert list(marker.get_xdata()) == [peak_epoch, peak_epoch]
        assert f"epoch {peak_epoch}" in marker.get_label()
    assert lr_ax.get_ylabel() == "learning rate"
    assert mom_ax.get_ylabel() == "momentum"
    assert mom_ax.get_xlabel() == "epoch"


def test_accuracy_plots_train_and_test_and_writes_the_final_test_accuracy():
    history = _history()
    fig = plots.accuracy(history)
    ax = fig.axes[0]
    assert list(_line(ax, "train").get_ydata()) == [r["train_acc"] for r in history]
    assert list(_line(ax, "test").get_ydata()) == [r["test_acc"] for r in history]
    assert list(_line(ax, "test").get_xdata()) == [1, 2, 3, 4, 5, 6]
    final = f"{history[-1]['test_acc']:.2f}%"
    assert any(final in t.get_text() for t in ax.texts)  # the annotation at the last point
    assert final in ax.get_title()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "accuracy (%)")


def test_loss_accepts_rows_read_from_history_csv_and_columns():
    history = _history()
    text = io.StringIO()
    writer = csv.DictWriter(text, HISTORY_COLUMNS)
    writer.writeheader()
    writer.writerows(history)
    rows = list(csv.DictReader(io.StringIO(text.getvalue())))  # every value a string, as the stage reads it
    columns = {c: [r[c] for r in history] for c in HISTORY_COLUMNS}
    for given in (rows, columns):
        ax = plots.loss(given).axes[0]
        assert np.allclose(_line(ax, "train").get_ydata(), [r["train_loss"] for r in history])
        assert np.allclose(_line(ax, "test").get_ydata(), [r["test_loss"] for r in history])
        assert ax.get_xlabel() == "epoch" and "loss" in ax.get_ylabel()


def _predictions(n: int, wrong: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    true = np.arange(n) % 10
    pred = true.copy()
    pred[wrong] = (true[wrong] + 3) % 10
    return images, true, pred


def _image_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.images]


def test_misclassified_shows_the_first_n_wrong_images_with_both_class_names():
    wrong = list(range(0, 90, 3))  # 30 wrong images
    images, true, pred = _predictions(100, wrong)
    fig = plots.misclassified(images, true, pred, CLASSES, n=25)
    shown = _image_axes(fig)
    assert len(shown) == 25
    for ax, i in zip(shown, wrong[:25], strict=True):
        assert ax.get_title() == f"true: {CLASSES[true[i]]}\npred: {CLASSES[pred[i]]}"
        assert np.array_equal(ax.images[0].get_array(), images[i])
        assert ax.images[0].get_interpolation() == "nearest"
        assert not ax.axison
    assert "25 of 30" in fig.get_suptitle()


def test_misclassified_shows_what_there_is_and_says_when_nothing_is_wrong():
    images, true, pred = _predictions(40, [5, 17])
    fig = plots.misclassified(images, true, pred, CLASSES)
    titles = [ax.get_title() for ax in _image_axes(fig)]
    assert titles == ["true: dog\npred: ship", "true: horse\npred: airplane"]

    fig = plots.misclassified(images, true, true, CLASSES)
    assert _image_axes(fig) == []
    assert any("No misclassified" in t.get_text() for t in fig.texts)


def test_confusion_matrix_writes_the_counts_in_their_cells():
    true = [0, 0, 0, 1, 1, 2, 9, 9, 9, 9]
    pred = [0, 0, 1, 1, 1, 9, 9, 9, 9, 0]
    fig = plots.confusion_matrix(true, pred, CLASSES)
    ax = fig.axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text()) for t in ax.texts}
    expected = np.zeros((10, 10), int)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 9], expected[9, 9], expected[9, 0] = 2, 1, 2, 1, 3, 1
    assert len(cells) == 100
    assert all(cells[t, p] == expected[t, p] for t in range(10) for p in range(10))
    assert np.array_equal(ax.images[0].get_array(), expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASSES)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert "70.00%" in ax.get_title()  # 7 of 10 right
    # the darkest cell gets white text, an empty cell black
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert texts[9, 9].get_color() == "white" and texts[5, 5].get_color() == "black"


@pytest.mark.parametrize("build", [lambda: plots.cyclic_lr(0.001, 0.01, 5, 20), lambda: plots.accuracy(_history())])
def test_save_writes_the_same_png_bytes_for_the_same_data(tmp_path, build):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    plots.save(build(), first)
    plots.save(build(), second)
    payload = first.read_bytes()
    assert payload.startswith(PNG_SIGNATURE)
    assert payload == second.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary file left behind


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    plots.save(plots.cyclic_lr(0.001, 0.01, 5, 20), path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)

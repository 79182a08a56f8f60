"""The LR range test: the sweep, its stop on divergence, the restored state, and the rules that pick LRMAX."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from onecycle import data, lr_finder, picks
from onecycle.config import LRFinderParams, parse_params
from onecycle.errors import UserError
from onecycle.lr_finder import Curve, pick_range, range_test, sweep_lr
from onecycle.model import CustomResNet

ROOT = Path(__file__).resolve().parents[1]
CSV_COLUMNS_OF_CURVE = ("lr", "loss", "smoothed_loss", "accuracy", "smoothed_accuracy")


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


def bump(lr: np.ndarray, peak: float, width: float = 0.4) -> np.ndarray:
    """A batch accuracy (percent) that rises from 10% to 50% at LR `peak` and falls back: a Gaussian of `width`
    decades over log10(LR)."""
    return 10 + 40 * np.exp(-0.5 * ((np.log10(lr) - np.log10(peak)) / width) ** 2)


def acc_drop(lr: np.ndarray, accuracy: np.ndarray, **params) -> lr_finder.LRRange:
    return pick_range(synthetic(lr, bowl(lr, 0.01), accuracy), LRFinderParams(pick="acc_drop", **params))


def test_acc_drop_picks_where_the_smoothed_accuracy_has_lost_half_its_gain():
    # smoothing a Gaussian bump by a Gaussian widens it to sqrt(0.4**2 + 0.15**2) decades; its half-maximum
    # point above the 10% baseline is sqrt(2 ln 2) such widths past the peak
    found = acc_drop(LRS, bump(LRS, 0.005), min_div=10)
    expected = 0.005 * 10 ** (math.hypot(0.4, picks.ACC_SMOOTH_DECADES) * math.sqrt(2 * math.log(2)))
    assert found.lr_max == pytest.approx(expected, rel=0.02) and found.lr_max > 0.005
    assert found.lr_min == pytest.approx(found.lr_max / 10) and found.note == ""


def test_acc_drop_is_scale_free_in_lr_and_in_the_accuracy_units():
    lr = np.geomspace(1e-4, 1.0, 96)
    accuracy = bump(lr, 0.003) + np.random.default_rng(0).normal(0, 3, len(lr))  # a noisy batch accuracy
    base = acc_drop(lr, accuracy).lr_max
    # the same curve at 8x the LRs (a logit scale of 1/8 would move it so): the pick moves 8x, nothing else
    assert acc_drop(lr * 8, accuracy).lr_max == pytest.approx(8 * base, rel=1e-9)
    # accuracy as a fraction instead of percent, or offset: the same pick
    assert acc_drop(lr, accuracy / 100 + 0.2).lr_max == pytest.approx(base, rel=1e-9)


def test_acc_drop_moves_with_the_curve_by_less_than_a_step_where_min_loss_jumps_a_step():
    lr = np.geomspace(1e-4, 1.0, 96)
    step = np.log10(lr[1] / lr[0])
    # the curve shifted by a third of a sweep step: the pick follows it by about a third of a step
    a = acc_drop(lr, bump(lr, 0.01)).lr_max
    b = acc_drop(lr, bump(lr, 0.01 * 10 ** (step / 3))).lr_max
    assert np.log10(b / a) == pytest.approx(step / 3, rel=0.05)
    # a loss whose bottom is flat: a rounding-sized difference moves min_loss a whole step, acc_drop not at all
    flat = np.where(np.abs(np.log10(lr / 0.01)) < 0.2, 2.0, bowl(lr, 0.01))
    accuracy = bump(lr, 0.01)
    nudged = flat.copy()
    nudged[np.argmin(flat) + 1] -= 1e-9
    picks = [
        pick_range(synthetic(lr, loss, accuracy * (1 + 1e-9 * k)), LRFinderParams(pick=rule)).lr_max
        for rule in ("min_loss", "acc_drop")
        for k, loss in enumerate((flat, nudged))
    ]
    assert picks[1] / picks[0] == pytest.approx(10**step)  # min_loss: one grid step apart
    assert picks[3] == pytest.approx(picks[2], rel=1e-6)  # acc_drop: the same LR


def test_acc_drop_falls_back_to_min_loss_when_the_accuracy_never_fell():
    rising = 10 + 40 * (np.log10(LRS) + 4) / 4  # still climbing at the end of the sweep
    found = acc_drop(LRS, rising)
    assert math.isclose(found.lr_max, found.lr_at_min_loss) and math.isclose(found.lr_max, 0.01)
    assert "raise lr_finder.end_lr" in found.note


@pytest.mark.parametrize("name", ["flat", "falling"])
def test_acc_drop_falls_back_to_min_loss_when_the_accuracy_never_rose(name):
    # a tiny network on a few steps: the loss fell but the batch accuracy stayed at chance, or only fell
    accuracy = np.full(len(LRS), 10.0) if name == "flat" else np.linspace(20, 5, len(LRS))
    found = acc_drop(LRS, accuracy)
    assert math.isclose(found.lr_max, 0.01) and "never rose" in found.note


def saved_curve(rows: list[list[float]]) -> Curve:
    _, lr, loss, smoothed, acc, smoothed_acc = (list(c) for c in zip(*rows, strict=True))
    return Curve(lr, loss, smoothed, acc, smoothed_acc, "finished", 0)


def test_acc_drop_lands_on_the_best_lrs_of_the_saved_h200_curve_where_min_loss_does_not():
    # docs/lr-finder.md: at width 64 LRMAX 0.014 to 0.05 trained best (0.025: 88.38%); min_loss's 0.0105 gave 87.07%
    run = json.loads((ROOT / "docs/results/h200_gpu_run.json").read_text())["range_test"]
    for sweep in ("default", "max_acc", "exp192", "beta09"):  # 96 or 192 steps, smooth_beta 0.98 or 0.9
        curve = saved_curve(run[sweep]["curve"])
        assert 0.014 <= pick_range(curve, LRFinderParams(pick="acc_drop")).lr_max <= 0.05, sweep
        assert pick_range(curve, LRFinderParams(pick="min_loss")).lr_max < 0.011, sweep


def test_acc_drop_stays_on_the_width_16_plateau_in_avx2_and_avx512_sweeps_of_the_same_seed():
    # float rounding alone parts the two trajectories where the network starts failing (LR 0.045 or 0.06):
    # min_loss lands a grid step apart, acc_drop a factor 1.2 apart, both on the plateau of 0.0495 to 0.099
    picks = {}
    for name in ("w16", "w16_avx2"):
        c = json.loads((ROOT / f"docs/results/lr_curves/{name}.json").read_text())["curve"]
        curve = Curve(*(c[k] for k in CSV_COLUMNS_OF_CURVE), "finished", 0)
        picks[name] = pick_range(curve, LRFinderParams(pick="acc_drop")).lr_max
    assert all(0.0495 <= p <= 0.099 for p in picks.values()), picks
    assert 1 / 1.3 < picks["w16"] / picks["w16_avx2"] < 1.3, picks


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
    # what the benchmark recomputes from a saved raw curve is, bit for bit, what the sweep smoothed
    assert lr_finder.smooth(curve.loss, 0.9) == curve.smoothed_loss
    assert lr_finder.smooth(curve.accuracy, 0.9) == curve.smoothed_accuracy


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


def test_a_saved_sweep_comes_back_for_the_same_inputs_and_for_pick_keys_only_changes(tmp_path):
    """The stage re-picks from a saved sweep when only keys the pick reads changed; any key the sweep reads, the
    data or the code makes it sweep again."""
    meta = {"source_url": "/a/cifar.tar.gz", "md5": "abc", "train_images": 600, "test_images": 200}
    params = parse_params({"model": {"width": 4}})
    inputs = lr_finder.sweep_inputs(params, meta, torch.device("cpu"))
    curve = synthetic(LRS, bowl(LRS, 0.1))
    assert lr_finder.saved_sweep(tmp_path, inputs) is None
    lr_finder.save_sweep(tmp_path, inputs, curve)
    assert lr_finder.saved_sweep(tmp_path, inputs) == curve, "the same floats, bit for bit (JSON keeps repr)"

    for only_the_pick in ({"train": {"epochs": 30}}, {"lr_finder": {"pick": "min_loss", "min_div": 4}}):
        other = parse_params({"model": {"width": 4}} | only_the_pick)
        assert lr_finder.sweep_inputs(other, meta, torch.device("cpu")) == inputs, only_the_pick
    moved = dict(meta, source_url="/b/cifar.tar.gz")  # the same archive, read from elsewhere
    assert lr_finder.sweep_inputs(params, moved, torch.device("cpu")) == inputs
    for sweep_key in ({"train": {"batch_size": 64}}, {"lr_finder": {"num_iter": 50}}, {"augment": {"cutout": 4}}):
        other = parse_params({"model": {"width": 4}} | sweep_key)
        assert lr_finder.saved_sweep(tmp_path, lr_finder.sweep_inputs(other, meta, torch.device("cpu"))) is None
    assert lr_finder.saved_sweep(tmp_path, lr_finder.sweep_inputs(params, meta | {"md5": "def"}, "cpu")) is None
    assert lr_finder.saved_sweep(tmp_path, inputs | {"code": "another"}) is None

    lr_finder.saved_path(tmp_path, inputs).write_text("{damaged")  # a half-written file: sweep again
    assert lr_finder.saved_sweep(tmp_path, inputs) is None


def test_the_saved_sweep_s_code_digest_follows_the_library_but_not_the_pick_rules(tmp_path):
    library = Path(lr_finder.__file__).parent
    copy = tmp_path / "onecycle"
    copy.mkdir()
    for module in library.glob("*.py"):
        (copy / module.name).write_bytes(module.read_bytes())
    digest = lr_finder.code_digest(copy)
    assert digest == lr_finder.sweep_inputs(parse_params({}), {}, torch.device("cpu"))["code"]
    (copy / "picks.py").write_text((copy / "picks.py").read_text() + "\n# another rule\n")
    assert lr_finder.code_digest(copy) == digest, "a new pick rule re-picks from the saved sweep"
    (copy / "steps.py").write_text((copy / "steps.py").read_text() + "\n# another step\n")
    assert lr_finder.code_digest(copy) != digest, "a change to what the sweep runs sweeps again"


def test_the_fine_sweeps_are_the_project_s_design_around_the_lowest_loss_and_fine_reads_them(small_archive, tmp_path):
    """lr_finder.pick: fine runs FINE_ROUNDS more sweeps of a fresh model, same seed: FINE_STEPS steps from the
    lowest-loss LR of the sweep before / FINE_BELOW to that LR x FINE_ABOVE, whatever the first sweep's knobs were;
    LRMAX is their lowest losses' geometric mean times FINE_SCALE. They are saved with the sweep, and a rule that
    reads none leaves them out of the outputs."""
    path, md5 = small_archive
    raw = {"data": {"url": str(path), "md5": md5}, "model": {"width": 2}}
    raw["train"] = {"batch_size": 32, "epochs": 2, "peak_epoch": 1}
    raw["lr_finder"] = {"num_iter": 20, "pick": "fine", "smooth_beta": 0.9, "diverge_factor": 10.0}
    params = parse_params(raw)
    dataset = data.decode_archive(path, params.data)
    curve, found = lr_finder.find_range(params, dataset, torch.device("cpu"), progress=False)
    rounds = lr_finder.fine_rounds(curve)
    assert len(rounds) == lr_finder.FINE_ROUNDS == 2
    around, finder, lowest = curve, params.lr_finder, []
    for fine in rounds:  # each centred on the lowest loss of the one before, read with that one's smoothing
        anchor = lr_finder.fine_anchor(around, finder)
        assert fine.lr[0] == anchor / lr_finder.FINE_BELOW
        expected = lr_finder.fine_params(params.lr_finder, anchor)
        assert (expected.num_iter, expected.smooth_beta, expected.diverge_factor) == (lr_finder.FINE_STEPS, 0.98, 4.0)
        assert fine.lr == [sweep_lr(i, expected) for i in range(len(fine.lr))], "its own design, not lr_finder.*"
        assert fine.loss[0] == curve.loss[0], "a fresh model with the same seed sees the same first batch"
        lowest.append(picks.lowest_loss_lr(lr_finder.sweep_of(dataclasses.replace(fine, fine=None), expected)))
        around, finder = fine, expected
    mean = (lowest[0] * lowest[1]) ** 0.5
    low, high = min(r.lr[0] for r in rounds), max(r.lr[-1] for r in rounds)
    assert found.lr_max == pytest.approx(min(max(mean * picks.FINE_SCALE, low), high), rel=1e-12)
    summary = found.as_dict(curve, len(dataset.train.labels))
    assert summary["images_seen"] == curve.images_seen + sum(r.images_seen for r in rounds), "the cost counts all"
    assert [r["iterations"] for r in summary["fine_sweeps"]] == [len(r.lr) for r in rounds]

    meta = {"md5": md5, "train_images": len(dataset.train.labels)}
    inputs = lr_finder.sweep_inputs(params, meta, torch.device("cpu"))
    lr_finder.save_sweep(tmp_path, inputs, curve)
    assert lr_finder.saved_sweep(tmp_path, inputs) == curve, "saved with its fine sweeps, bit for bit"
    again = lr_finder.for_pick(curve, params, dataset, torch.device("cpu"))
    assert again is curve, "saved fine sweeps centred where they should be are read, not swept again"
    one_round = dataclasses.replace(
        curve, fine=dataclasses.replace(curve.fine, fine=None)
    )  # as a one-round version saved it
    assert lr_finder.for_pick(one_round, params, dataset, torch.device("cpu")) == curve, "an older save: swept again"
    other = parse_params(raw | {"lr_finder": raw["lr_finder"] | {"pick": "budget"}})
    assert lr_finder.for_pick(curve, other, dataset, torch.device("cpu")).fine is None
    assert lr_finder.pick(curve, other, len(dataset.train.labels)) == lr_finder.pick(
        dataclasses.replace(curve, fine=None), other, len(dataset.train.labels)
    )

"""DVC stage plot_reports: draw the seven report pictures and log them to the MLflow run that trained the model."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from onecycle import batches, data, distributed, lr_finder, outputs, plots, schedules, training
from onecycle.config import Params, load_params
from onecycle.errors import UserError, stage_main
from onecycle.model import build_model
from onecycle.tracking import Tracker, file_sha256


def read_columns(path: Path, columns: Sequence[str], stage: str, empty: bool = False) -> dict[str, list[float]]:
    """The CSV at `path` as {column: floats}; UserError naming the stage that writes it when it is unusable, or
    has no rows unless `empty` allows it."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        if not rows and not empty:
            raise ValueError("no rows")
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        return {c: [float(row[c]) for row in rows] for c in columns}
    except (OSError, ValueError, TypeError, csv.Error) as exc:
        raise UserError(f"{path} is missing or damaged ({exc}); run `dvc repro {stage}`") from None


def load_model(path: Path, params: Params) -> torch.nn.Module:
    """The trained model at `path`; UserError when it is missing, damaged or of another model.width."""
    model = build_model(params.model)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no model at {path}; run `dvc repro train_one_cycle`") from None
    except Exception as exc:  # torch.load fails in many ways on a damaged file (pickle, zip, EOF errors)
        raise UserError(
            f"{path} is damaged: torch cannot read it as a state_dict ({type(exc).__name__}); "
            "run `dvc repro train_one_cycle`"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())  # torch's message spans lines; its first alone says little
        reason = reason if len(reason) <= 300 else reason[:300] + " ..."
        raise UserError(
            f"{path} does not fit the model of params.yaml (model.width = {params.model.width}): {reason}; "
            "run `dvc repro train_one_cycle`"
        ) from None
    return model


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="folder written by download_cifar")
    parser.add_argument("--model", type=Path, required=True, help="state_dict written by train_one_cycle")
    parser.add_argument("--history", type=Path, required=True, help="history.csv written by train_one_cycle")
    parser.add_argument("--range", type=Path, required=True, help="lr_range.json written by lr_range_test")
    parser.add_argument("--curve", type=Path, required=True, help="lr_range.csv written by lr_range_test")
    parser.add_argument("--fine-curve", type=Path, required=True, help="lr_range_fine.csv written by lr_range_test")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the PNGs into (replaced whole)")
    args = parser.parse_args()
    params = load_params(args.params)
    found = lr_finder.read_range(args.range)
    lr_min, lr_max = lr_finder.training_range(found, params.train)
    curve = read_columns(args.curve, lr_finder.CSV_COLUMNS, "lr_range_test")
    fine = read_columns(args.fine_curve, lr_finder.FINE_CSV_COLUMNS, "lr_range_test", empty=True)
    rounds = sorted(set(fine["round"]))  # each fine sweep's LRs and smoothed loss, drawn apart
    fine_curves = [
        tuple([x for r, x in zip(fine["round"], fine[c], strict=True) if r == i] for c in ("lr", "smoothed_loss"))
        for i in rounds
    ]
    history = read_columns(args.history, training.HISTORY_COLUMNS, "train_one_cycle")
    tracker = Tracker()  # an unreachable tracking server stops the stage here, before any work
    dataset = data.load(args.data)
    model = load_model(args.model, params)
    model_sha256 = file_sha256(args.model)

    device = distributed.resolve_device(params.train.device)
    model.to(device)
    test = batches.eval_batches(dataset.test, dataset.mean, dataset.std, params.train.batch_size, device)
    pred = training.predict(model, test, training.StepOptions.of(params.train, device)).numpy()
    true = dataset.test.labels

    train = params.train
    steps = schedules.steps_per_epoch(len(dataset.train.labels), train.batch_size)
    try:
        table = schedules.one_cycle_table(train, steps, lr_min, lr_max)
    except ValueError as exc:
        raise UserError(f"cannot build the One Cycle schedule to plot: {exc}") from None
    # Built one at a time while saving, so only one figure is held in memory at once.
    figures = {
        # the triangular schedule with the One Cycle's half-cycle: the LR climbs for peak_epoch epochs
        "cyclic_lr.png": lambda: plots.cyclic_lr(lr_min, lr_max, train.peak_epoch * steps, train.epochs * steps),
        "lr_range.png": lambda: plots.lr_range(
            curve["lr"],
            curve["smoothed_loss"],
            curve["loss"],
            found["lr_min"],  # the range as found (training scales it by train.lr_scale)
            found["lr_max"],
            str(found.get("pick", params.lr_finder.pick)),
            accuracy=curve["smoothed_accuracy"],
            fine=fine_curves,
        ),
        "one_cycle.png": lambda: plots.one_cycle([r[0] for r in table], [r[1] for r in table], steps, train.peak_epoch),
        "accuracy.png": lambda: plots.accuracy(history),
        "loss.png": lambda: plots.loss(history),
        "misclassified.png": lambda: plots.misclassified(dataset.test.images, true, pred, dataset.classes),
        "confusion_matrix.png": lambda: plots.confusion_matrix(true, pred, dataset.classes),
    }

    # All seven are written into a fresh folder that replaces --out at the end: a failure midway leaves the
    # previous plots as they were.
    with outputs.staged_folder(args.out) as staged:
        for name, build in figures.items():
            plots.save(build(), staged / name)
    correct = int((pred == true).sum())
    print(f"wrote {len(figures)} plots to {args.out}; test accuracy {100 * correct / len(true):.2f}%")

    run = tracker.run_of_model(model_sha256)
    if run is None:
        print(f"note: no MLflow run at {tracker.uri} produced {args.model}, so the plots were not logged to MLflow")
        return
    run.log_artifacts([args.out / name for name in figures], "plots")
    print(f"logged the plots to MLflow run {run.id} (artifacts/plots): {run.url}")
    tracker.print_where()


if __name__ == "__main__":
    main()

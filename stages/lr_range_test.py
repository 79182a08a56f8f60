"""DVC stage lr_range_test: sweep the LR, pick LRMAX (and LRMIN = LRMAX / min_div), log the curve to MLflow."""

import argparse
from pathlib import Path

from mlflow.entities import Metric

from onecycle import data, distributed, lr_finder, outputs
from onecycle.config import flatten, load_params
from onecycle.errors import stage_main
from onecycle.tracking import Tracker


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="folder written by download_cifar")
    parser.add_argument("--range", type=Path, required=True, help="JSON to write: lr_min, lr_max, ...")
    parser.add_argument("--curve", type=Path, required=True, help="CSV to write: one row per sweep step")
    args = parser.parse_args()
    params = load_params(args.params)
    tracker = Tracker()  # an unreachable tracking server stops the stage here, before the sweep
    dataset = data.load(args.data)
    device = distributed.resolve_device(params.train.device)

    curve, found = lr_finder.find_range(params, dataset, device)  # no range: a clear error, nothing written
    summary = found.as_dict(curve, len(dataset.train.labels))

    outputs.write_csv(args.curve, lr_finder.CSV_COLUMNS, curve.rows())
    outputs.write_json(args.range, summary)
    print(
        f"LR range: LRMIN {found.lr_min:.4g}, LRMAX {found.lr_max:.4g} ({found.pick}; lowest loss at LR "
        f"{found.lr_at_min_loss:.4g}); {len(curve.lr)} steps, {summary['epochs_of_training_set']:.2f} epochs of "
        f"the training set, {curve.stop_reason}"
    )

    run_id = tracker.start_run(
        "lr_range_test",
        {k: v for k, v in flatten(params).items() if k.split(".")[0] in ("lr_finder", "model", "augment", "data")}
        | {"train.batch_size": params.train.batch_size, "train.seed": params.train.seed},
        {"data.md5": params.data.md5},
    )
    tracker.log_metric_rows(
        run_id,
        [
            Metric(name, value, 0, step)
            for step, lr, loss, smooth, acc, smooth_acc in curve.rows()
            for name, value in (("lr", lr), ("loss", loss), ("smoothed_loss", smooth), ("accuracy", acc))
        ],
    )
    tracker.log_metrics(run_id, 0, {"lr_min": found.lr_min, "lr_max": found.lr_max})
    tracker.log_artifacts(run_id, [args.range, args.curve])
    tracker.finish(run_id)


if __name__ == "__main__":
    main()

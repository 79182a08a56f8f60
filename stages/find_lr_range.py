"""DVC stage lr_range_test: sweep the LR, pick LRMAX (and LRMIN = LRMAX / min_div), log the curve to MLflow."""

# Named find_lr_range.py, not *_test.py: tools that follow that convention would take it for a test.

import argparse
import json
import os
import time
from pathlib import Path

from mlflow.entities import Metric

from onecycle import data, distributed, estimate, lr_finder, outputs
from onecycle.config import Params, flatten, load_params
from onecycle.errors import stage_main
from onecycle.tracking import EXPERIMENT, RANGE_EXPERIMENT, Tracker, repo_root


def describe(params: Params, found: lr_finder.LRRange, summary: dict, exp_name: str | None, repicked: bool) -> str:
    """The range-test run's description in MLflow (markdown): its headline, the found range."""
    sweep = params.lr_finder
    again = " (re-picked from the saved sweep of the same inputs: no new sweep)" if repicked else ""
    fine = summary["fine_sweeps"]
    steps = " and ".join(f"{r['iterations']} steps from {r['start_lr']:.3g}" for r in fine)
    fine_line = fine and f"- {len(fine)} fine sweeps, which the pick reads: {steps}"
    return "\n".join(
        [
            f"**LR range {found.lr_min:.4g} - {found.lr_max:.4g}** (LRMAX by {found.pick}, LRMIN = LRMAX / "
            f"{found.min_div:g}; lowest smoothed loss at LR {found.lr_at_min_loss:.4g})",
            "",
            f"- sweep: {summary['iterations']} steps, {sweep.step_mode} from {sweep.start_lr:g} to {sweep.end_lr:g}, "
            f"{summary['stop_reason']}; {summary['epochs_of_training_set']:.2f} epochs of the training set{again}",
            *([fine_line] if fine_line else []),
            f"- model width {params.model.width}, batch {params.train.batch_size}, seed {params.train.seed}",
            f"- DVC experiment: `{exp_name}`" if exp_name else "- DVC experiment: none (`dvc repro` in the workspace)",
            f"- the training runs that use the range are in the experiment `{EXPERIMENT}`",
        ]
    )


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="folder written by download_cifar")
    parser.add_argument("--range", type=Path, required=True, help="JSON to write: lr_min, lr_max, ...")
    parser.add_argument("--curve", type=Path, required=True, help="CSV to write: one row per sweep step")
    parser.add_argument(
        "--fine-curve", type=Path, required=True,
        help="CSV to write: one row per step of the fine sweep (a header alone when the pick reads none)",
    )  # fmt: skip
    parser.add_argument(
        "--saved", type=Path, required=True, help="folder of saved sweeps, one per set of inputs (relative paths: "
        "to the repository root, which queued experiments share)",
    )  # fmt: skip
    args = parser.parse_args()
    params = load_params(args.params)
    tracker = Tracker(experiment=RANGE_EXPERIMENT)  # an unreachable tracking server stops the stage here
    dataset = data.load(args.data)
    device = distributed.resolve_device(params.train.device)
    inputs = lr_finder.sweep_inputs(params, json.loads((args.data / "meta.json").read_text()), device)
    n_train = len(dataset.train.labels)

    started = time.time()  # the run's start and end in MLflow are the sweep's
    saved = repo_root() / args.saved  # an absolute --saved stays as it is
    curve = lr_finder.saved_sweep(saved, inputs)
    repicked = curve is not None
    if curve is None:
        # times the first steps and says, once, when the range test and training will take long
        timer = estimate.SweepTimer(params, n_train, len(dataset.test.labels), device.type)
        curve = lr_finder.sweep(params, dataset, device, on_step=timer)
        lr_finder.save_sweep(saved, inputs, curve)
    else:
        where = lr_finder.saved_path(saved, inputs)
        print(
            f"LR range test: no new sweep: {where} holds the curve of a sweep with the same inputs (what changed is "
            f"read by the pick alone: {', '.join(lr_finder.PICK_KEYS)}), so LRMAX is re-picked from it"
        )
    read = lr_finder.for_pick(curve, params, dataset, device)
    if read.fine is not None and read.fine is not curve.fine:  # swept now: kept beside the saved sweep from now on
        steps, pick = f"{lr_finder.FINE_ROUNDS} x {lr_finder.FINE_STEPS} steps", params.lr_finder.pick
        print(f"LR range test: the fine sweeps around its lowest loss ({steps}), which {pick} reads")
        lr_finder.save_sweep(saved, inputs, read)
    curve = read
    found = lr_finder.pick(curve, params, n_train)  # no range: a clear error
    swept = time.time()
    summary = found.as_dict(curve, n_train)

    outputs.write_csv(args.curve, lr_finder.CSV_COLUMNS, curve.rows())
    fine_rows = [(i, *row) for i, fine in enumerate(lr_finder.fine_rounds(curve), 1) for row in fine.rows()]
    outputs.write_csv(args.fine_curve, lr_finder.FINE_CSV_COLUMNS, fine_rows)
    outputs.write_json(args.range, summary)
    fine_steps = "".join(f" + {r['iterations']}" for r in summary["fine_sweeps"])  # each fine sweep's
    print(
        f"LR range: LRMIN {found.lr_min:.4g}, LRMAX {found.lr_max:.4g} ({found.pick}; lowest loss at LR "
        f"{found.lr_at_min_loss:.4g}); {len(curve.lr)} steps{fine_steps}, {summary['epochs_of_training_set']:.2f} "
        f"epochs of the training set, {curve.stop_reason}"
    )

    flat = flatten(params)
    run = tracker.start_run(
        "lr_range_test",
        {k: v for k, v in flat.items() if k.split(".")[0] in ("lr_finder", "model", "augment", "data")}
        | {k: v for k, v in flat.items() if k in lr_finder.SWEEP_TRAIN_KEYS + lr_finder.PICK_TRAIN_KEYS},
        # "Source" in MLflow's UI: this script, whose name is not the stage's
        {"data.md5": params.data.md5, "mlflow.source.name": "stages/find_lr_range.py"},
        detail=f"range test · w{params.model.width} · {len(curve.lr)} steps · LRMAX {found.lr_max:.4g}",
        note=describe(params, found, summary, os.environ.get("DVC_EXP_NAME"), repicked),
        start_ms=int(started * 1000),
    )
    with run:
        # Keys of their own (range/...), in an experiment of their own: never on the training runs' charts.
        run.log_metric_rows(
            [
                Metric(f"range/{name}", value, 0, step)
                for step, *values in curve.rows()
                for name, value in zip(lr_finder.CSV_COLUMNS[1:], values, strict=True)
            ],
        )
        run.log_metrics(0, {"range/lr_min": found.lr_min, "range/lr_max": found.lr_max})
        run.log_artifacts([args.range, args.curve, args.fine_curve])
        run.end_ms = int(swept * 1000)
    tracker.print_where()


if __name__ == "__main__":
    main()

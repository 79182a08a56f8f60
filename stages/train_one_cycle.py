"""DVC stage train_one_cycle: train the custom ResNet with the One Cycle Policy over the found LR range."""

import argparse
import dataclasses
from pathlib import Path

import torch

from onecycle import data, lr_finder, outputs, training
from onecycle.config import flatten, load_params
from onecycle.errors import stage_main
from onecycle.model import build_model
from onecycle.tracking import Tracker, file_sha256


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="folder written by download_cifar")
    parser.add_argument("--range", type=Path, required=True, help="lr_range.json written by lr_range_test")
    parser.add_argument("--model", type=Path, required=True, help="state_dict to write")
    parser.add_argument("--history", type=Path, required=True, help="CSV to write: one row per epoch")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON to write: final figures")
    parser.add_argument("--checkpoint", type=Path, required=True, help="where to save each epoch, to resume from")
    args = parser.parse_args()
    params = load_params(args.params)
    found = lr_finder.read_range(args.range)
    lr_min, lr_max = found["lr_min"], found["lr_max"]
    tracker = Tracker()  # an unreachable tracking server stops the stage here, before training
    dataset = data.load(args.data)
    device = training.resolve_device(params.train.device)
    print(f"training on {device}: {len(dataset.train.labels)} images, LR {lr_min:.4g} -> {lr_max:.4g} -> {lr_min:.4g}")

    torch.manual_seed(params.train.seed)
    model = build_model(params.model)
    resume = training.Checkpoint.load(args.checkpoint, training.fingerprint(params, lr_min, lr_max))
    run_params = flatten(params) | {"lr_min": lr_min, "lr_max": lr_max}
    run_id = tracker.start_run(
        "train_one_cycle", run_params, {"data.md5": params.data.md5}, run_id=resume.run_id if resume else None
    )

    def log_epoch(record: training.EpochRecord) -> None:
        values = dataclasses.asdict(record)
        metrics = {k: values[k] for k in training.HISTORY_COLUMNS[1:-1]}
        tracker.log_metrics(run_id, record.epoch, metrics, what=f"the metrics of epoch {record.epoch}")

    try:
        history = training.fit(
            model, dataset, params, lr_min, lr_max, device,
            checkpoint_path=args.checkpoint, resume=resume, run_id=run_id, on_epoch=log_epoch,
        )  # fmt: skip
    except KeyboardInterrupt:
        tracker.finish(run_id, "KILLED")
        raise
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise

    final = history[-1]
    metrics = {
        "test_acc": final.test_acc,
        "best_test_acc": max(r.test_acc for r in history),
        "best_epoch": max(history, key=lambda r: r.test_acc).epoch,
        "test_loss": final.test_loss,
        "train_acc": final.train_acc,
        "train_loss": final.train_loss,
        "epochs": len(history),
        "lr_min": lr_min,
        "lr_max": lr_max,
        "train_seconds": sum(r.seconds for r in history),
    }
    outputs.torch_save({k: v.cpu() for k, v in model.state_dict().items()}, args.model)
    rows = [[getattr(r, c) for c in training.HISTORY_COLUMNS] for r in history]
    outputs.write_csv(args.history, training.HISTORY_COLUMNS, rows)
    outputs.write_json(args.metrics, metrics)
    args.checkpoint.unlink(missing_ok=True)  # the run is complete: a rerun trains afresh

    tracker.set_tags(run_id, {"model_sha256": file_sha256(args.model)})
    tracker.log_metrics(run_id, len(history), {"best_test_acc": metrics["best_test_acc"]})
    tracker.log_artifacts(run_id, [args.model, args.metrics, args.history, Path(args.params)])
    tracker.finish(run_id)
    tracker.report_lost(kept_in=f"{args.history}, {args.metrics} and {args.model}")
    print(f"test accuracy {final.test_acc:.2f}% after {len(history)} epochs (best {metrics['best_test_acc']:.2f}%)")


if __name__ == "__main__":
    main()

"""DVC stage train_one_cycle: train the custom ResNet with the One Cycle Policy over the found LR range.

One process: `python stages/train_one_cycle.py ...` (as dvc.yaml runs it). Several GPUs (or CPU processes):
`torchrun --nproc_per_node N stages/train_one_cycle.py ...` with the same arguments; rank 0 writes the
outputs and logs to MLflow.
"""

import argparse
import contextlib
import copy
import dataclasses
import os
from pathlib import Path

import torch

from onecycle import data, distributed, estimate, lr_finder, outputs, training
from onecycle.config import Params, flatten, load_params
from onecycle.errors import stage_main
from onecycle.model import Classifier, build_model
from onecycle.tracking import RANGE_EXPERIMENT, Tracker, dataset_name, file_sha256, git_commit, model_name

RUN_KEY = "mlflow_run_id"  # the checkpoint's record of the MLflow run its epochs were logged to
MODEL_METRICS = ("test_acc", "test_loss")  # the last epoch's, logged once, linked to the model and test data
# the params the logged model carries in MLflow's Models view (with the found range and the commit)
MODEL_PARAMS = ("model.width", "train.epochs", "train.batch_size", "train.seed", "lr_finder.pick", "data.train_limit")


def final_metrics(history: list[training.EpochRecord], lr_min: float, lr_max: float) -> dict:
    final = history[-1]
    best = max(history, key=lambda r: r.test_acc)
    return {
        "test_acc": final.test_acc,  # percent, after the last epoch
        "best_test_acc": best.test_acc,
        "best_epoch": best.epoch,
        "test_loss": final.test_loss,
        "train_acc": final.train_acc,
        "train_loss": final.train_loss,
        "epochs": len(history),
        "lr_min": lr_min,
        "lr_max": lr_max,
        "train_seconds": sum(r.seconds for r in history),  # wall clock of all epochs, a resumed run's too
    }


def describe(
    params: Params, lr_min: float, lr_max: float, images: int, metrics: dict | None = None, status: str = ""
) -> str:
    """The training run's description in MLflow (markdown): its headline (the test accuracy once it is known,
    else what happened to it), then what it trained."""
    train, exp_name = params.train, os.environ.get("DVC_EXP_NAME")
    if metrics:
        head = (
            f"**Test accuracy {metrics['test_acc']:.2f}%** after {metrics['epochs']} epochs "
            f"(best {metrics['best_test_acc']:.2f}% at epoch {metrics['best_epoch']}; "
            f"{metrics['train_seconds']:.0f} s of training)"
        )
    else:
        head = (
            f"**{status}**: {train.epochs} epochs planned; the metrics show the epochs that finished"
            if status
            else f"**Training**: {train.epochs} epochs (the test accuracy appears here when it ends)"
        )
    return "\n".join(
        [
            head,
            "",
            f"- LR range {lr_min:.4g} - {lr_max:.4g}: One Cycle from LRMIN to LRMAX at epoch {train.peak_epoch}, "
            f"back to LRMIN at epoch {train.epochs} (the range from the LR range test, in `{RANGE_EXPERIMENT}`)",
            f"- DVC experiment: `{exp_name}`" if exp_name else "- DVC experiment: none (`dvc repro` in the workspace)",
            f"- model width {params.model.width}, seed {train.seed}, batch {train.batch_size}, "
            f"momentum {list(train.momentum)}, weight decay {train.weight_decay:g}",
            f"- {images} training images",
        ]
    )


def train(args: argparse.Namespace, params: Params, group: distributed.Group, device: torch.device) -> None:
    tracker = found = None
    if group.is_main:
        found = lr_finder.read_range(args.range)
        tracker = Tracker()  # an unreachable tracking server stops the stage here, before training
    found = distributed.share(found, group)  # rank 0's range on every process
    lr_min, lr_max = lr_finder.training_range(found, params.train)
    dataset = data.load(args.data)
    images = len(dataset.train.labels)
    training.check_fits(params.train, images, group.world)  # before an MLflow run is opened
    if group.is_main:
        print(f"training on {device} x {group.world}: {images} images, LR {lr_min:.4g} -> {lr_max:.4g} -> {lr_min:.4g}")

    torch.manual_seed(params.train.seed)
    model = build_model(params.model)
    resume = training.Checkpoint.load(
        args.checkpoint, training.fingerprint(params, lr_min, lr_max), quiet=not group.is_main
    )
    run = contextlib.nullcontext()  # the processes other than rank 0 track nothing
    if tracker:
        run = tracker.start_run(
            "train_one_cycle",
            flatten(params) | {"lr_min": lr_min, "lr_max": lr_max},
            {"data.md5": params.data.md5},
            run_id=resume.extra.get(RUN_KEY) if resume else None,
            detail=f"w{params.model.width} · seed {params.train.seed} · {params.train.epochs} ep · LRMAX {lr_max:.4g}",
            note=describe(params, lr_min, lr_max, images),
            stopped_note=lambda status: describe(params, lr_min, lr_max, images, status=f"{status} before the end"),
            system_metrics=True,
        )

    def on_epoch(record: training.EpochRecord) -> None:
        values = dataclasses.asdict(record)
        metrics = {k: values[k] for k in training.HISTORY_COLUMNS[1:-1]}
        if record.epoch == params.train.epochs:  # the last epoch's test figures: linked to the model, below
            metrics = {k: v for k, v in metrics.items() if k not in MODEL_METRICS}
        run.log_metrics(record.epoch, metrics, f"the metrics of epoch {record.epoch}")
        if record.epoch == len(resume.history if resume else []) + 1:  # the first epoch of this process
            estimate.after_first_epoch(record.seconds, record.epoch, params, device.type)

    # A KeyboardInterrupt (Ctrl-C, SIGTERM) ends the run KILLED, any other exception FAILED; the checkpoint of the
    # last finished epoch stays for the next `dvc repro` to resume from.
    with run:
        if tracker and not run.resumed:
            test_images = len(dataset.test.labels)
            splits = {"train": (images, params.data.train_limit), "test": (test_images, params.data.test_limit)}
            run.log_datasets(params.data.url, params.data.md5, splits)
        history = training.fit(
            model, dataset, params, lr_min, lr_max, device, group=group, checkpoint_path=args.checkpoint,
            resume=resume, extra={RUN_KEY: run.id} if tracker else {}, on_epoch=on_epoch,
        )  # fmt: skip
        if not group.is_main:
            return

        metrics = final_metrics(history, lr_min, lr_max)
        outputs.torch_save({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, args.model)
        rows = [[getattr(r, c) for c in training.HISTORY_COLUMNS] for r in history]
        outputs.write_csv(args.history, training.HISTORY_COLUMNS, rows)
        outputs.write_json(args.metrics, metrics)
        args.checkpoint.unlink(missing_ok=True)  # the run is complete: a rerun trains afresh

        run.set_tags({"model_sha256": file_sha256(args.model)})
        run.set_note(describe(params, lr_min, lr_max, images, metrics))
        run.log_artifacts([args.model, args.metrics, args.history, Path(args.params)])
        # on the CPU, in the standard layout: it loads and serves without this run's device
        net = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
        model_params = {k: v for k, v in flatten(params).items() if k in MODEL_PARAMS}
        model_params |= {"lr_min": lr_min, "lr_max": lr_max, "git_commit": git_commit()}
        classifier = Classifier(net, dataset.mean, dataset.std).eval()
        name = model_name(params.model.width, run.label)
        model_id = run.log_model(classifier, name, dataset.test.images[:2], model_params)
        # the final test figures, linked to the model and to the test data they were measured on
        linked = {k: metrics[k] for k in (*MODEL_METRICS, "best_test_acc")}
        test = dataset_name("test", params.data.test_limit)
        run.log_model_metrics(model_id, len(history), linked, test, params.data.md5)
    tracker.report_lost(kept_in=f"{args.history}, {args.metrics} and {args.model}")
    tracker.print_where()
    if not tracker.lost:
        print(f"MLflow run: {run.url}")
        if model_id:
            print(f"MLflow model: {name}, models:/{model_id} (mlflow.pytorch.load_model takes either URI)")
    print(
        f"test accuracy {metrics['test_acc']:.2f}% after {len(history)} epochs (best {metrics['best_test_acc']:.2f}%)"
    )


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="folder written by download_cifar")
    parser.add_argument("--range", type=Path, required=True, help="lr_range.json written by lr_range_test")
    parser.add_argument("--model", type=Path, required=True, help="state_dict to write")
    parser.add_argument("--history", type=Path, required=True, help="CSV to write: one row per epoch")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON to write: final figures")
    parser.add_argument("--checkpoint", type=Path, required=True, help="where to save each epoch, to resume from")
    args = parser.parse_args()
    params = load_params(args.params)
    group, device = distributed.start(params.train.device)
    try:
        train(args, params, group, device)
    finally:
        distributed.stop(group)


if __name__ == "__main__":
    main()

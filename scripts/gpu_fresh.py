"""Whole trainings in fresh processes, as the train_one_cycle stage runs them, one per train setting: what a
`dvc repro` of the training stage costs, its one-time warm-up (CUDA context, cuDNN autotuning) included.

    python scripts/gpu_fresh.py --archive cifar.tar.gz --md5 MD5 --lr-max 0.0105 --out fresh.json
        [--setting NAME:KEY=VALUE,...]... [--epochs 24] [--batch-size 512] [--width 64] [--train-limit N]

The archive is decoded once into a data folder (`data.prepare`, as download_cifar does); then each --setting
(params changed from the defaults: train keys by name, e.g. `nobench:cudnn_benchmark=false`, other sections' as
`augment.backend=tensor`, values in YAML, `momentum=[0.95, 0.8]`; and `lr_max=LR` for a range other than
--lr-max's, so that one call trains a grid of LR ranges and recipes) trains in its own Python process:
`data.load`, the model, `training.fit` from LRMIN = LRMAX / lr_finder.min_div to LRMAX, as the stage does,
without MLflow. Each process's wall time is measured from its start to its exit by this one. No setting: the
defaults alone. Runs on a CPU too (small sizes), which is how it is tested.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One training, as the stage: its result as one JSON line."""
    began = time.perf_counter()
    import torch  # noqa: PLC0415 (timed: the stage pays for the import too)

    from onecycle import data, distributed, training  # noqa: PLC0415
    from onecycle.config import parse_params  # noqa: PLC0415
    from onecycle.model import build_model  # noqa: PLC0415

    params = parse_params(json.loads(args.params))
    device = distributed.resolve_device(params.train.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, timed apart from the first epoch
    ready = time.perf_counter() - began
    dataset = data.load(Path(args.data))
    torch.manual_seed(params.train.seed)
    model = build_model(params.model)
    start = time.perf_counter()
    lr_min = args.lr_max / params.lr_finder.min_div  # as the range test writes it; a setting may change min_div
    history = training.fit(model, dataset, params, lr_min, args.lr_max, device, progress=False)
    seconds = time.perf_counter() - start
    epochs = sorted(r.seconds for r in history)
    result = {
        "import_and_context_seconds": ready,
        "fit_seconds": seconds,
        "first_epoch_seconds": history[0].seconds,
        "median_epoch_seconds": epochs[len(epochs) // 2],
        "test_acc": history[-1].test_acc,
        "train_acc": history[-1].train_acc,  # augmented, over the last epoch: how far from fitting the training set
        "test_acc_by_epoch": [r.test_acc for r in history],
        # where a fresh process's time goes: fit_seconds less their sum is the set-up (data to the device, model)
        "epoch_seconds": [r.seconds for r in history],
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive")
    parser.add_argument("--md5")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--lr-max", type=float, required=True)
    parser.add_argument("--setting", action="append", default=[], help="NAME:KEY=VALUE,... of train")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from onecycle import data  # noqa: PLC0415
    from onecycle.config import parse_params, read_yaml  # noqa: PLC0415

    raw = {
        "data": {"url": args.archive, "md5": args.md5, "train_limit": args.train_limit},
        "model": {"width": args.width},
        "train": {"epochs": args.epochs, "peak_epoch": min(5, args.epochs - 1), "batch_size": args.batch_size},
    }
    settings, lr_maxes = {}, {}
    for spec in args.setting or ["defaults:"]:
        name, _, changes = spec.partition(":")
        setting = {section: dict(values) for section, values in raw.items()}
        lr_maxes[name] = args.lr_max
        for change in re.split(r",(?![^\[]*\])", changes):  # commas inside [...] belong to a list value
            if not change:
                continue
            key, _, value = change.partition("=")
            section, _, key = key.rpartition(".")
            if (section, key) == ("", "lr_max"):
                try:
                    lr_maxes[name] = float(value)
                except ValueError:
                    lr_maxes[name] = value
            else:
                setting.setdefault(section or "train", {})[key] = read_yaml(value)
        lr_max = lr_maxes[name]
        if not isinstance(lr_max, float) or not 0 < lr_max < float("inf"):
            sys.exit(f"--setting {name}: lr_max must be a positive number, got {lr_max!r}")
        settings[name] = setting
        parse_params(setting)  # a wrong key or value stops here, before any work
    results: dict = {"lr_max": args.lr_max, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cifar10"
        data.prepare(parse_params(raw).data, folder, progress=False)
        for name, setting in settings.items():
            command = [sys.executable, __file__, "--child", "--lr-max", str(lr_maxes[name]), "--data", str(folder)]
            start = time.perf_counter()
            done = subprocess.run([*command, "--params", json.dumps(setting)], capture_output=True, text=True)
            wall = time.perf_counter() - start
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                result = {"error": (done.stdout + done.stderr)[-2000:]}
            else:
                result = json.loads(lines[-1][len("RESULT ") :]) | {"process_seconds": wall}
            changed = {section: values for section, values in setting.items() if section != "data"}
            results["settings"][name] = changed | {"lr_max": lr_maxes[name]} | result
            if args.out:
                args.out.write_text(json.dumps(results, indent=2) + "\n")
            # the per-epoch lists stay in the JSON only
            shown = {
                k: round(v, 3) if isinstance(v, float) else v for k, v in result.items() if not isinstance(v, list)
            }
            print(f"{name}: {json.dumps(shown)[:600]}", flush=True)
    failed = [name for name, result in results["settings"].items() if "error" in result]
    if failed:  # the others' results are kept; the exit status says that not all of them ran
        sys.exit(f"these settings failed: {', '.join(failed)} (their output is in the results)")


if __name__ == "__main__":
    main()

"""The GPU check of the speed issue in one command: range test, the 24-epoch fast-path run and the plain
baseline's time, on the stand-in archive, with no DVC or MLflow (the device machine has neither).

    python scripts/gpu_run.py --archive cifar.tar.gz --md5 MD5 --out results.json [--width 64] [--epochs 24]
        [--train-limit N] [--baseline-epochs 1]

1. The LR range test (`lr_finder`, params.yaml's lr_finder keys) on the fast path's batches.
2. `training.fit` for --epochs with the fast path (tensor augmentation, channels_last, bf16 autocast on CUDA,
   torch.compile with --compile): per-epoch history, final test accuracy and wall time.
3. The plain baseline (float32, NCHW, eager, per-image albumentations DataLoader) for --baseline-epochs,
   timed, and its seconds per epoch scaled to --epochs.
4. Model FLOP utilisation: 2.28 GFLOP per training image at width 64 (scaled by width squared) against
   --peak-tflops (H200 bf16 dense: about 989).
Writes everything to --out as JSON and prints a summary. Runs on a CPU too (small --width and
--train-limit), which is how it was tested before a GPU was available.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

from onecycle import augment, batches, data, lr_finder, training  # noqa: E402
from onecycle.config import Params, parse_params  # noqa: E402
from onecycle.model import CustomResNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True)
    parser.add_argument("--md5", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--baseline-epochs", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raw = {
        "data": {"url": args.archive, "md5": args.md5, "train_limit": args.train_limit},
        "augment": {"backend": "tensor"},
        "model": {"width": args.width},
        "train": {"epochs": args.epochs, "peak_epoch": min(5, args.epochs - 1), "compile": args.compile},
    }
    params: Params = parse_params(raw)
    dataset = data.decode_archive(Path(args.archive), params.data)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "params": raw}

    start = time.perf_counter()
    torch.manual_seed(params.train.seed)
    model = CustomResNet(args.width).to(device)
    # as the lr_range_test stage: the momentum of the One Cycle's peak
    optimizer = training.make_optimizer(model, params.train, params.lr_finder.start_lr, params.train.momentum[1])
    loader = batches.TrainLoader(dataset, params.augment, params.train.batch_size, device)
    curve = lr_finder.range_test(model, optimizer, loader.endless(seed=0), params.lr_finder, progress=False)
    found = lr_finder.pick_range(curve, params.lr_finder)
    results["range_test"] = found.as_dict(curve, len(dataset.train.labels)) | {"seconds": time.perf_counter() - start}
    print(f"range test: LRMIN {found.lr_min:.4g}, LRMAX {found.lr_max:.4g}", flush=True)

    torch.manual_seed(params.train.seed)
    model = CustomResNet(args.width)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    history = training.fit(model, dataset, params, found.lr_min, found.lr_max, device, progress=False)
    fast_seconds = time.perf_counter() - start
    images = len(dataset.train.labels) * args.epochs
    achieved = images * bench.FLOP_PER_IMAGE * (args.width / 64) ** 2 / fast_seconds / 1e12
    results["fast"] = {
        "history": [dataclasses.asdict(r) for r in history],
        "test_acc": history[-1].test_acc,
        "seconds": fast_seconds,  # training and per-epoch evaluation, as the stage times it
        "seconds_per_epoch": fast_seconds / args.epochs,
        "achieved_tflops": achieved,
        "model_flop_utilisation": achieved / args.peak_tflops,
    }

    # the plain baseline: same network, float32, NCHW, eager, per-image albumentations in a DataLoader
    torch.manual_seed(params.train.seed)
    plain = CustomResNet(args.width).to(device)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=found.lr_max, momentum=0.9, weight_decay=5e-4)
    transform = augment.train_transform(params.augment, dataset.mean, dataset.std, seed=0)
    per_image = bench.PerImage(dataset.train.images, dataset.train.labels, transform)
    plain_loader = torch.utils.data.DataLoader(per_image, batch_size=params.train.batch_size, shuffle=True)
    start = time.perf_counter()
    for _ in range(args.baseline_epochs):
        bench.baseline_epoch(plain, plain_opt, plain_loader, device)
    per_epoch = (time.perf_counter() - start) / args.baseline_epochs
    results["baseline"] = {"seconds_per_epoch": per_epoch, f"seconds_for_{args.epochs}_epochs": per_epoch * args.epochs}
    results["speedup"] = per_epoch / results["fast"]["seconds_per_epoch"]

    args.out.write_text(json.dumps(results, indent=2) + "\n")
    fast = results["fast"]
    print(
        f"fast path: {fast['test_acc']:.2f}% after {args.epochs} epochs in {fast['seconds']:.1f} s "
        f"({fast['seconds_per_epoch']:.2f} s an epoch, {fast['achieved_tflops']:.1f} TFLOP/s, "
        f"MFU {100 * fast['model_flop_utilisation']:.1f}%); baseline {per_epoch:.2f} s an epoch: "
        f"{results['speedup']:.1f}x"
    )


if __name__ == "__main__":
    main()

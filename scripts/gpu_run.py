"""The GPU check of the speed issue in one command, on the stand-in archive, with no DVC or MLflow (the device
machine has neither). Phases, most important first; each result is written to --out as soon as it exists:

    python scripts/gpu_run.py --archive cifar.tar.gz --md5 MD5 --out results.json [--width 64] [--epochs 24]
        [--batch-size 512] [--train-limit N] [--deadline SECONDS] [--variant NAME:KEY=VALUE,...] [--lr-max LR]
        [--compile] [--reference] [--profile]

1. `peak`: a bf16 matrix product (8192^3 on CUDA), the machine's measured ceiling for FLOP utilisation.
2. `range_test`: the LR range test (params.yaml's lr_finder defaults) on the fast path's batches, and one more
   sweep per --variant (lr_finder keys changed, e.g. `linear:step_mode=linear,pick=max_acc`); every curve is kept.
3. `fast`: `training.fit` for --epochs on the fast path (tensor augmentation on the device, channels_last,
   bf16 autocast on CUDA), eager, from the default sweep's range: per-epoch history, test accuracy, wall time,
   model FLOP utilisation. Then the same from each variant's range that differs from those already trained,
   and from each --lr-max (LRMIN = LRMAX / min_div), keyed by name in `fast_more`.
4. `baseline`: the plain baseline (float32, NCHW, eager, per-image albumentations in a DataLoader), one epoch with
   no worker processes (as `make bench` times it) and one with --workers; seconds per epoch, scaled to --epochs.
5. `fast_compiled` (--compile): phase 3 again with train.compile, the compile's warm-up included.
6. `reference` (--reference): the whole --epochs with the reference path of `training.fit` (albumentations image
   by image, float32, NCHW) and the default range, for accuracy parity.
7. `profile` (--profile): 20 steps of the fast path under torch.profiler; the kernels' table goes to
   profile.txt beside --out.
A phase is skipped, and says so, when its estimated time does not fit before --deadline (seconds from the start).
FLOP: 2.28 GFLOP per training image (forward and backward) at width 64, scaled by width squared; utilisation
is given against --peak-tflops (H200 dense bf16 datasheet: 989) and against the measured matrix product.
Runs on a CPU too (small --width and --train-limit): that is how it is tested before a GPU is lent.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

from onecycle import augment, batches, data, lr_finder, training  # noqa: E402
from onecycle.config import Params, flatten, parse_params, read_yaml  # noqa: E402
from onecycle.errors import UserError  # noqa: E402
from onecycle.model import CustomResNet  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device) -> float:
    """Measured bf16 matrix-product rate, TFLOP/s: mean of 10 products after 3 warm-ups."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def train_run(params: Params, dataset: data.Dataset, found: lr_finder.LRRange, device, flop_per_image, peaks) -> dict:
    torch.manual_seed(params.train.seed)
    model = CustomResNet(params.model.width)
    sync(device)
    start = time.perf_counter()
    history = training.fit(model, dataset, params, found.lr_min, found.lr_max, device, progress=False)
    seconds = time.perf_counter() - start
    epochs = params.train.epochs
    achieved = len(dataset.train.labels) * epochs * flop_per_image / seconds / 1e12
    per_epoch = sorted(r.seconds for r in history)
    return {
        "history": [dataclasses.asdict(r) for r in history],
        "test_acc": history[-1].test_acc,
        "best_test_acc": max(r.test_acc for r in history),
        "seconds": seconds,  # training and per-epoch evaluation, as the stage times it, warm-ups included
        "seconds_per_epoch": seconds / epochs,
        "first_epoch_seconds": history[0].seconds,  # cuDNN autotuning, compilation
        "median_epoch_seconds": per_epoch[len(per_epoch) // 2],
        "achieved_tflops": achieved,
        "model_flop_utilisation": {name: achieved / peak for name, peak in peaks.items()},
    }


def profile(params: Params, dataset: data.Dataset, device: torch.device, steps: int = 20) -> str:
    """The kernels of `steps` fast-path training steps (after as many warm-up steps), by total device time."""
    model = CustomResNet(params.model.width).to(device).to(memory_format=torch.channels_last)
    optimizer = training.make_optimizer(model, params.train, 0.01)
    options = training.StepOptions.of(params.train, device)
    loader = batches.TrainLoader(dataset, params.augment, params.train.batch_size, device)
    schedule = [(0.01, 0.9)] * steps

    def run(epoch: int) -> None:
        data = itertools.islice(loader.epoch(seed=0, epoch=epoch), steps)
        training.train_one_epoch(
            model, optimizer, data, schedule, first_step=0, epoch=epoch, steps=steps, options=options, progress=False
        )
        sync(device)

    run(1)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        run(2)
        seconds = time.perf_counter() - start
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    return f"{steps} steps of {params.train.batch_size} in {seconds:.4f} s (profiled)\n{table}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True)
    parser.add_argument("--md5", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))  # baseline DataLoader
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... of lr_finder")
    parser.add_argument("--lr-max", type=float, action="append", default=[], help="also train from this LRMAX")
    parser.add_argument("--compile", action="store_true", help="also run phase 5, train.compile")
    parser.add_argument("--reference", action="store_true", help="also run phase 6, the reference path")
    parser.add_argument("--profile", action="store_true", help="also run phase 7, the profile")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds from the start")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    began = time.perf_counter()

    def left() -> float:
        return args.deadline - (time.perf_counter() - began)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raw = {
        "data": {"url": args.archive, "md5": args.md5, "train_limit": args.train_limit},
        "augment": {"backend": "tensor"},
        "model": {"width": args.width},
        "train": {"epochs": args.epochs, "peak_epoch": min(5, args.epochs - 1), "batch_size": args.batch_size},
    }
    params: Params = parse_params(raw)
    variants = {"default": params}
    for spec in args.variant:  # parsed as params.yaml would be: a wrong key or value stops here
        name, _, changes = spec.partition(":")
        lr_raw = {k: read_yaml(v) for k, v in (c.split("=", 1) for c in changes.split(",") if c)}
        variants[name] = parse_params(raw | {"lr_finder": lr_raw})
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "params": raw,
        "skipped": {},
    }

    def save(phase: str, value) -> None:
        results[phase] = value
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"[{time.perf_counter() - began:6.1f} s] {phase}: {json.dumps(value)[:300]}", flush=True)

    def skip(phase: str, why: str) -> None:
        results["skipped"][phase] = why
        save("skipped", results["skipped"])

    start = time.perf_counter()
    dataset = data.decode_archive(Path(args.archive), params.data)
    save("decode_seconds", time.perf_counter() - start)
    flop_per_image = bench.FLOP_PER_IMAGE * (args.width / 64) ** 2
    peaks = {"datasheet": args.peak_tflops, "measured_matmul": matmul_tflops(device)}
    save("peak_tflops", peaks)

    ranges, sweeps = {}, {}
    for name, variant in variants.items():
        start = time.perf_counter()
        try:
            curve, found = lr_finder.find_range(variant, dataset, device, progress=False)
        except UserError as exc:  # a variant that finds no range is a finding, not the end of the run
            sweeps[name] = {"error": str(exc)}
            print(f"range test {name}: {exc}", flush=True)
            continue
        ranges[name] = found
        sweeps[name] = found.as_dict(curve, len(dataset.train.labels)) | {
            "lr_finder": {k: v for k, v in flatten(variant).items() if k.startswith("lr_finder.")},
            "seconds": time.perf_counter() - start,
            "curve": curve.rows(),
        }
        print(f"range test {name}: LRMIN {found.lr_min:.4g}, LRMAX {found.lr_max:.4g}", flush=True)
    save("range_test", sweeps)

    save("fast", train_run(params, dataset, ranges["default"], device, flop_per_image, peaks))
    fast_epoch = results["fast"]["seconds_per_epoch"]

    # the plain baseline: same network, float32, NCHW, eager, per-image albumentations in a DataLoader
    baseline = {}
    found = ranges["default"]
    transform = augment.train_transform(params.augment, dataset.mean, dataset.std, seed=0)
    per_image = bench.PerImage(dataset.train.images, dataset.train.labels, transform)
    for workers in sorted({0, args.workers}):
        torch.manual_seed(params.train.seed)
        plain = CustomResNet(args.width).to(device)
        plain_opt = torch.optim.SGD(plain.parameters(), lr=found.lr_max, momentum=0.9, weight_decay=5e-4)
        plain_loader = torch.utils.data.DataLoader(
            per_image, batch_size=params.train.batch_size, shuffle=True, num_workers=workers
        )
        start = time.perf_counter()
        bench.baseline_epoch(plain, plain_opt, plain_loader, device)  # one epoch, its warm-up included
        per_epoch = time.perf_counter() - start
        baseline[f"workers_{workers}"] = {
            "seconds_per_epoch": per_epoch,
            f"seconds_for_{args.epochs}_epochs": per_epoch * args.epochs,
            "speedup_of_fast": per_epoch / fast_epoch,
        }
    save("baseline", baseline)

    # more runs: each variant's range not yet trained (LRMAX within 5% counts as the same), then each --lr-max
    more, trained = {}, [found.lr_max]
    todo = [(name, r.lr_min, r.lr_max) for name, r in ranges.items() if name != "default"]
    todo += [(f"lr_max_{lr:g}", lr / params.lr_finder.min_div, lr) for lr in args.lr_max]
    for name, lr_min, lr_max in todo:
        if any(abs(lr_max / done - 1) < 0.05 for done in trained):
            continue
        if left() < 1.2 * results["fast"]["seconds"]:
            skip(f"fast_more/{name}", f"{left():.0f} s left")
            continue
        chosen = lr_finder.LRRange(lr_min, lr_max, "given", params.lr_finder.min_div, lr_max, float("nan"))
        more[name] = train_run(params, dataset, chosen, device, flop_per_image, peaks) | {"lr_max": lr_max}
        trained.append(lr_max)
        save("fast_more", more)

    if args.profile:
        table = profile(params, dataset, device)
        (args.out.parent / "profile.txt").write_text(table + "\n")
        print(table, flush=True)

    if args.compile:
        estimate = 2 * results["fast"]["seconds"] + 120  # the compile's warm-up: about two minutes at most
        if left() < estimate:
            skip("fast_compiled", f"needs about {estimate:.0f} s, {left():.0f} s left")
        else:
            try:
                compiled = dataclasses.replace(params, train=dataclasses.replace(params.train, compile=True))
                save("fast_compiled", train_run(compiled, dataset, found, device, flop_per_image, peaks))
            except Exception:  # a compiler failure is a finding to bring back, not a reason to lose the rest
                skip("fast_compiled", traceback.format_exc()[-2000:])

    if args.reference:
        slowest = max(b["seconds_per_epoch"] for b in baseline.values())
        estimate = 1.2 * slowest * args.epochs
        if left() < estimate:
            skip("reference", f"needs about {estimate:.0f} s, {left():.0f} s left")
        else:
            augment_ref = dataclasses.replace(params.augment, backend="albumentations")
            train_ref = dataclasses.replace(params.train, precision="fp32", channels_last=False)
            reference = dataclasses.replace(params, augment=augment_ref, train=train_ref)
            save("reference", train_run(reference, dataset, found, device, flop_per_image, peaks))

    fast = results["fast"]
    print(
        f"fast path: {fast['test_acc']:.2f}% after {args.epochs} epochs in {fast['seconds']:.1f} s "
        f"({fast['seconds_per_epoch']:.2f} s an epoch, {fast['achieved_tflops']:.1f} TFLOP/s); baseline "
        + ", ".join(f"{k} {v['seconds_per_epoch']:.2f} s an epoch" for k, v in baseline.items())
    )
    for name, run in more.items():
        print(f"from LRMAX {run['lr_max']:.4g} ({name}): {run['test_acc']:.2f}%")


if __name__ == "__main__":
    main()

"""`make bench`: the project's speed against plain baselines, each pair measured side by side in this run.

    python -m scripts.bench [--out reports/benchmark.json] [--width 16] [--batch-size 256] [--steps 4] [--no-repro]
        [--decode ARCHIVE]

1. Training step throughput (images/s): the project's epoch loop (tensor augmentation on the device,
   channels_last, `training.train_one_epoch`) against a plain baseline of the same network (float32, NCHW,
   eager, a torch DataLoader applying albumentations image by image), alternating, best of --repeat.
2. Augmentation throughput, per core (1 torch thread, as albumentations runs on one): the tensor backend in
   batches of 512 as training runs it (from the dataset padded once) and on one whole batch, against
   albumentations image by image, on the same 5,000 random images, best of 3 after a warm-up, taking turns.
3. The LR range test's cost in training images against the reference's 20 epochs of 50,000.
4. The cost of MLflow's system metrics: training steps with its monitor sampling every second against the same
   steps without it, alternating in one process (a ratio of 1.00x: no cost).
5. `dvc repro` of the whole pipeline at a tiny size (width 4, 200 images, 2 epochs) in a temporary git
   repository: its wall time, each stage's process, DVC's own share, the part after the download stage, and a
   `dvc repro` that has nothing to do (skipped, and said so, with --no-repro or where DVC is not installed).
   device/pipeline.py times the real-size run on a GPU the same way.
5. With --decode ARCHIVE: the download_cifar stage's work on that local archive, the download excluded: the md5
   check, the decode (gunzip, tar checks, records -> NHWC arrays, channel statistics) and the writing of the
   .npy files, each the best of --repeat.
On CUDA it adds the steps' seconds per epoch of 50,000 images and the model FLOP rate (2.28 GFLOP per training
image at width 64, forward + backward), with its utilisation of the GPU's bf16 peak when PEAK_TFLOPS is set.
Prints a Markdown table and writes the figures to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onecycle import augment, batches, data, training
from onecycle.augment_tensor import TensorAugment, to_nchw
from onecycle.config import IMAGE_SIZE, AugmentParams, DataParams, Params, TrainParams
from onecycle.data import Dataset, Split
from onecycle.errors import UserError
from onecycle.model import CustomResNet, training_flop
from onecycle.steps import StepOptions, make_optimizer
from scripts.experiments import tool_main
from scripts.measure import flop_rate, matmul_tflops, sync
from scripts.pipeline_repo import ROOT, cifar_members, pipeline_repo, shim_env, timed_repro, write_archive

REFERENCE_IMAGES = 20 * 50_000  # the reference's range test: 20 one-epoch trainings


class PerImage(torch.utils.data.Dataset):
    """The plain way: albumentations on one image at a time, in a DataLoader."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.transform(image=self.images[i])["image"]  # float32 HWC, normalised
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), int(self.labels[i])


def baseline_epoch(model, optimizer, loader, device) -> None:
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync(device)


def random_dataset(batch_size: int, steps: int) -> Dataset:
    """`steps` batches of random images and labels (seeded), and one batch of them as the test split."""
    n = batch_size * steps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    mean, std = data.channel_stats(images)
    return Dataset(Split(images, labels), Split(images[:batch_size], labels[:batch_size]), (), mean, std)


def train_step_throughput(width: int, batch_size: int, steps: int, repeat: int, device: torch.device) -> dict:
    dataset = random_dataset(batch_size, steps)
    images, labels, n = dataset.train.images, dataset.train.labels, batch_size * steps

    torch.manual_seed(0)
    plain = CustomResNet(width).to(device)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    per_image = PerImage(images, labels, augment.train_transform(AugmentParams(), dataset.mean, dataset.std, seed=0))
    plain_loader = torch.utils.data.DataLoader(per_image, batch_size=batch_size, shuffle=True)

    loader = batches.TrainLoader(dataset, AugmentParams(backend="tensor"), batch_size, device)
    schedule = [(0.01, 0.9)] * steps
    # the project's step as params.yaml runs it (precision auto: bf16 on CUDA, fp32 on the CPU), and with bf16
    # autocast asked for on the CPU too (train.precision: bf16)
    variants = {"project": "auto", "project_bf16": "bf16"} if device.type == "cpu" else {"project": "auto"}
    models = {}
    for name, precision in variants.items():
        train = TrainParams(batch_size=batch_size, channels_last=True, precision=precision)
        model = CustomResNet(width).to(device).to(memory_format=torch.channels_last)
        models[name] = (model, make_optimizer(model, train, 0.01), StepOptions.of(train, device))

    def project_epoch(name: str, epoch: int) -> None:
        model, optimizer, options = models[name]
        data = loader.epoch(seed=0, epoch=epoch)
        training.train_one_epoch(
            model, optimizer, data, schedule, first_step=0, epoch=epoch, steps=steps, options=options, progress=False
        )
        sync(device)

    best = dict.fromkeys(["baseline", *variants], float("inf"))
    for attempt in range(repeat + 1):  # attempt 0 warms up (allocators, cuDNN autotuning)
        for name in best:
            start = time.perf_counter()
            if name == "baseline":
                baseline_epoch(plain, plain_opt, plain_loader, device)
            else:
                project_epoch(name, attempt)
            if attempt:
                best[name] = min(best[name], time.perf_counter() - start)
    rate = {name: n / seconds for name, seconds in best.items()}  # images per second
    result = {
        "width": width,
        "batch_size": batch_size,
        "images_per_run": n,
        "baseline_images_per_s": rate["baseline"],
        "torch_threads": torch.get_num_threads(),
    }
    for name in variants:
        result |= {f"{name}_images_per_s": rate[name], f"{name}_ratio": rate[name] / rate["baseline"]}
    if device.type == "cpu":  # each step's FLOP rate against a 2048^3 matrix product of its precision
        for name, dtype in (("project", torch.float32), ("project_bf16", torch.bfloat16)):
            result[f"{name}_matmul_gflops"] = 1e3 * matmul_tflops(device, dtype, 2048)
            result[f"{name}_gflops"] = n * training_flop(width) / best[name] / 1e9
    if device.type == "cuda":
        seconds_per_epoch = 50_000 / rate["project"]
        peak = float(os.environ.get("PEAK_TFLOPS", "0") or 0)
        result |= {"seconds_per_epoch_of_50000": seconds_per_epoch, "seconds_for_24_epochs": 24 * seconds_per_epoch}
        result |= flop_rate(n, best["project"], width, {"datasheet": peak} if peak else {})
    return result


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, object]:
    """The fastest of `repeat` timed calls of fn (seconds), and its last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def augmentation(n_images: int = 5000, repeat: int = 3, batch_size: int = 512) -> dict:
    """Images/s of both augmentation backends on one random uint8 batch, one torch thread, best of `repeat`
    after a warm-up, the backends taking turns so that both see the same load."""
    images = np.random.default_rng(0).integers(0, 256, (n_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    mean, std = data.channel_stats(images)
    params = AugmentParams()
    transform = augment.train_transform(params, mean, std, seed=0)
    augmenter = TensorAugment(params, mean, std)
    nchw = to_nchw(images)  # converted once beforehand, as the fast path keeps its dataset
    stored = augmenter.store(images)  # padded once for all epochs, as TensorAugment.store keeps it in training
    generator = torch.Generator().manual_seed(0)
    runs = {
        "albumentations": lambda: augment.augment_batch(transform, images),
        "tensor": lambda: augmenter(nchw, generator),
        "tensor_batched": lambda: [
            augmenter(stored[i : i + batch_size], generator, padded=True) for i in range(0, n_images, batch_size)
        ],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: albumentations runs on one
    try:
        best = dict.fromkeys(runs, float("inf"))
        for attempt in range(repeat + 1):  # attempt 0 is the warm-up
            for name, run in runs.items():
                seconds, _ = best_of(1, run)
                if attempt:
                    best[name] = min(best[name], seconds)
    finally:
        torch.set_num_threads(threads)
    rate = {name: n_images / seconds for name, seconds in best.items()}  # images per second
    return {
        "n_images": n_images,
        "repeat": repeat,
        "threads": 1,
        "batch_size": batch_size,
        "albumentations_images_per_s": rate["albumentations"],
        "tensor_images_per_s": rate["tensor"],
        "ratio": rate["tensor"] / rate["albumentations"],
        "tensor_batched_images_per_s": rate["tensor_batched"],
        "batched_ratio": rate["tensor_batched"] / rate["albumentations"],
    }


def decode(archive: Path, repeat: int) -> dict:
    """The download_cifar stage's work on a local archive, the download excluded (seconds, best of `repeat`)."""
    if not archive.is_file():
        raise UserError(f"--decode {archive}: no such file")
    md5_s, md5 = best_of(repeat, lambda: hashlib.md5(archive.read_bytes()).hexdigest())
    decode_s, dataset = best_of(repeat, lambda: data.decode_archive(archive, DataParams(url=str(archive), md5=md5)))
    with tempfile.TemporaryDirectory() as tmp:
        meta = {"classes": list(dataset.classes), "mean": list(dataset.mean), "std": list(dataset.std)}
        write_s, _ = best_of(repeat, lambda: data.write_arrays(dataset, Path(tmp), meta))
    images = len(dataset.train.labels) + len(dataset.test.labels)
    seconds = {"md5_seconds": md5_s, "decode_seconds": decode_s, "write_seconds": write_s}
    return {"archive": str(archive), "images": images, "repeat": repeat, **seconds, "seconds": sum(seconds.values())}


def range_test_cost() -> dict:
    params = Params()
    planned = params.lr_finder.num_iter * params.train.batch_size
    result = {"planned_images": planned, "reference_images": REFERENCE_IMAGES, "ratio": REFERENCE_IMAGES / planned}
    found = ROOT / "reports" / "lr_range.json"
    if found.exists():
        seen = json.loads(found.read_text())["images_seen"]
        result |= {"last_run_images": seen, "last_run_ratio": REFERENCE_IMAGES / seen}
    return result


def repro_timing(repeat: int) -> dict | None:
    """`dvc repro` of the whole pipeline at a tiny size in a temporary git repo, timed from outside, each stage's
    process timed by a `python` shim; then the best of `repeat` runs with nothing to do. None without DVC."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the temporary repo's own mlflow.db
    if shutil.which("dvc", path=env["PATH"]) is None:
        return None
    tiny = {"model.width": 4, "train.epochs": 2, "lr_finder.num_iter": 10}
    sizes = {"train_images": 200, "test_images": 50} | tiny
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "cifar.tar.gz"
        md5 = write_archive(archive, cifar_members(train=sizes["train_images"], test=sizes["test_images"]))
        overrides = tiny | {"data.url": str(archive), "data.md5": md5, "lr_finder.start_lr": 1e-3}
        overrides |= {"train.peak_epoch": 1, "train.batch_size": 64, "train.device": "cpu"}
        repo = pipeline_repo(Path(tmp) / "repo", overrides)
        times = Path(tmp) / "stage_times.txt"
        env = shim_env(Path(tmp) / "shim", times, env)
        # the copy's library, as in a clean checkout (ahead of any PYTHONPATH: carried packages on a device)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo / "src"), os.environ.get("PYTHONPATH")]))

        def sh(*args: str) -> int:
            subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)
            return 0

        result = timed_repro([], times, lambda command: sh(*command))
        noop, _ = best_of(repeat, lambda: sh("dvc", "repro"))
        return result | {"sizes": sizes, "noop_seconds": noop}


def system_metrics_cost(width: int, batch_size: int, steps: int, repeat: int, device: torch.device) -> dict:
    """Training steps with MLflow's system-metrics monitor sampling (what every training run logs: CPU, memory,
    disk, network, GPU) against the same steps without it, in this process, alternating, best of `repeat`. It
    samples every second here, ten times as often as in the stages (tracking.SYSTEM_METRICS_SECONDS), into a
    SQLite store of its own, and each timed window lasts at least 3 s, so that it holds samples."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no line per monitor start and stop

    dataset, n = random_dataset(batch_size, steps), batch_size * steps
    train = TrainParams(batch_size=batch_size, channels_last=True)
    loader = batches.TrainLoader(dataset, AugmentParams(backend="tensor"), batch_size, device)
    options = training.StepOptions.of(train, device)
    model = options.place(CustomResNet(width), device)
    optimizer = training.make_optimizer(model, train, 0.01)

    def window(rounds: int) -> float:
        start = time.perf_counter()
        for r in range(rounds):
            training.train_one_epoch(
                model, optimizer, loader.epoch(seed=0, epoch=r), [(0.01, 0.9)] * steps, first_step=0, epoch=r,
                steps=steps, options=options, progress=False,
            )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rounds = max(1, int(np.ceil(3.0 / window(1))))  # the first window also warms up
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("bench")).info.run_id
        best = {"off": float("inf"), "on": float("inf")}
        for _ in range(repeat):
            best["off"] = min(best["off"], window(rounds))
            monitor = SystemMetricsMonitor(run_id, sampling_interval=1, tracking_uri=uri)
            monitor.start()
            best["on"] = min(best["on"], window(rounds))
            monitor.finish()
        samples = len(client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    return {
        "images_per_window": n * rounds,
        "seconds_without": best["off"],
        "seconds_with": best["on"],
        "ratio": best["off"] / best["on"],  # throughput with the monitor / without: 1 = no cost
        "samples_logged": samples,
        "sampling_seconds": 1,
    }


@tool_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmark.json")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed run")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-repro", action="store_true", help="skip the `dvc repro` timing")
    parser.add_argument("--decode", type=Path, metavar="ARCHIVE", help="also time download_cifar's work on it")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    step = train_step_throughput(args.width, args.batch_size, args.steps, args.repeat, device)
    aug = augmentation()
    cost = range_test_cost()
    system = system_metrics_cost(args.width, args.batch_size, args.steps, args.repeat + 1, device)
    repro = None if args.no_repro else repro_timing(repeat=3)
    decoded = args.decode and decode(args.decode, repeat=3)
    results = {
        "device": str(device),
        "train_step": step,
        "augmentation": aug,
        "range_test": cost,
        "system_metrics": system,
        "noop_repro_seconds": repro and repro["noop_seconds"],
        "repro": repro,
        "decode": decoded,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"| measure ({device}) | baseline | project | ratio |")
    print("| --- | --- | --- | --- |")
    steps = (("project", "project step", "float32"), ("project_bf16", "project step, train.precision: bf16", "bf16"))
    for name, label, dtype in steps:
        if f"{name}_images_per_s" not in step:
            continue
        rate, ratio = step[f"{name}_images_per_s"], step[f"{name}_ratio"]
        print(
            f"| training step, width {step['width']}, batch {step['batch_size']}: {label} (images/s) | "
            f"{step['baseline_images_per_s']:,.0f} | {rate:,.0f} | {ratio:.2f}x |"
        )
        if f"{name}_gflops" in step:  # on the CPU: against a matrix product of the step's precision
            matmul, achieved = step[f"{name}_matmul_gflops"], step[f"{name}_gflops"]
            print(f"| - its GFLOP/s against a 2048^3 {dtype} matrix product | {matmul:,.0f} | {achieved:,.0f} | "
                  f"{achieved / matmul:.0%} |")  # fmt: skip
    print(
        f"| augmentation, batches of 512 (images/s, 1 thread) | {aug['albumentations_images_per_s']:,.0f} | "
        f"{aug['tensor_batched_images_per_s']:,.0f} | {aug['batched_ratio']:.1f}x |"
    )
    print(
        f"| LR range test (training images) | {cost['reference_images']:,} | {cost['planned_images']:,} | "
        f"{cost['ratio']:.1f}x fewer |"
    )
    print(
        f"| training steps with MLflow system metrics sampled every {system['sampling_seconds']} s (images/s; "
        f"{system['samples_logged']} samples) | {system['images_per_window'] / system['seconds_without']:,.0f} | "
        f"{system['images_per_window'] / system['seconds_with']:,.0f} | {system['ratio']:.3f}x |"
    )
    if repro is None:
        print("| `dvc repro` (s) | | not measured (--no-repro, or DVC is not installed) | |")
    else:
        sizes = repro["sizes"]
        tiny = f"width {sizes['model.width']}, {sizes['train_images']} images, {sizes['train.epochs']} epochs"
        print(f"| `dvc repro`, whole pipeline at {tiny} (s) | | {repro['seconds']:.2f} | |")
        for name, seconds in repro["stage_seconds"].items():
            print(f"| - stage {name}, its process (s) | | {seconds:.2f} | |")
        print(f"| - DVC's own share (s) | | {repro['dvc_seconds']:.2f} | |")
        print(f"| - after the download stage (s) | | {repro['after_download_seconds']:.2f} | |")
        print(f"| `dvc repro` with nothing to do (s) | | {repro['noop_seconds']:.2f} | |")
    if decoded:
        what = f"download_cifar's work on {decoded['images']:,} images, best of {decoded['repeat']} (s)"
        print(f"| {what}: md5, decode, write .npy | | {decoded['md5_seconds']:.2f}, {decoded['decode_seconds']:.2f}, "
              f"{decoded['write_seconds']:.2f}: {decoded['seconds']:.2f} | |")  # fmt: skip
    if "seconds_per_epoch_of_50000" in step:
        print(f"| seconds per epoch of 50,000 | | {step['seconds_per_epoch_of_50000']:.2f} | |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

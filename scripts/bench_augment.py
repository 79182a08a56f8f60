"""Images per second of the two training-augmentation backends on the CPU, side by side in one process.

    python scripts/bench_augment.py [--images 5000] [--repeat 3] [--threads 1] [--batch-size 512]

Both backends augment the same uint8 batch with the default params: albumentations (`augment.augment_batch`,
one image at a time, NHWC numpy in) and the tensor backend (`augment_tensor.TensorAugment`, the whole batch at
once, NCHW tensor in, converted once beforehand as the fast path keeps its dataset). Each figure is the best of
--repeat timed runs after one warm-up, the backends taking turns so that both see the same load. The tensor
backend is also timed as training runs it: in batches of --batch-size from the dataset as `TensorAugment.store`
keeps it (padded once for all epochs), whose smaller outputs the allocator recycles.

`measure()` returns the figures as a dict, for a script that writes them to JSON.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from onecycle import augment, data
from onecycle.augment_tensor import TensorAugment, to_nchw
from onecycle.config import IMAGE_SIZE, AugmentParams


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(n_images: int = 5000, repeat: int = 3, threads: int | None = 1, batch_size: int = 512) -> dict:
    """Images/s of both backends on one random uint8 batch of `n_images`, best of `repeat` after a warm-up.

    `threads`: torch's intra-op threads while measuring (restored afterwards); 1 compares the backends per core,
    as albumentations runs on one. None leaves torch's setting.
    """
    images = np.random.default_rng(0).integers(0, 256, (n_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    mean, std = data.channel_stats(images)
    params = AugmentParams()
    transform = augment.train_transform(params, mean, std, seed=0)
    augmenter = TensorAugment(params, mean, std)
    nchw = to_nchw(images)
    stored = augmenter.store(images)  # once, outside the timing: the fast path keeps its dataset padded like this
    generator = torch.Generator().manual_seed(0)

    runs = {
        "albumentations": lambda: augment.augment_batch(transform, images),
        "tensor": lambda: augmenter(nchw, generator),
        "tensor_batched": lambda: [
            augmenter(stored[i : i + batch_size], generator, padded=True) for i in range(0, n_images, batch_size)
        ],
    }
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        best = {name: float("inf") for name in runs}
        for attempt in range(repeat + 1):  # attempt 0 is the warm-up
            for name, run in runs.items():
                seconds = _seconds(run)
                if attempt > 0:
                    best[name] = min(best[name], seconds)
    finally:
        torch.set_num_threads(previous_threads)

    rate = {name: n_images / seconds for name, seconds in best.items()}  # images per second
    return {
        "n_images": n_images,
        "repeat": repeat,
        "threads": torch.get_num_threads() if threads is None else threads,
        "batch_size": batch_size,
        "albumentations_images_per_s": rate["albumentations"],
        "tensor_images_per_s": rate["tensor"],
        "ratio": rate["tensor"] / rate["albumentations"],
        "tensor_batched_images_per_s": rate["tensor_batched"],
        "batched_ratio": rate["tensor_batched"] / rate["albumentations"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    r = measure(args.images, args.repeat, args.threads or None, args.batch_size)
    print(f"{r['n_images']:,} images, best of {r['repeat']}, {r['threads']} torch thread(s)")
    print(f"albumentations           {r['albumentations_images_per_s']:>10,.0f} images/s")
    print(f"tensor, one batch        {r['tensor_images_per_s']:>10,.0f} images/s   {r['ratio']:5.1f}x")
    print(
        f"tensor, batches of {r['batch_size']:<5} {r['tensor_batched_images_per_s']:>10,.0f} images/s   "
        f"{r['batched_ratio']:5.1f}x"
    )


if __name__ == "__main__":
    main()

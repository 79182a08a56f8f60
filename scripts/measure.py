"""What a speed figure is measured against, shared by `make bench`, the study tool and the device pipeline: the
device's name, the measured bf16 matrix-product peak, and the model FLOP rate and utilisation of a training."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from onecycle.model import training_flop

H200_DATASHEET_TFLOPS = 989.0  # an H200's dense bf16 peak on its datasheet


def device_name(device: torch.device) -> str:
    """'NVIDIA H200' for a GPU; for the CPU its model, cores and the kernels torch uses on it
    ('cpu: Intel(R) Xeon(R) Processor, 2 cores, AVX512'): float rounding, and so an LR pick, depends on them."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine() or "unknown"
    try:
        names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else model
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """Measured matrix-product rate, TFLOP/s: mean of 10 products of n x n (8192 on CUDA, 512 on the CPU unless
    given) after 3 warm-ups. The peak that model FLOP utilisation is given against."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def flop_rate(images: int, seconds: float, width: int, peaks: dict[str, float]) -> dict:
    """The model FLOP rate of training `images` images (forward + backward, 2.28 GFLOP each at width 64, scaling
    with width squared) in `seconds`: achieved_tflops, and flop_utilisation as a share of each named peak."""
    achieved = images * training_flop(width) / seconds / 1e12
    return {"achieved_tflops": achieved, "flop_utilisation": {name: achieved / peak for name, peak in peaks.items()}}

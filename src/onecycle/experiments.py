"""What `scripts/study.py`, `scripts/seeds.py` (`make seeds`) and the airbench side-by-side share: params
overrides read as `dvc exp run -S` reads them, the summary of test accuracy over seeds (the format of
reports/seeds.json), and the device's name.

An override is `KEY=VALUE`: KEY a dotted key of params.yaml (`train.weight_decay`), VALUE read as YAML the
way DVC reads it (`1e-3` is a number, `[0.9, 0.8]` a list). Applying overrides only edits the mapping; the
result still goes through `config.parse_params`, which names any wrong key or value.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from onecycle.config import read_yaml
from onecycle.errors import UserError


def parse_override(text: str) -> tuple[str, Any]:
    """'train.seed=3' -> ('train.seed', 3), the value read as DVC reads `-S` values."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {text!r} is not KEY=VALUE (for example train.weight_decay=1e-3)")
    try:
        return key, read_yaml(value)
    except Exception as exc:  # yaml's errors span lines: keep the first
        raise UserError(f"override {key}: {value!r} is not a YAML value ({str(exc).splitlines()[0]})") from None


def apply_overrides(raw: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the params mapping `raw` with each dotted key set to its value (sections made as needed)."""
    result = copy.deepcopy(dict(raw or {}))
    for key, value in overrides.items():
        *sections, last = key.split(".")
        node = result
        for depth, part in enumerate(sections):
            child = node.setdefault(part, {})
            if child is None:  # an empty section in params.yaml
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(sections[: depth + 1])
                raise UserError(f"override {key}: {where} is a value ({child!r}), not a section of keys")
            node = child
        node[last] = copy.deepcopy(value)
    return result


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """n, median, mean, min, max and std (the sample standard deviation, n - 1; null below two values)."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "median": None, "mean": None, "min": None, "max": None, "std": None}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
    }


def seeds_summary(runs: list[dict], device: str, width: int) -> dict:
    """The format of reports/seeds.json (`make seeds`), also used by the studies under docs/: the summary of the
    runs' test_acc, the device, model.width and the runs (seed, exp_name, test_acc, lr_min, lr_max,
    mlflow_run_id, ...)."""
    return summarize(r["test_acc"] for r in runs) | {"device": device, "width": width, "runs": runs}


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

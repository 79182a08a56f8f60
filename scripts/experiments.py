"""What the tools share (scripts/, research/, device/): params overrides read as `dvc exp run -S` reads them,
the summary of test accuracy over seeds (the format of reports/seeds.json), the commit a result was made at,
and the `main` wrapper that turns a UserError into one line.

An override is `KEY=VALUE`: KEY a dotted key of params.yaml (`train.weight_decay`), VALUE read as YAML 1.2, the
way DVC reads it (`1e-3` is a number, `[0.9, 0.8]` a list). Applying overrides only edits the mapping; the
result still goes through `config.parse_params`, which names any wrong key or value.

Neither torch nor MLflow is imported here: the device's `prepare` runs on a Python that has neither.
"""

from __future__ import annotations

import copy
import functools
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

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


def read_params(path: Path | str, what: str = "--params") -> dict[str, Any]:
    """The mapping of a params file, read as the stages read it (before any check of its keys)."""
    try:
        return read_yaml(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{what} {path}: {' '.join(str(exc).split())}") from None


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


def seeds_summary(runs: list[dict], device: str, width: int | None) -> dict:
    """The format of reports/seeds.json (`make seeds`), also used by the studies under docs/: the summary of the
    runs' test_acc, the device, model.width and the runs (seed, exp_name, test_acc, lr_min, lr_max,
    mlflow_run_id, ...)."""
    return summarize(r["test_acc"] for r in runs) | {"device": device, "width": width, "runs": runs}


def git_commit(folder: Path | None = None) -> dict[str, Any]:
    """{"commit": HEAD, "uncommitted_changes": whether files differ from it (untracked ones too: a device call
    carries them)} of the repository at `folder` (default: the working folder's); {"commit": "unknown"} outside
    git. What a result records; the MLflow runs' tag is tracking.git_commit's."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "status", "--porcelain"], cwd=folder, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown"}
    return {"commit": head.stdout.strip(), "uncommitted_changes": bool(changed.stdout.strip())}


def tool_main(main: Callable[[], int | None]) -> Callable[[], None]:
    """Wrap a tool's main(): what it returns is the exit status; a UserError prints `error: ...` on stderr and
    exits 2 (what to fix: a param, a setting, a missing folder), before or instead of any work."""

    @functools.wraps(main)
    def wrapper() -> None:
        try:
            status = main()
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        sys.exit(status or 0)

    return wrapper

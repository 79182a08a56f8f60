"""The pipeline in a temporary repository, for the tests, `make bench`, the browser check and the device call:
a small made-up archive in the official CIFAR-10 binary layout, a fresh repository holding this checkout's
pipeline with params.yaml overridden, and `dvc repro` timed stage by stage."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scripts.experiments import apply_overrides, read_params

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose pipeline is copied
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORD = 3073  # bytes: 1 label + 32 x 32 x 3 pixels
SHIM = Path(__file__).with_name("python_shim.sh")


def make_records(n: int, seed: int) -> bytes:
    """n records of 1 label byte + 3,072 pixel bytes. Each class gets its own mean colour, so a small
    network can learn it in a few steps (tests that train need the loss to fall)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    base = (np.arange(10)[:, None] * np.array([25, 11, 7]) % 256).astype(np.float64)  # (10 classes, RGB)
    pixels = base[labels][:, :, None] + rng.normal(0, 40, size=(n, 3, 1024))
    records = np.empty((n, RECORD), np.uint8)
    records[:, 0] = labels
    records[:, 1:] = np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, -1)
    return records.tobytes()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(path: Path, members: Mapping[str, bytes], extra: Callable | None = None) -> str:
    """A .tar.gz with these members (and `extra(tar)` adding odd ones); returns its md5."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for name, data in members.items():
            add_member(tar, name, data)
        if extra:
            extra(tar)
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_members(train: int = 100, test: int = 40, seed: int = 0) -> dict[str, bytes]:
    """The official layout, `train` images spread over the five batches, `test` in test_batch.bin."""
    per = -(-train // 5)
    blob = make_records(train, seed)
    members = {
        f"cifar-10-batches-bin/data_batch_{b + 1}.bin": blob[b * per * RECORD : (b + 1) * per * RECORD]
        for b in range(5)
    }
    members["cifar-10-batches-bin/test_batch.bin"] = make_records(test, seed + 1)
    members["cifar-10-batches-bin/batches.meta.txt"] = ("\n".join(CLASSES) + "\n").encode()
    members["cifar-10-batches-bin/readme.html"] = b"<html>the official archive has this</html>"
    return members


def pipeline_repo(repo: Path, overrides: Mapping[str, Any]) -> Path:
    """A new repository at `repo` with this checkout's pipeline (dvc.yaml, stages/, src/, DVC's config) and its
    params.yaml with `overrides` (dotted keys, as `dvc exp run -S`), committed; DVC without git where git is
    missing (a lent GPU machine)."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("stages", "src", ".dvc"):  # not DVC's cache and state, nor bytecode
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__"))
    params = apply_overrides(read_params(ROOT / "params.yaml"), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not shutil.which("git"):
        (repo / ".dvc" / "config").write_text("[core]\n    analytics = false\n    no_scm = true\n")
        return repo
    for command in (
        ["init", "-q"],
        ["config", "user.email", "pipeline@example.com"],
        ["config", "user.name", "pipeline"],
        ["add", "-A"],
        ["commit", "-qm", "pipeline"],
    ):
        subprocess.run(["git", *command], cwd=repo, check=True, capture_output=True)
    return repo


def shim_env(folder: Path, times: Path, env: Mapping[str, str]) -> dict[str, str]:
    """`env` with a `python` first on PATH that runs this interpreter and appends each process's start and end
    (epoch seconds), exit status and script to `times` (scripts/python_shim.sh): it times each stage of a
    `dvc repro`, whose stage commands call `python`."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIM, folder / "python")
    (folder / "python").chmod(0o755)
    path = os.pathsep.join([str(folder), env.get("PATH", "")])
    return dict(env) | {"PATH": path, "SHIM_PYTHON": sys.executable, "SHIM_TIMES": str(times)}


def stage_names() -> dict[str, str]:
    """Each stage script dvc.yaml runs (`stages/find_lr_range.py`) -> its stage's name (`lr_range_test`)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {re.search(r"stages/\S+\.py", stage["cmd"]).group(): name for name, stage in stages.items()}


def timed_repro(args: list[str], times: Path, call: Callable[[list[str]], int | None]) -> dict:
    """`call(["dvc", "repro", *args])` (it returns the exit status) timed from outside: the whole run, each
    stage's process (from the shim's `times`), DVC's own share and the part after the download stage."""
    times.write_text("")
    start = time.time()
    status = call(["dvc", "repro", *args])
    end = time.time()
    result: dict = {"command": shlex.join(["dvc", "repro", *args]), "exit_status": status, "seconds": end - start}
    stages, download_end = {}, None
    for line in times.read_text().splitlines():
        began, ended, code, script = line.split(maxsplit=3)
        name = stage_names().get(script, script)
        stages[name] = float(ended) - float(began)
        if code != "0":
            result.setdefault("failed_stages", []).append(name)
        if name == "download_cifar":
            download_end = float(ended)
    result["stage_seconds"] = stages
    result["dvc_seconds"] = result["seconds"] - sum(stages.values())  # DVC's own start-up, hashing and caching
    if download_end is not None:  # from the end of the download stage's process to the end of `dvc repro`
        result["after_download_seconds"] = end - download_end
    return result

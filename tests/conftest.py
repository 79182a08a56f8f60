"""Fixtures: tiny CIFAR-10 archives in the official binary layout, and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORD = 3073
# the seven pictures plot_reports writes (CONTRACT.md, Outputs)
PLOTS = frozenset(
    {
        "cyclic_lr.png",
        "lr_range.png",
        "one_cycle.png",
        "accuracy.png",
        "loss.png",
        "misclassified.png",
        "confusion_matrix.png",
    }
)


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


def write_archive(path: Path, members: dict[str, bytes], extra=None) -> str:
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


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> tuple[Path, str]:
    """A 100 + 40 image archive in the official layout, and its md5."""
    path = tmp_path_factory.mktemp("archive") / "cifar-10-binary.tar.gz"
    return path, write_archive(path, cifar_members())


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory) -> tuple[Path, str]:
    """A 600 + 200 image archive, enough for a few training steps that learn something."""
    path = tmp_path_factory.mktemp("archive") / "cifar-10-binary.tar.gz"
    return path, write_archive(path, cifar_members(train=600, test=200))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture()
def http_dir(tmp_path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a fresh folder: yields (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


def pipeline_repo(repo: Path, archive: tuple[Path, str], width: int) -> Path:
    """A git repository at `repo` with this pipeline (dvc.yaml, stages, the library) and params.yaml at a tiny size:
    the archive, `width`, a 15-step range test, 2 epochs of batches of 64 on the CPU."""
    root = Path(__file__).resolve().parents[1]
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(root / name, repo / name)
    for folder in ("stages", "src", ".dvc"):
        shutil.copytree(root / folder, repo / folder, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(url=str(archive[0]), md5=archive[1])
    params["model"]["width"] = width
    params["lr_finder"].update(num_iter=15, start_lr=1e-3, end_lr=1.0)
    params["train"].update(epochs=2, peak_epoch=1, batch_size=64, device="cpu")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "test"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "pipeline"],
    ):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    return repo

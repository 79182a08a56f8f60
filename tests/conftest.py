"""Fixtures: tiny CIFAR-10 archives in the official binary layout (scripts/pipeline_repo.py makes them), the
pipeline in a temporary repository at a tiny size, and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.pipeline_repo import cifar_members, pipeline_repo, write_archive

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

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


def tiny_repo(repo: Path, archive: tuple[Path, str], width: int) -> Path:
    """A git repository at `repo` with this pipeline at a tiny size: the archive, `width`, a 15-step range test,
    2 epochs of batches of 64 on the CPU. The pick is `budget`, which reads train.epochs: the tests of re-picking
    without a sweep change the epochs alone (the default, `fine`, runs in a test of its own)."""
    sizes = {"model.width": width, "lr_finder.num_iter": 15, "lr_finder.start_lr": 1e-3, "lr_finder.end_lr": 1.0}
    sizes["lr_finder.pick"] = "budget"
    sizes |= {"train.epochs": 2, "train.peak_epoch": 1, "train.batch_size": 64, "train.device": "cpu"}
    return pipeline_repo(repo, sizes | {"data.url": str(archive[0]), "data.md5": archive[1]})

"""Writing outputs so that a kill at any moment leaves either the old output or the new one, never half of one.

Everything is written under a temporary name beside its target (`.NAME.tmp-PID`) and renamed into place.
Temporaries that a killed run left behind are removed by the next write of the same target.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    """A fresh temporary name beside `path`, after clearing what killed runs left there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        _remove(stale)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes(path: Path, payload: bytes) -> None:
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: object) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Floats as repr(): exact, and the same bytes for the same values."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    write_bytes(path, text.getvalue().encode())


def torch_save(obj: object, path: Path) -> None:
    import torch  # here, not at the top: the download stage writes no tensor and skips torch's 1 s import

    path = Path(path)
    tmp = _temporary(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """An empty folder to fill; when the block ends without error it replaces `target` whole."""
    target = Path(target)
    staged = _temporary(target)
    staged.mkdir()
    try:
        yield staged
        old = target.with_name(f".{target.name}.tmp-old-{os.getpid()}")
        if target.exists():
            os.replace(target, old)  # the old folder goes only once the new one is in place
        os.replace(staged, target)
        _remove(old)
    finally:
        _remove(staged)

"""A few hundred damaged archives: truncations, flipped bytes, forged tar headers. Each is refused with one
clear UserError (never another exception), and the earlier decoded data stays as it was."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
from pathlib import Path

import pytest

from onecycle import data
from onecycle.config import DataParams
from onecycle.errors import UserError
from scripts.pipeline_repo import cifar_members, write_archive


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[bytes, str, Path]:
    folder = tmp_path_factory.mktemp("faults")
    path = folder / "good.tar.gz"
    md5 = write_archive(path, cifar_members(train=50, test=20))
    out = folder / "data" / "cifar10"
    data.prepare(DataParams(url=str(path), md5=md5), out, progress=False)
    return path.read_bytes(), md5, out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def refuse(blob: bytes, md5: str, folder: Path, out: Path) -> str:
    """Decode `blob` as the archive with md5 `md5`: it must fail with a UserError; returns its message."""
    path = folder / "bad.tar.gz"
    path.write_bytes(blob)
    with pytest.raises(UserError) as info:
        data.prepare(DataParams(url=str(path), md5=md5), out, progress=False)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600
    return message


def damaged(good: bytes, count: int, seed: int):
    """(kind, bytes) of `count` damaged copies: truncations and flipped bytes at random offsets."""
    rng = random.Random(seed)
    for i in range(count):
        if i % 2:
            yield "truncated", good[: rng.randrange(0, len(good))]
        else:
            blob = bytearray(good)
            # bytes 3..9 of the gzip header (flags such as FTEXT, mtime, OS) are hints: a flip there is no damage
            offset = rng.choice([rng.randrange(3), rng.randrange(10, len(blob))])
            blob[offset] ^= 1 << rng.randrange(8)
            yield "flipped", bytes(blob)


def test_with_the_expected_md5_every_damaged_archive_is_refused_by_the_md5_check(good, tmp_path):
    blob, md5, out = good
    before = snapshot(out)
    for _, bad in damaged(blob, 150, seed=1):
        assert refuse(bad, md5, tmp_path, out).startswith(f"md5 of {tmp_path / 'bad.tar.gz'} is ")
    assert snapshot(out) == before


def test_with_their_own_md5_damaged_archives_are_refused_as_corrupt(good, tmp_path):
    """A user who set data.md5 to the damaged file's own md5 still gets a clear refusal: the gzip CRC,
    the tar structure and the record checks catch every damaged byte."""
    blob, _, out = good
    before = snapshot(out)
    kinds = {"truncated": 0, "flipped": 0}
    for kind, bad in damaged(blob, 200, seed=2):
        message = refuse(bad, hashlib.md5(bad).hexdigest(), tmp_path, out)
        assert any(
            text in message
            for text in ("is truncated or corrupt", "not a whole number", "has label", "lacks", "unexpected member")
        ), message
        kinds[kind] += 1
    assert kinds == {"truncated": 100, "flipped": 100}
    assert snapshot(out) == before


def forged_header(good: bytes, field: slice, value: bytes) -> bytes:
    """The archive with one field of its first tar header overwritten (and the gzip rebuilt around it)."""
    tar = bytearray(gzip.decompress(good))
    tar[field] = value.ljust(field.stop - field.start, b"\0")[: field.stop - field.start]
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(bytes(tar))
    return out.getvalue()


@pytest.mark.parametrize(
    "field, value",
    [
        (slice(0, 100), b"../../../etc/passwd"),  # name escapes the folder (checksum now wrong)
        (slice(124, 136), b"77777777777"),  # size: far past the end
        (slice(124, 136), b"zzzz"),  # size: not octal
        (slice(148, 156), b"000000"),  # checksum
        (slice(156, 157), b"2"),  # type: symlink
        (slice(156, 157), b"3"),  # type: character device
        (slice(257, 263), b"garbage"),  # magic
        (slice(0, 512), b"\0"),  # a zeroed header: the archive looks empty
    ],
)
def test_forged_tar_headers_are_refused(good, tmp_path, field, value):
    blob, _, out = good
    before = snapshot(out)
    bad = forged_header(blob, field, value)
    refuse(bad, hashlib.md5(bad).hexdigest(), tmp_path, out)
    assert snapshot(out) == before

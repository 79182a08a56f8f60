"""CIFAR-10: download the binary archive, check it, decode it with numpy, and load the decoded arrays.

The binary layout (cifar-10-binary.tar.gz) holds, under cifar-10-batches-bin/, data_batch_1..5.bin and
test_batch.bin (records of 1 label byte + 3,072 pixel bytes: the R, G and B planes of a 32x32 image, each
row-major) and batches.meta.txt (the class names, one a line). Nothing here unpickles anything.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from onecycle import outputs
from onecycle.config import DataParams
from onecycle.errors import UserError

FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
SKIPPED_FILES = ("readme.html",)  # in the official archive, not needed
RECORD_BYTES = 1 + 3 * 32 * 32  # per image: label byte + R, G, B planes
MAX_RECORDS_PER_FILE = 10_000  # the official batches hold exactly this many
MAX_META_BYTES = 4096
NUM_CLASSES = 10
CHUNK_BYTES = 1 << 20  # per read while downloading
TIMEOUT_S = 30  # per blocking network operation


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, 32, 32, 3), NHWC
    labels: np.ndarray  # int64 (N,)


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    classes: tuple[str, ...]
    mean: tuple[float, float, float]  # per channel, pixel units (0..255), of the training images kept
    std: tuple[float, float, float]


def _offline_hint(url: str) -> str:
    return (
        f"cannot download {url}. Without internet, copy cifar-10-binary.tar.gz onto this machine and set "
        "data.url in params.yaml to its local path (or a file:// URL) and data.md5 to its md5"
    )


def _as_url(location: str) -> str:
    """A plain local path becomes a file:// URL, so every source goes through one code path."""
    if urllib.parse.urlparse(location).scheme in ("http", "https", "file"):
        return location
    return Path(location).expanduser().resolve().as_uri()


def download(url: str, dest: Path, expected_md5: str, *, progress: bool = True) -> None:
    """Stream `url` into the new file `dest` with a byte progress bar; raise UserError unless its md5 matches."""
    source = _as_url(url)
    md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(source, timeout=TIMEOUT_S) as response, open(dest, "xb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=not progress) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise UserError(f"{_offline_hint(url)} (the server answered HTTP {exc.code} {exc.reason})") from None
    except urllib.error.URLError as exc:
        if source.startswith("file:"):
            raise UserError(f"no archive at {url}: set data.url to the path of cifar-10-binary.tar.gz") from None
        raise UserError(f"{_offline_hint(url)} ({exc.reason})") from None
    except (TimeoutError, OSError) as exc:  # connection reset, timeout, truncated transfer
        raise UserError(f"{_offline_hint(url)} (the transfer broke off: {exc})") from None
    actual = md5.hexdigest()
    if actual != expected_md5:
        raise UserError(
            f"md5 of {url} is {actual}, expected {expected_md5} (data.md5): the download is damaged or "
            "is another file; download it again, or set data.md5 if you meant this archive"
        )


def _check_member(member: tarfile.TarInfo, archive: str) -> str | None:
    """The file name a member stands for, None for a member to skip; UserError for anything unsafe."""
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or len(parts) > 2 or (parts and parts[0] != FOLDER):
        raise UserError(f"{archive}: unsafe member {name!r} lies outside {FOLDER}/; refusing the archive")
    if member.isdir() and parts == (FOLDER,):
        return None
    if not member.isfile():
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise UserError(f"{archive}: member {name!r} is a {kind}; the CIFAR-10 archive holds only regular files")
    base = parts[-1]
    if base in SKIPPED_FILES:
        return None
    if base == META_FILE:
        limit = MAX_META_BYTES
    elif base in TRAIN_FILES or base == TEST_FILE:
        limit = MAX_RECORDS_PER_FILE * RECORD_BYTES
    else:
        raise UserError(f"{archive}: unexpected member {name!r}; this is not the CIFAR-10 binary archive")
    if member.size > limit:
        raise UserError(f"{archive}: member {name!r} is {member.size} bytes, more than the {limit} it can hold")
    return base


def read_archive(path: Path, label: str) -> dict[str, bytes]:
    """The bytes of each needed file of the archive, read in memory: nothing is extracted to disk."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar:
                base = _check_member(member, label)
                if base is None:
                    continue
                if base in files:
                    raise UserError(f"{label}: member {member.name!r} appears twice")
                files[base] = tar.extractfile(member).read()
            # Read the gzip stream to its end: its CRC is checked only there, and tar stops reading at the
            # end-of-archive blocks, so a damaged byte in the compressed data would otherwise pass unseen.
            while tar.fileobj.read(CHUNK_BYTES):
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise UserError(f"{label} is truncated or corrupt ({exc}); download it again") from None
    missing = [f for f in (*TRAIN_FILES, TEST_FILE, META_FILE) if f not in files]
    if missing:
        raise UserError(f"{label} lacks {', '.join(f'{FOLDER}/{m}' for m in missing)}: not the CIFAR-10 archive")
    return files


def decode_records(blob: bytes, name: str) -> Split:
    """Records of 1 label byte + 3,072 planar pixel bytes -> uint8 NHWC images and int64 labels."""
    if len(blob) == 0 or len(blob) % RECORD_BYTES:
        raise UserError(
            f"{FOLDER}/{name} is {len(blob)} bytes, not a whole number of {RECORD_BYTES}-byte records "
            "(1 label byte + 3,072 pixel bytes): not the CIFAR-10 binary layout"
        )
    records = np.frombuffer(blob, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise UserError(
            f"{FOLDER}/{name}: record {bad[0]} has label {labels[bad[0]]}, outside 0..{NUM_CLASSES - 1} "
            f"({bad.size} such records): the archive is corrupt"
        )
    # (N, C, H, W) planes -> (N, H, W, C), the layout albumentations and plots expect
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels)


def _concat(splits: list[Split], limit: int | None) -> Split:
    images = np.concatenate([s.images for s in splits])
    labels = np.concatenate([s.labels for s in splits])
    return Split(images[:limit], labels[:limit])


def channel_stats(images: np.ndarray, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 NHWC images, in pixel units (0..255).

    Sums are exact integers accumulated chunk by chunk (about 25 MB of int64 per 1,024 images, never a copy of
    the whole array), so the result is exact up to the final division and does not depend on `chunk`.
    """
    total = np.zeros(3, dtype=np.int64)  # 50,000 x 32 x 32 x 255**2 < 2**42: int64 cannot overflow
    squares = np.zeros(3, dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, 3).astype(np.int64)
        total += block.sum(axis=0)
        squares += (block * block).sum(axis=0)
    n = images.size // 3  # pixels per channel
    # Python integers: n * sum(x^2) - sum(x)^2 is exact, so the only rounding is the final division
    mean = tuple(int(t) / n for t in total)
    var = [(n * int(s) - int(t) ** 2) / n**2 for t, s in zip(total, squares, strict=True)]
    return mean, tuple(v**0.5 for v in var)


def decode_archive(path: Path, params: DataParams, label: str | None = None) -> Dataset:
    """Read and check the archive at `path`, keeping the first train_limit / test_limit images."""
    label = label or str(path)
    files = read_archive(path, label)
    train = _concat([decode_records(files[f], f) for f in TRAIN_FILES], params.train_limit)
    test = _concat([decode_records(files[TEST_FILE], TEST_FILE)], params.test_limit)
    for split, key, limit in ((train, "train_limit", params.train_limit), (test, "test_limit", params.test_limit)):
        if limit is not None and len(split.labels) < limit:
            raise UserError(
                f"{label} holds {len(split.labels)} images for data.{key} = {limit}; lower it or set it to null"
            )
    try:
        classes = tuple(line.strip() for line in files[META_FILE].decode("ascii").splitlines() if line.strip())
    except UnicodeDecodeError:
        raise UserError(f"{FOLDER}/{META_FILE} is not plain text: the archive is corrupt") from None
    if len(classes) != NUM_CLASSES:
        raise UserError(f"{FOLDER}/{META_FILE} names {len(classes)} classes, expected {NUM_CLASSES}")
    mean, std = channel_stats(train.images)
    return Dataset(train, test, classes, mean, std)


def write_arrays(dataset: Dataset, folder: Path, meta: dict) -> None:
    np.save(folder / "train_images.npy", dataset.train.images)
    np.save(folder / "train_labels.npy", dataset.train.labels)
    np.save(folder / "test_images.npy", dataset.test.images)
    np.save(folder / "test_labels.npy", dataset.test.labels)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def prepare(params: DataParams, out: Path, *, progress: bool = True) -> Dataset:
    """Download, check and decode the archive, then write `out` whole or not at all."""
    out = Path(out)
    with outputs.staged_folder(out) as staged:
        archive = staged / "cifar-10-binary.tar.gz"  # removed before the folder is put in place
        download(params.url, archive, params.md5, progress=progress)
        dataset = decode_archive(archive, params, label=params.url)
        archive.unlink()
        meta = {
            "source_url": params.url,
            "md5": params.md5,
            "train_limit": params.train_limit,
            "test_limit": params.test_limit,
            "train_images": len(dataset.train.labels),
            "test_images": len(dataset.test.labels),
            "classes": list(dataset.classes),
            "mean": list(dataset.mean),  # per channel R, G, B, pixel units (0..255), of the training images
            "std": list(dataset.std),
        }
        write_arrays(dataset, staged, meta)
    return dataset


def load(folder: Path) -> Dataset:
    """The arrays the download_cifar stage wrote."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        train = Split(np.load(folder / "train_images.npy"), np.load(folder / "train_labels.npy"))
        test = Split(np.load(folder / "test_images.npy"), np.load(folder / "test_labels.npy"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} is missing or damaged ({exc}); run `dvc repro download_cifar`") from None
    return Dataset(train, test, tuple(meta["classes"]), tuple(meta["mean"]), tuple(meta["std"]))

"""Time the download_cifar stage's work on a local archive, the download excluded.

    python scripts/bench_decode.py ARCHIVE.tar.gz

Prints the seconds for the md5 check, the decode (gunzip, tar checks, records -> NHWC arrays, channel
statistics) and the writing of the .npy files, each the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from onecycle import data
from onecycle.config import DataParams


def best_of(repeat: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    md5_s, md5 = best_of(args.repeat, lambda: hashlib.md5(args.archive.read_bytes()).hexdigest())
    params = DataParams(url=str(args.archive), md5=md5)
    decode_s, dataset = best_of(args.repeat, lambda: data.decode_archive(args.archive, params))
    with tempfile.TemporaryDirectory() as tmp:
        meta = {"classes": list(dataset.classes), "mean": list(dataset.mean), "std": list(dataset.std)}
        write_s, _ = best_of(args.repeat, lambda: data.write_arrays(dataset, Path(tmp), meta))
    n = len(dataset.train.labels) + len(dataset.test.labels)
    print(f"archive {args.archive} ({args.archive.stat().st_size / 1e6:.0f} MB): {n:,} images")
    print(f"md5 check      {md5_s:6.2f} s")
    print(f"decode         {decode_s:6.2f} s   ({n / decode_s:,.0f} images/s)")
    print(f"write .npy     {write_s:6.2f} s")
    print(f"total          {md5_s + decode_s + write_s:6.2f} s   (best of {args.repeat})")


if __name__ == "__main__":
    main()

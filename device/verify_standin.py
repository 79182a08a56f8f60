"""Check, independently of the pipeline's decoder, that data/cifar10 holds the stand-in archive's images.

    python -m device.verify_standin [--proxy ../shared/data/make_cifar10_proxy.py] [--data data/cifar10]

The stand-in's own script decodes its JPEGs into the archive's records (label byte + planar R, G, B);
this compares them, every byte, with the arrays the download_cifar stage wrote from the archive.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", type=Path, default=Path("../shared/data/make_cifar10_proxy.py"))
    parser.add_argument("--data", type=Path, default=Path("data/cifar10"))
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("make_cifar10_proxy", args.proxy)
    proxy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proxy)
    npz = np.load(args.proxy.parent / "cifar10-jpeg-proxy.npz")
    ok = True
    for split in ("train", "test"):
        images = np.load(args.data / f"{split}_images.npy")
        labels = np.load(args.data / f"{split}_labels.npy")
        records = proxy.decode(npz, split, len(labels))
        planar = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # NHWC -> the records' R, G, B planes
        same = np.array_equal(labels, records[:, 0]) and np.array_equal(planar, records[:, 1:])
        ok &= same
        print(f"{split}: {len(labels):,} images, {'every byte equal' if same else 'DIFFERENT'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Here, before a device call: the wheels the lent GPU machine lacks, the stand-in's source, and the commit.

    PYTHONPATH=src python3 -m device.prepare     # .whl/ (device/wheels.txt) and .carry/, under 64 MiB

The lent H200 machines have torch, numpy, pandas, matplotlib, pyyaml and opencv but neither DVC, MLflow nor
albumentations, and no internet. This downloads the wheels they lack for the device's Python 3.12 on x86-64
(the pinned list in device/wheels.txt; antlr4-python3-runtime has no wheel on PyPI and is built here), copies
the stand-in's source (18 MB) into .carry/, records the commit (the device may get no .git), and checks that
the wheels, .carry/ and the working tree fit what a call carries.

Environment: WHEELS the wheels folder (.whl); WHEEL_PYTHON the Python version the wheels are for (3.12, the
device's); SHARED the workplace's shared folder holding data/make_cifar10_proxy.py (../shared).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from onecycle.errors import UserError
from scripts.experiments import git_commit, tool_main

ROOT = Path(__file__).resolve().parents[1]
WHEEL_LIST = Path(__file__).with_name("wheels.txt")
CARRY = ROOT / ".carry"
CARRY_LIMIT = 64 * 2**20  # bytes: what one device call may carry (working tree + carried paths)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64", "manylinux1_x86_64")


def pins() -> list[tuple[str, bool]]:
    """(name==version, built here from its sdist) for each line of device/wheels.txt."""
    out = []
    for line in WHEEL_LIST.read_text().splitlines():
        pin, _, comment = line.partition("#")
        if pin.strip():
            out.append((pin.strip(), comment.strip() == "sdist"))
    return out


def tree_files() -> list[Path]:
    """The files a device call carries besides the named paths: tracked and untracked-not-ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@tool_main
def main() -> None:
    wheels = (ROOT / os.environ.get("WHEELS", ".whl")).resolve()
    python_version = os.environ.get("WHEEL_PYTHON", "3.12")
    shared = Path(os.environ.get("SHARED", ROOT.parent / "shared"))
    shutil.rmtree(wheels, ignore_errors=True)  # no stale wheel: two versions of one package stop the install
    wheels.mkdir(parents=True)
    CARRY.mkdir(exist_ok=True)  # other device checks' files there stay (counted in the total below)
    for name in ("make_cifar10_proxy.py", "cifar10-jpeg-proxy.npz"):
        shutil.copy(shared / "data" / name, CARRY / name)
    (CARRY / "commit.json").write_text(json.dumps(git_commit(ROOT)) + "\n")

    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    download += ["--python-version", python_version, "--implementation", "cp", "-d", str(wheels)]
    download += [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(download + [pin for pin, sdist in pins() if not sdist], check=True)
    for pin in (pin for pin, sdist in pins() if sdist):  # pure Python, so one build serves any Python 3
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), pin], check=True
        )

    sizes = {"wheels": folder_bytes(wheels), ".carry": folder_bytes(CARRY)}
    sizes["tree"] = sum(f.stat().st_size for f in tree_files())
    total = sum(sizes.values())
    print(f"{len(list(wheels.glob('*.whl')))} wheels for Python {python_version} in {wheels}; the call carries:")
    for name, size in sizes.items():
        print(f"  {name:7} {size / 2**20:6.1f} MiB")
    print(f"  total   {total / 2**20:6.1f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a call may carry")
    if total > CARRY_LIMIT:
        raise UserError(f"{total / 2**20:.1f} MiB is more than a device call carries")


if __name__ == "__main__":
    main()

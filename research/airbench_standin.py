"""airbench94 side by side: the PyPI `airbench` 0.1.8 recipe (lib_airbench94.py, unchanged) trained on the
project's data, a few seeds, test accuracy with and without its test-time augmentation, in the JSON format of
research/study.py (one run per seed, a summary with a `tta` part).

    python -m research.airbench_standin --out airbench.json --airbench .carry/airbench-0.1.8.tar.gz
        [--params params.yaml] [-S KEY=VALUE]... [--seeds 3] [--deadline SECONDS] [--cache DIR] [--commit SHA]
    python -m research.airbench_standin --export DIR [--params params.yaml] [-S KEY=VALUE]...

The data is what the pipeline trains on: the arrays `data.prepare` writes (as download_cifar) for the data
section of --params after -S (e.g. `-S data.url=/tmp/standin/full.tar.gz -S data.md5=...`), exported to
airbench's loader format, `cifar10/train.pt` and `cifar10/test.pt`: {'images': uint8 (N, 32, 32, 3),
'labels': int64 (N,), 'classes': [10 names]} (what airbench's CifarLoader saves from torchvision's CIFAR10).
--export DIR only writes those two files under DIR/cifar10/ and stops.

airbench's loaders read 'cifar10/train.pt' relative to the working folder, so the runs go from the export's
folder. --airbench is the package's source: the sdist (`pip download --no-deps airbench==0.1.8`, a .tar.gz;
the project publishes no wheel) or a folder holding the `airbench` package; without it, an installed
`airbench`. Where torchvision is missing (the lent GPU machines), its one piece airbench uses on this path,
transforms.Normalize, is stood in by the same arithmetic (recorded in the JSON). Each seed: torch.manual_seed,
then `train94(verbose=False)` with its own hyperparameters, then `evaluate` at tta_level 0 (test_acc) and at
its default tta_level 2 (test_acc_tta), in percent. One warm-up (`train94(run=-1)`, a single step) goes first.
airbench builds its network with .cuda(): without CUDA the runs are recorded as skipped, saying so.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import os
import sys
import tarfile
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

from onecycle import data, outputs
from onecycle.config import parse_params, read_yaml
from onecycle.errors import UserError
from research import jobs, study
from scripts.experiments import (
    apply_overrides,
    parse_override,
    read_params,
    seeds_summary,
    summarize,
    tool_main,
)
from scripts.measure import device_name, sync

SETTING = "airbench94"


def export(dataset: data.Dataset, folder: Path) -> Path:
    """Write airbench's train.pt / test.pt under folder/cifar10/; returns that folder."""
    out = Path(folder) / "cifar10"
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train.pt", dataset.train), ("test.pt", dataset.test)):
        payload = {
            "images": torch.from_numpy(split.images).contiguous(),  # uint8, N x 32 x 32 x 3 (NHWC), as stored
            "labels": torch.from_numpy(split.labels.astype("int64")),
            "classes": list(dataset.classes),
        }
        outputs.torch_save(payload, out / name)
    return out


def normalize_stand_in() -> types.ModuleType:
    """A `torchvision` holding transforms.Normalize only: (x - mean) / std per channel, in x's dtype, as
    torchvision's Normalize computes it. airbench needs nothing else of torchvision once train.pt exists."""

    class Normalize(torch.nn.Module):
        def __init__(self, mean, std) -> None:
            super().__init__()
            self.mean, self.std = mean, std

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            return (x - mean) / std

    class CIFAR10:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("airbench looked for torchvision's CIFAR10: the export of train.pt/test.pt is missing")

    vision = types.ModuleType("torchvision")
    vision.transforms = types.ModuleType("torchvision.transforms")
    vision.transforms.Normalize = Normalize
    vision.datasets = types.ModuleType("torchvision.datasets")
    vision.datasets.CIFAR10 = CIFAR10
    return vision


def import_airbench(source: Path | None, tmp: Path) -> tuple[types.ModuleType, dict]:
    """The airbench package (from an sdist, a folder, or installed) and what was imported."""
    if source is not None:
        source = Path(source)
        if source.is_file():
            with tarfile.open(source) as tar:
                # the "data" filter refuses links and paths out of the folder (Python >= 3.10.12, 3.11.4)
                tar.extractall(tmp / "airbench-src", filter="data")
            folders = [p.parent.parent for p in (tmp / "airbench-src").glob("*/airbench/__init__.py")]
        else:
            folders = [source] if (source / "airbench" / "__init__.py").exists() else []
        if not folders:
            raise UserError(f"--airbench {source}: no airbench package in it (expected airbench/__init__.py)")
    info: dict = {"source": str(source) if source else "installed"}
    try:
        import torchvision  # noqa: PLC0415, F401

        info["torchvision"] = torchvision.__version__
    except ImportError:
        vision = normalize_stand_in()
        sys.modules.update(
            {
                "torchvision": vision,
                "torchvision.transforms": vision.transforms,
                "torchvision.datasets": vision.datasets,
            }
        )
        info["torchvision"] = "not installed: transforms.Normalize stood in by the same arithmetic"
    try:
        if source is None:
            airbench = importlib.import_module("airbench")
        else:  # the package folder itself, under its own name (its modules import one another)
            package = folders[0] / "airbench"
            spec = importlib.util.spec_from_file_location(
                "airbench", package / "__init__.py", submodule_search_locations=[str(package)]
            )
            airbench = sys.modules["airbench"] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(airbench)
    except ImportError as exc:
        raise UserError(f"cannot import airbench ({exc}): pass --airbench airbench-0.1.8.tar.gz") from None
    lib = Path(airbench.lib_airbench94.__file__)
    info["lib_airbench94_sha256"] = hashlib.sha256(lib.read_bytes()).hexdigest()
    pkg_info = lib.parent.parent / "PKG-INFO"
    if pkg_info.exists():
        info["version"] = next(
            (
                line.split(":", 1)[1].strip()
                for line in pkg_info.read_text().splitlines()
                if line.startswith("Version:")
            ),
            None,
        )
    info["hyp"] = airbench.lib_airbench94.hyp
    return airbench, info


@tool_main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the JSON of results, rewritten after every seed")
    parser.add_argument("--export", type=Path, help="only write DIR/cifar10/train.pt and test.pt")
    parser.add_argument("--airbench", type=Path, help="the airbench 0.1.8 sdist (.tar.gz) or a folder with the package")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", default="3", help="a count N (0..N-1) or a list 0,1,2")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds from the start")
    parser.add_argument("--cache", type=Path, help="keep the prepared data folder here (default: a temp folder)")
    parser.add_argument("--commit", help="the commit to record (default: git rev-parse HEAD, when in git)")
    args = parser.parse_args()
    if not (args.out or args.export):
        parser.error("give --out (run airbench94) or --export DIR")
    if args.out:
        args.out = args.out.resolve()  # the runs change the working folder
    return run(args)


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    base = read_params(args.params)
    shared = dict(parse_override(text) for text in args.set)
    params = parse_params(apply_overrides(base, shared))
    seeds = study.parse_seeds(args.seeds if "," in args.seeds else read_yaml(args.seeds), "--seeds")

    with tempfile.TemporaryDirectory(prefix="airbench-") as tmp:
        tmp = Path(tmp)
        folder, prepare_seconds = jobs.data_folder(params, args.cache or tmp / "data")
        dataset = data.load(folder)
        if args.export:
            print(f"wrote {export(dataset, args.export)}/train.pt and test.pt")
            return 0
        loaders = export(dataset, tmp / "export").parent
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        results = study.header("research/airbench_standin.py", args, "warm", device_name(device), shared) | {
            "settings": [{"name": SETTING, "overrides": {}, "lr_max": None, "seeds": list(seeds)}],
            "data": {
                folder.name: {
                    "url": params.data.url,
                    "train_images": len(dataset.train.labels),
                    "test_images": len(dataset.test.labels),
                    "prepare_seconds": prepare_seconds,
                }
            },
            "runs": [],
        }

        def save() -> None:
            done = [r for r in results["runs"] if r["status"] == "ok"]
            entries = [
                {"seed": r["seed"], "exp_name": None, "mlflow_run_id": None, "lr_min": None, "lr_max": None}
                | {k: r[k] for k in ("test_acc", "test_acc_tta")}
                for r in done
            ]
            # width: null, airbench's network is not this project's (its widths are in airbench.hyp)
            results["summary"] = {
                SETTING: seeds_summary(entries, results["device"], None)
                | {
                    "skipped": sum(r["status"] == "skipped" for r in results["runs"]),
                    "failed": sum(r["status"] == "failed" for r in results["runs"]),
                    "tta": summarize(r["test_acc_tta"] for r in done),
                }
            }
            results["elapsed_seconds"] = time.perf_counter() - began
            outputs.write_json(args.out, results)

        def record(seed: int, **fields) -> dict:
            same = {"torch": torch.__version__, "commit": results["commit"]}
            return {"setting": SETTING, "overrides": {}, "seed": seed, "lr_found": False} | same | fields

        if device.type != "cuda":
            reason = "airbench94 needs CUDA (it builds its network with .cuda() and times with CUDA events)"
            print(f"{reason}: the export was written, the {len(seeds)} runs are skipped", flush=True)
            results["runs"] = [record(seed, status="skipped", reason=reason) for seed in seeds]
            save()
            return 0

        airbench, results["airbench"] = import_airbench(args.airbench, tmp)
        save()
        here = Path.cwd()
        os.chdir(loaders)  # its loaders read cifar10/train.pt and cifar10/test.pt from the working folder
        try:
            start = time.perf_counter()
            airbench.train94(run=-1, verbose=True)  # one step: CUDA context, cuDNN autotuning
            sync(device)
            results["warmup_seconds"] = time.perf_counter() - start
            durations = []
            for seed in seeds:
                left = args.deadline - (time.perf_counter() - began)
                late = study.too_late(sum(durations) / len(durations) if durations else 0.0, left)
                if late:
                    results["runs"].append(record(seed, status="skipped", reason=late))
                    save()
                    continue
                start = time.perf_counter()
                try:
                    torch.manual_seed(seed)
                    model = airbench.train94(verbose=False)
                    sync(device)
                    seconds = time.perf_counter() - start
                    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
                    tta_level = airbench.lib_airbench94.hyp["net"]["tta_level"]
                    fields = {
                        "status": "ok",
                        # percent; evaluate's float32 mean, rounded to what a count of test images can give
                        "test_acc": round(100 * airbench.evaluate(model, test, tta_level=0), 4),
                        "test_acc_tta": round(100 * airbench.evaluate(model, test, tta_level=tta_level), 4),
                        "tta_level": tta_level,
                        "fit_seconds": seconds,  # train94 alone: the whitening init and the epochs
                    }
                except Exception:
                    fields = {"status": "failed", "error": traceback.format_exc()[-3000:]}
                wall = time.perf_counter() - start
                fields |= {"wall_seconds": wall, "device": device_name(device)}
                results["runs"].append(record(seed, **fields))
                save()
                if fields["status"] == "ok":
                    durations.append(wall)
                    print(
                        f"airbench94 seed {seed}: {fields['test_acc']:.2f}% ({fields['test_acc_tta']:.2f}% with "
                        f"TTA) in {seconds:.1f} s",
                        flush=True,
                    )
                else:
                    print(f"airbench94 seed {seed}: FAILED\n{fields['error']}", file=sys.stderr, flush=True)
        finally:
            os.chdir(here)
        study.print_summary({SETTING: results["summary"][SETTING]})
        tta = results["summary"][SETTING]["tta"]
        if tta["n"]:
            print(f"with TTA: median {tta['median']:.2f}%, mean {tta['mean']:.2f}% over {tta['n']}")
        return 1 if results["summary"][SETTING]["failed"] else 0


if __name__ == "__main__":
    main()

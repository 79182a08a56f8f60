"""Replay every LR-finder pick rule on saved range-test curves, and make such curves.

    python scripts/pick_check.py                      # the table: every rule on every saved curve
    python scripts/pick_check.py sweep --data DIR --out docs/results/lr_curves/NAME.json [-S key=value ...]

`sweep` runs the lr_range_test stage's own work (`lr_finder.find_range`) on the decoded arrays in DIR (the
folder `download_cifar` writes, e.g. data/cifar10) with params.yaml plus the `-S` overrides, and saves the curve
with its params and the machine. The table reads those files and the range tests of the H200 run
(docs/results/h200_gpu_run.json), and shows each curve's measured accuracy plateau beside the picks
(docs/lr-finder.md holds the evidence).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from onecycle import lr_finder  # noqa: E402  (after the path set-up above)
from onecycle.config import LRFinderParams, flatten, parse_params, read_yaml  # noqa: E402
from onecycle.errors import UserError  # noqa: E402

CURVES = ROOT / "docs" / "results" / "lr_curves"
H200 = ROOT / "docs" / "results" / "h200_gpu_run.json"

# The LRMAX range whose 24-epoch test accuracy was within noise of the best one measured, per setting
# (docs/lr-finder.md says which runs). A curve whose setting has no training runs gets no plateau.
PLATEAU = {
    "w64": (0.014, 0.05),  # H200: 0.014 87.71%, 0.025 88.38% (best), 0.05 87.52%; 0.0105 87.07%, 0.1 86.29%
    "w16": (0.0495, 0.099),  # this CPU: 0.0495 85.29% (3 seeds 84.94-85.29), 0.099 85.12%
}


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 / AVX512: float rounding differs
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def sweep(args: argparse.Namespace) -> None:
    import torch

    from onecycle import data

    raw = read_yaml((ROOT / "params.yaml").read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = read_yaml(value)
    params = parse_params(raw)
    dataset = data.load(Path(args.data))
    device = torch.device(args.device)
    start = time.perf_counter()
    curve, found = lr_finder.find_range(params, dataset, device, progress=False)
    seconds = time.perf_counter() - start
    record = {
        "overrides": args.set,
        "params": flatten(params),
        "machine": machine(),
        "train_images": len(dataset.train.labels),
        "seconds": round(seconds, 1),
        "found": found.as_dict(curve, len(dataset.train.labels)),
        "curve": {
            "lr": curve.lr,
            "loss": curve.loss,
            "smoothed_loss": curve.smoothed_loss,
            "accuracy": curve.accuracy,
            "smoothed_accuracy": curve.smoothed_accuracy,
            "stop_reason": curve.stop_reason,
            "images_seen": curve.images_seen,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{out}: {len(curve.lr)} steps, {found.pick} LRMAX {found.lr_max:.4g}, {seconds:.0f} s")


def load_curves() -> list[tuple[str, str, lr_finder.Curve, LRFinderParams]]:
    """(name, plateau key, curve, the sweep's lr_finder params) of every saved curve."""
    found = []
    if H200.exists():
        runs = json.loads(H200.read_text())["range_test"]
        for name, run in runs.items():
            if "curve" not in run:
                continue  # a sweep that found no range (the linear one diverged in 8 steps)
            columns = list(zip(*run["curve"], strict=True))
            curve = lr_finder.Curve(*(list(c) for c in columns[1:]), run["stop_reason"], run["images_seen"])
            sweep_params = {k.split(".", 1)[1]: v for k, v in run["lr_finder"].items()}
            found.append((f"h200 w64 {name}", "w64", curve, LRFinderParams(**sweep_params)))
    for path in sorted(CURVES.glob("*.json")):
        run = json.loads(path.read_text())
        c = run["curve"]
        curve = lr_finder.Curve(
            c["lr"], c["loss"], c["smoothed_loss"], c["accuracy"], c["smoothed_accuracy"], c["stop_reason"], 0
        )
        fields = {f.name for f in dataclasses.fields(LRFinderParams)}
        sweep_params = {k.split(".", 1)[1]: v for k, v in run["params"].items() if k.startswith("lr_finder.")}
        sweep_params = {k: v for k, v in sweep_params.items() if k in fields}
        width = run["params"]["model.width"]
        # the plateau is the setting's: another seed of the sweep shares it, any other override does not
        setting = [o for o in run["overrides"] if not o.startswith(("model.width=", "train.seed="))]
        plateau_key = "" if setting else f"w{width}"
        found.append((path.stem, plateau_key, curve, LRFinderParams(**sweep_params)))
    return found


def fastai_trim(curve: lr_finder.Curve) -> tuple[np.ndarray, np.ndarray]:
    """The part of the curve that fastai's lr_find hands its suggestions: its smoothed losses without the first
    tenth and the last 5 steps."""
    n = len(curve.lr)
    return np.asarray(curve.lr[n // 10 : n - 5]), np.asarray(curve.smoothed_loss[n // 10 : n - 5])


def fastai_valley(curve: lr_finder.Curve) -> float:
    """fastai's `valley` (callback/schedule.py), re-written: the longest run of steps along which the loss keeps
    falling (a longest decreasing subsequence), and the LR half way through its second third."""
    lr, loss = fastai_trim(curve)
    run = [1] * len(loss)
    end = 0
    for i in range(1, len(loss)):
        for j in range(i):
            if loss[i] < loss[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[i] > run[end]:
            end = i
    start = end - run[end]
    third = (end - start) / 3
    return float(lr[start + int(third) + int(third / 2)])


def fastai_slide(curve: lr_finder.Curve, lr_diff: int = 15, thresh: float = 0.005) -> float:
    """fastai's `slide`, re-written: from the end of the curve, slide a window of lr_diff steps down the LRs
    until the loss's slope (per step) at its two ends differs by no more than thresh; its low end."""
    lr, loss = fastai_trim(curve)
    grad = np.gradient(loss)
    right, left = -1, -1 - lr_diff
    found = lr[left]
    while left >= -len(loss) and abs(grad[right] - grad[left]) > thresh:
        found = lr[left]
        right, left = right - 1, left - 1
    return float(found)


def picks(curve: lr_finder.Curve, sweep_params: LRFinderParams) -> dict[str, str]:
    """Every rule's LRMAX on one curve: the product's rules, acc_drop at other widths of its smoothing, and
    fastai's two suggestions."""
    out = {}
    for rule in lr_finder.PICKS:
        try:
            found = lr_finder.pick_range(curve, dataclasses.replace(sweep_params, pick=rule))
            out[rule] = f"{found.lr_max:.4f}" + ("*" if found.note else "")
        except UserError:  # a rule that finds no range on this curve
            out[rule] = "none"
    lr, acc = np.asarray(curve.lr), np.asarray(curve.accuracy)
    for decades in (0.1, 0.2):
        dropped = lr_finder.accuracy_drop_lr(lr, acc, decades)
        out[f"acc_drop@{decades}"] = "none" if dropped is None else f"{dropped:.4f}"
    out["fastai valley"] = f"{fastai_valley(curve):.4f}"
    out["fastai slide"] = f"{fastai_slide(curve):.4f}"
    return out


def table(args: argparse.Namespace) -> None:
    rows = []
    for name, key, curve, sweep_params in load_curves():
        low, high = PLATEAU.get(key, (math.nan, math.nan))
        plateau = f"{low:g}-{high:g}" if key in PLATEAU else "-"
        found = picks(curve, sweep_params)
        rows.append({"curve": name, "steps": str(len(curve.lr)), "plateau": plateau, **found})
    header = list(rows[0])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
        for row in rows:
            print("| " + " | ".join(row[h] for h in header) + " |")
        return
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in header}
    print("  ".join(h.ljust(widths[h]) for h in header))
    for row in rows:
        print("  ".join(row[h].ljust(widths[h]) for h in header))
    print("* = the rule fell back to min_loss (the accuracy never fell halfway before the sweep stopped)")


def plot(path: Path) -> None:
    """One panel per curve: the batch accuracy, its smoothing over log LR, the half-gain level, the picks of
    min_loss and acc_drop, and the measured plateau of best test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = load_curves()
    cols = 3
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    for ax, (name, key, curve, sweep_params) in zip(axes.flat, curves, strict=False):
        lr, acc = np.asarray(curve.lr), np.asarray(curve.accuracy)
        smooth = lr_finder.smooth_over_log_lr(lr, acc, lr_finder.ACC_SMOOTH_DECADES)
        ax.set_xscale("log")
        ax.plot(lr, acc, color="tab:green", alpha=0.3, linewidth=1, label="batch accuracy")
        ax.plot(lr, smooth, color="tab:green", linewidth=2, label="smoothed over log LR")
        ax.axhline((smooth.max() + smooth[0]) / 2, color="grey", linestyle=":", linewidth=1, label="half its gain")
        if key in PLATEAU:
            ax.axvspan(*PLATEAU[key], color="gold", alpha=0.3, label="best test accuracy (24 epochs)")
        for rule, color in (("min_loss", "tab:blue"), ("acc_drop", "tab:red")):
            found = lr_finder.pick_range(curve, dataclasses.replace(sweep_params, pick=rule))
            ax.axvline(found.lr_max, color=color, linestyle="--", label=f"{rule}: {found.lr_max:.3g}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("LR")
        ax.set_ylabel("batch accuracy (%)")
        ax.set_ylim(5, 1.7 * acc.max())  # room above the curves for the legend
        ax.legend(fontsize=7, loc="upper left", ncols=2)
    for ax in list(axes.flat)[len(curves) :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("sweep", help="run the range test on decoded arrays and save its curve")
    run.add_argument("--data", required=True, help="folder of decoded arrays (what download_cifar writes)")
    run.add_argument("--out", required=True, help="JSON file to write (docs/results/lr_curves/NAME.json)")
    run.add_argument("--device", default="cpu")
    run.add_argument("-S", "--set", action="append", default=[], help="key=value over params.yaml, e.g. model.width=16")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--plot", type=Path, help="also draw every curve with its picks into this PNG")
    args = parser.parse_args()
    if args.command == "sweep":
        sweep(args)
        return
    table(args)
    if args.plot:
        plot(args.plot)


if __name__ == "__main__":
    main()

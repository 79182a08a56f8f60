"""How far the sweep's own knobs move a reading of the curve: the benchmark's knob and rounding variants, each
reading's factor against the plain sweep of the same setting and seed.

    python -m research.knob_readings [--out docs/results/lr_bench]

A candidate for the anchor of a pick must move less than a factor 1.2 under every variant (issue 25). The
readings: the default's anchor (picks.lowest_loss_lr, on the bias-corrected moving average, which lags by up
to 50 steps), and readings of the raw loss smoothed over log LR without lag (picks.smooth_over_log_lr): its
lowest point, and the LR where it has climbed back a fraction of its fall after that lowest point (linear in
log LR between steps; None where it never does).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np

from onecycle import picks
from onecycle.lr_finder import smooth
from research.lr_bench import ROOT


def lowest_smoothed(lr: np.ndarray, loss: np.ndarray) -> float:
    s = np.asarray(smooth(list(loss), 0.98))
    return picks.lowest_loss_lr(picks.Sweep(lr, loss, s, loss, loss, len(lr)))


def centred_min(lr: np.ndarray, loss: np.ndarray, decades: float) -> float:
    return float(lr[int(np.argmin(picks.smooth_over_log_lr(lr, loss, decades)))])


def climb(lr: np.ndarray, loss: np.ndarray, decades: float, fraction: float) -> float | None:
    x, y = np.log10(lr), picks.smooth_over_log_lr(lr, loss, decades)
    i = int(np.argmin(y))
    level = y[i] + fraction * (y[: i + 1].max() - y[i])
    above = np.flatnonzero(y[i:] > level)
    if len(above) == 0:
        return None
    j = i + int(above[0])
    t = (level - y[j - 1]) / (y[j] - y[j - 1])
    return float(10 ** (x[j - 1] + t * (x[j] - x[j - 1])))


READINGS = {
    "lowest smoothed loss (budget's anchor)": lowest_smoothed,
    **{f"centred lowest, {d} decades": lambda lr, y, d=d: centred_min(lr, y, d) for d in (0.1, 0.2, 0.3)},
    **{
        f"climb {f} of the fall, {d} decades": lambda lr, y, d=d, f=f: climb(lr, y, d, f)
        for d in (0.2, 0.3)
        for f in (0.25, 0.5)
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/lr_bench")
    args = parser.parse_args()
    pairs = []  # (plain sweep, variant sweep) curves of the same setting and seed
    for path in sorted(args.out.glob("*/sweep-s*-*.json")):
        plain = path.with_name(path.stem.split("-")[0] + "-" + path.stem.split("-")[1] + ".json")
        if plain.exists():
            pairs.append((path.parent.name, path.stem, json.loads(plain.read_text()), json.loads(path.read_text())))
    print(f"{len(pairs)} variant sweeps against their plain sweep")
    print("| reading | worst factor, either way | median | none found |\n|---|---|---|---|")
    for name, read in READINGS.items():
        factors, missing = [], 0
        for _, _, plain, variant in pairs:
            a, b = (read(np.asarray(c["curve"]["lr"]), np.asarray(c["curve"]["loss"])) for c in (plain, variant))
            if a is None or b is None:
                missing += 1
            else:
                factors.append(math.exp(abs(math.log(b / a))))
        print(f"| {name} | {max(factors):.2f} | {statistics.median(factors):.2f} | {missing} |")


if __name__ == "__main__":
    main()

"""How far the sweep's own knobs move a reading of the curve, apart from the noise of one sweep.

    python -m research.knob_readings [--out docs/results/lr_knobs] [--config research/lr_knobs.yaml] [--page PAGE]

The sweeps come from `python -m research.lr_bench run --config research/lr_knobs.yaml --out docs/results/lr_knobs
--kinds sweep fine`: in each setting and for each seed, the plain sweep and one sweep per knob variant (num_iter x2
and x0.5, start_lr 1e-5, end_lr 10) and per float-rounding variant (`avx2`: other kernels, the same sweep), all on
one machine; and after each, the fine sweep (onecycle.lr_finder.FINE_*): a second sweep of a fresh model, its
design fixed by the project, around the first sweep's lowest loss. The readings are read off both. A reading's
factor for one seed is its value on the variant's sweep over its value on the plain sweep of the same seed. One
seed mixes the knob's effect with the sweep's own noise (float rounding alone moves some readings by 1.3x), so
the table gives the geometric mean over the seeds, which is the knob's effect, and the range of the seeds'
factors, which is mostly noise. A candidate for the anchor of a pick moves by less than a
factor 1.2 under every knob (issue 25): judged on the geometric means.

The readings (each an LR read off the raw loss against log LR):
- the default's anchor (`picks.lowest_loss_lr`): the lowest point of the bias-corrected moving average, which
  lags by up to 50 steps, so a faster sweep meets it at another LR;
- `min_loss`: the same moving average's lowest step;
- the lowest point of the loss smoothed over log LR without lag (`picks.smooth_over_log_lr`, 0.2 decades);
- the basin's middle: the geometric middle of the LRs around that lowest point where the lag-free loss is within
  a fraction of its fall (from its highest value before the lowest point) of its lowest, so a flat bottom is read
  by its two edges, not by where the noise puts its lowest step;
- the basin's centroid: the same LRs, weighted by how far each is below that level.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onecycle import picks
from research.lr_bench import ROOT, load_results, read_bench
from research.lr_report import refresh_page

# (setting, variant) -> per seed, each reading's factor
Table = dict[tuple[str, str], list[tuple[int, dict[str, float]]]]
DECADES = 0.2  # the lag-free smoothing's width over log10(LR)


def lag_free(lr: np.ndarray, loss: np.ndarray) -> np.ndarray:
    return picks.smooth_over_log_lr(lr, loss, DECADES)


def basin(lr: np.ndarray, loss: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The log10 LRs and lag-free losses of the basin: the steps around the lowest point whose loss is within
    `fraction` of the fall of the lowest, and that level."""
    x, y = np.log10(lr), lag_free(lr, loss)
    i = int(np.argmin(y))
    level = y[i] + fraction * (y[: i + 1].max() - y[i])
    lo = hi = i
    while lo > 0 and y[lo - 1] <= level:
        lo -= 1
    while hi < len(y) - 1 and y[hi + 1] <= level:
        hi += 1
    return x[lo : hi + 1], y[lo : hi + 1], level


def basin_middle(fraction: float) -> Callable[[np.ndarray, np.ndarray], float]:
    def read(lr: np.ndarray, loss: np.ndarray) -> float:
        x, _, _ = basin(lr, loss, fraction)
        return float(10 ** ((x[0] + x[-1]) / 2))

    return read


def basin_centroid(fraction: float) -> Callable[[np.ndarray, np.ndarray], float]:
    def read(lr: np.ndarray, loss: np.ndarray) -> float:
        x, y, level = basin(lr, loss, fraction)
        weight = level - y
        return float(10 ** (np.sum(weight * x) / weight.sum())) if weight.sum() > 0 else float(10 ** x[0])

    return read


def sweep_of(lr: np.ndarray, loss: np.ndarray) -> picks.Sweep:
    from onecycle.lr_finder import smooth

    smoothed = np.asarray(smooth(list(loss), 0.98))
    return picks.Sweep(lr, loss, smoothed, loss, smoothed, len(lr))


READINGS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "lowest moving average (budget's anchor)": lambda lr, y: picks.lowest_loss_lr(sweep_of(lr, y)),
    "min_loss": lambda lr, y: picks.min_loss(sweep_of(lr, y)),
    "lag-free lowest": lambda lr, y: float(lr[int(np.argmin(lag_free(lr, y)))]),
    **{f"basin middle, {f}": basin_middle(f) for f in (0.5, 0.6, 0.7)},
    **{f"basin centroid, {f}": basin_centroid(f) for f in (0.6, 0.7, 0.8)},
}


def factors(out: Path, config: Path, kinds: tuple[str, ...]) -> Table:
    """(setting, variant) -> per seed, each reading's factor (the variant's reading over the plain one's), on the
    sweeps of `kinds`: ("sweep",) the user's sweep, its knobs changed, ("fine",) the fine sweep around it,
    ("fine2",) the second fine sweep around the first's lowest loss; several kinds: the geometric mean of their
    readings."""
    table: Table = {}
    variants = [v.name for v in read_bench(config).variants]

    def read(done: dict[str, dict], seed: int, variant: str) -> dict[str, float] | None:
        names = [f"{kind}-s{seed}" + (f"-{variant}" if variant else "") for kind in kinds]
        if not all(n in done for n in names):
            return None
        curves = [(np.asarray(done[n]["curve"]["lr"]), np.asarray(done[n]["curve"]["loss"])) for n in names]
        return {k: statistics.geometric_mean(reading(*c) for c in curves) for k, reading in READINGS.items()}

    for setting, done in load_results(out).items():
        for _, result in sorted(done.items()):
            if result["kind"] != kinds[0] or not result.get("variant"):
                continue
            pair = read(done, result["seed"], result["variant"]), read(done, result["seed"], "")
            if None in pair:
                continue
            row = {k: pair[0][k] / pair[1][k] for k in READINGS}
            table.setdefault((setting, result["variant"]), []).append((result["seed"], row))
    return dict(sorted(table.items(), key=lambda kv: (variants.index(kv[0][1]), kv[0][0])))


def either_way(factor: float) -> float:
    return math.exp(abs(math.log(factor)))


def report(table: Table, rounding: set[str]) -> str:
    """Per knob and setting, each reading's geometric mean factor over the seeds (the range of the seeds'
    factors in brackets); then each reading's worst geometric mean over the knobs, over the rounding variants,
    and its worst single seed."""
    names = list(READINGS)
    lines = [
        "| variant | setting | seeds | " + " | ".join(names) + " |",
        "|---" * (len(names) + 3) + "|",
    ]
    worst = {kind: dict.fromkeys(names, 1.0) for kind in ("knob", "rounding", "one seed")}
    for (setting, variant), rows in table.items():
        kind = "rounding" if variant in rounding else "knob"
        cells = []
        for name in names:
            values = [row[name] for _, row in rows]
            mean = statistics.geometric_mean(values)
            worst[kind][name] = max(worst[kind][name], either_way(mean))
            if kind == "knob":
                worst["one seed"][name] = max(worst["one seed"][name], *map(either_way, values))
            cells.append(f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})")
        lines.append(f"| {variant} | {setting} | {len(rows)} | " + " | ".join(cells) + " |")
    labels = {
        "knob": "**worst knob, mean over seeds**",
        "rounding": "worst rounding, mean over seeds",
        "one seed": "worst knob, one seed",
    }
    for kind, label in labels.items():
        lines.append(f"| {label} | | | " + " | ".join(f"{worst[kind][n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/lr_knobs")
    parser.add_argument("--config", type=Path, default=ROOT / "research/lr_knobs.yaml")
    parser.add_argument("--page", type=Path, help="also refresh its knob_study tables (docs/lr-finder.md)")
    args = parser.parse_args()
    bench = read_bench(args.config)
    # the variants that change no lr_finder key change float rounding alone
    rounding = {v.name for v in bench.variants if not any(k.startswith("lr_finder.") for k in v.overrides | v.times)}
    kinds = {"sweep": ("sweep",), "fine": ("fine",), "fine2": ("fine2",), "fine_mean": ("fine", "fine2")}
    sections = {f"knobs_{name}": report(factors(args.out, args.config, k), rounding) for name, k in kinds.items()}
    print("\n\n".join(sections.values()))
    if args.page:
        refresh_page(args.page, sections)


if __name__ == "__main__":
    main()

"""The LR-finder benchmark's report: every rule's pick on every sweep, read off the trained grids.

    python -m research.lr_report report [--out docs/results/lr_bench] [--page docs/lr-finder.md]
    python -m research.lr_report fit        # budget's two constants and fine's one, fitted, into onecycle/picks.py

For each setting of research/lr_bench.yaml (and `w64_full`, the spec's setting, whose grid and sweeps are the
H200 record in docs/results/h200_gpu_run.json): the grid's mean test accuracy per LRMAX over its seeds, the
best point and the noise (the larger of 0.3 points and the standard deviation of the best point's seeds).
Each rule of `onecycle.picks.RULES` picks LRMAX on each seed's sweep; the accuracy that pick trains to is read
off the grid's means, linearly in log LR between the two grid points around it. A rule is within noise in a
setting when the mean of those accuracies over the seeds' sweeps is no lower than the best mean less the noise.
A pick outside the grid is scored at the grid's edge when that edge is already out of noise (a miss, shown
with < or >), else it is unknown (?).

Writes --out/summary.json, --out/<setting>.png (accuracy against LRMAX, each seed, every rule's picks) and
prints the markdown tables of docs/lr-finder.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onecycle import outputs, picks
from onecycle.config import LRFinderParams
from research.lr_bench import CONFIG, NOISY, ROOT, grid_means, load_results, read_bench, sweep_from, training_steps
from scripts.experiments import tool_main

NOISE_FLOOR = 0.3  # points of test accuracy
DEFAULT = LRFinderParams().pick
PICKS = ROOT / "src/onecycle/picks.py"  # where `fit` writes budget's constants
H200 = ROOT / "docs/results/h200_gpu_run.json"


@dataclass(frozen=True)
class Setting:
    name: str
    grid: dict[float, list[float]]  # LRMAX -> test accuracy per seed
    sweeps: dict[str, picks.Sweep]  # "s0", "s1", "s0-isa_default", ...
    note: str = ""
    features: dict[str, float] = field(default_factory=dict)  # what a rule might scale with: steps, images, ...
    # rule -> sweep ("s0", ...) -> LRMAX -> test accuracy: ranges that rule found on that sweep, trained
    trained: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)
    by_seed: dict[str, dict[float, float]] = field(default_factory=dict)  # "s0" -> LRMAX -> that seed's accuracy

    def means(self) -> dict[float, float]:
        return {lr: statistics.fmean(accs) for lr, accs in sorted(self.grid.items())}

    def best(self) -> tuple[float, float, float]:
        """(LRMAX, mean, noise) of the best grid point: the noise is the larger of NOISE_FLOOR and the standard
        error of that point's mean over its seeds."""
        lr, mean = max(self.means().items(), key=lambda kv: kv[1])
        accs = self.grid[lr]
        error = statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else 0.0
        return lr, mean, max(NOISE_FLOOR, error)

    def accuracy_at(self, lr: float) -> tuple[float, str]:
        """The grid's mean accuracy at `lr` (log-linear between grid points) and '' inside the grid, '<' or '>'
        past an edge (the edge's value), '?' past an edge that is itself within noise."""
        means = self.means()
        lrs, accs = np.log10(list(means)), list(means.values())
        x = math.log10(lr)
        if lrs[0] <= x <= lrs[-1]:
            return float(np.interp(x, lrs, accs)), ""
        edge, mark = (accs[0], "<") if x < lrs[0] else (accs[-1], ">")
        _, best, noise = self.best()
        return edge, (mark if edge < best - noise else "?")


def bench_settings(out: Path, config: Path) -> list[Setting]:
    from onecycle.config import parse_params, read_yaml
    from scripts.experiments import apply_overrides

    bench = read_bench(config)
    results = load_results(out)
    base = read_yaml((ROOT / "params.yaml").read_text())
    found = []
    for s in bench.settings:
        done = results.get(s.name, {})
        params = parse_params(apply_overrides(base, bench.shared | s.overrides))
        images = params.data.train_limit or 50_000
        steps = training_steps(params)
        sweeps = {
            name.removeprefix("sweep-"): sweep_from(r["curve"], params.lr_finder, steps)
            for name, r in done.items()
            if r["kind"] == "sweep"
        }
        grid = grid_means(done)
        # the fine sweeps around the plain sweeps (lr_finder.FINE_*), swept with their own design, each with the
        # second fine sweep around its lowest loss where one ran
        fine = {
            kind: {
                name.removeprefix(f"{kind}-"): sweep_from(r["curve"], LRFinderParams(**r["lr_finder"]), steps)
                for name, r in done.items()
                if r["kind"] == kind and not r.get("variant")
            }
            for kind in ("fine", "fine2")
        }
        fine = {k: dataclasses.replace(w, fine=fine["fine2"].get(k)) for k, w in fine["fine"].items()}
        train = params.train
        features = {"training steps": steps, "warm-up steps": steps // train.epochs * train.peak_epoch}
        features |= {"training images": images, "epochs": train.epochs}
        trained: dict[str, dict[str, dict[float, float]]] = {}
        by_seed: dict[str, dict[float, float]] = {}
        for r in done.values():
            if r["kind"] == "found":  # a sweep may have several: its picks under other constants
                trained.setdefault(r["rule"], {}).setdefault(f"s{r['seed']}", {})[r["lr_max"]] = r["test_acc"]
            elif r["kind"] == "train":
                by_seed.setdefault(f"s{r['seed']}", {})[r["lr_max"]] = r["test_acc"]
        if grid and sweeps:
            # each plain sweep with the fine sweep around it, where one ran: the `fine` rule reads it
            sweeps = {k: dataclasses.replace(w, fine=fine.get(k)) for k, w in sweeps.items()}
            found.append(Setting(s.name, grid, sweeps, features=features, trained=trained, by_seed=by_seed))
    return found


def h200_setting() -> Setting:
    """Width 64, all 50,000 images, batch 512, 24 epochs: the H200's grid (one seed) and its two default sweeps."""
    run = json.loads(H200.read_text())
    grid = {run["range_test"]["default"]["lr_max"]: [run["fast"]["test_acc"]]}
    for entry in run["fast_more"].values():
        grid[entry["lr_max"]] = [entry["test_acc"]]
    sweeps = {}
    for name in ("default", "max_acc"):  # the same sweep design and seed twice (GPU kernels are not bit-exact)
        rows = run["range_test"][name]["curve"]
        _, lr, loss, _, acc, _ = (list(c) for c in zip(*rows, strict=True))
        curve = {"lr": lr, "loss": loss, "accuracy": acc}
        sweeps[name] = sweep_from(curve, LRFinderParams(), 24 * 98)  # 24 epochs of 98 steps
    features = {"training steps": 24 * 98, "warm-up steps": 5 * 98, "training images": 50_000, "epochs": 24}
    folder = H200.parent / "lr_bench/w64_full"  # `python -m research.lr_bench fine-h200 [--kind fine2]`, on a CPU

    def swept(kind: str) -> picks.Sweep | None:
        path = folder / f"{kind}-s0.json"
        r = json.loads(path.read_text()) if path.exists() else None
        return r and sweep_from(r["curve"], LRFinderParams(**r["lr_finder"]), 24 * 98)

    if fine := swept("fine"):
        sweeps["default"] = dataclasses.replace(sweeps["default"], fine=dataclasses.replace(fine, fine=swept("fine2")))
    return Setting("w64_full", grid, sweeps, "H200, bf16, seed 0: one run per LRMAX", features)


def evaluate(setting: Setting, rules: dict[str, picks.Rule], compare: dict[str, str]) -> dict:
    """Per rule: each base sweep's pick and the accuracy it reads, their mean and the verdict; per variant sweep
    (`compare`: variant -> the variant it is compared with, '' for the plain sweep), the factor between its
    pick and the compared sweep's of the same seed, and whether the two picks read the same verdict."""
    best_lr, best, noise = setting.best()
    base = {k: v for k, v in setting.sweeps.items() if "-" not in k}
    table = {}
    for name, rule in rules.items():
        chosen = {k: rule.pick(sweep) for k, sweep in base.items()}
        read = {k: setting.accuracy_at(lr) for k, lr in chosen.items() if lr is not None}
        marks = {mark for _, mark in read.values()}
        mean = statistics.fmean(acc for acc, _ in read.values()) if read else None
        # the trainings of this very pick (a range found under other constants of the rule is not this one)
        trained = {
            k: (lr, acc)
            for k, runs in setting.trained.get(name, {}).items()
            for lr, acc in runs.items()
            if chosen.get(k) and abs(math.log(lr / chosen[k])) < 1e-6
        }
        if read and set(read) <= set(trained):  # the found range trained from every sweep: judged on that
            mean, marks = statistics.fmean(trained[k][1] for k in read), {"trained"}
        verdict = "?" if mean is None or "?" in marks else ("within" if mean >= best - noise else "miss")
        factors = {}
        for key, sweep in setting.sweeps.items():
            seed, _, variant = key.partition("-")
            against = setting.sweeps.get(f"{seed}-{compare[variant]}" if compare.get(variant) else seed)
            if variant and against and (lr := rule.pick(sweep)) and (other := rule.pick(against)):
                same = (setting.accuracy_at(lr)[0] >= best - noise) == (setting.accuracy_at(other)[0] >= best - noise)
                factors[key] = {"factor": lr / other, "same_verdict": same}
        table[name] = {
            "picks": chosen,
            # the same seed's best grid point: a paired look, free of the seeds' offsets from one another
            "seed_best": {k: max(setting.by_seed[k].values()) for k in trained if setting.by_seed.get(k)},
            "accuracy": {k: acc for k, (acc, _) in read.items()},
            "marks": sorted(marks - {"", "trained"}),
            "trained": {k: {"lr_max": lr, "test_acc": acc} for k, (lr, acc) in trained.items()},
            "judged_on": "trained" if "trained" in marks else "grid",
            "mean_accuracy": mean,
            "verdict": verdict,
            "variant_factors": factors,
        }
    return {
        "grid": {str(lr): accs for lr, accs in sorted(setting.grid.items())},
        "best": {"lr_max": best_lr, "mean": best, "noise": noise},
        "note": setting.note,
        "rules": table,
    }


def plot(setting: Setting, summary: dict, path: Path, shown: tuple[str, ...], default: str) -> None:
    """Above: the grid's test accuracy against LRMAX (each seed, the mean, the band within noise of the best)
    and the default rule's picks. Below, on the same LR axis: every rule's pick on each sweep, a row a rule."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7), dpi=110)
    top, strip = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for lr, accs in sorted(setting.grid.items()):
        top.scatter([lr] * len(accs), accs, color="0.5", s=14, zorder=3)
    means = setting.means()
    top.plot(list(means), list(means.values()), color="black", label="trained grid: mean over seeds (dots: seeds)")
    best = summary["best"]
    top.axhspan(best["mean"] - best["noise"], best["mean"], color="gold", alpha=0.35, label="within noise of the best")
    for j, lr in enumerate(v for v in summary["rules"][default]["picks"].values() if v):
        top.axvline(lr, color="tab:red", lw=1.5, label=f"{default} (the default): its picks" if j == 0 else None)
    top.set_ylabel("test accuracy (%, all test images)")
    top.set_title(f"{setting.name}: accuracy against LRMAX, and each rule's pick on each sweep")
    top.legend(fontsize=8, loc="lower left")
    for row, name in enumerate(shown):
        lrs = [v for v in summary["rules"][name]["picks"].values() if v]
        color = "tab:red" if name == default else "tab:blue"
        strip.scatter(lrs, [row] * len(lrs), color=color, s=22, zorder=3)
    strip.axvspan(*_noise_span(setting, best), color="gold", alpha=0.35)
    strip.set_yticks(range(len(shown)), shown, fontsize=8)
    strip.invert_yaxis()
    strip.grid(axis="y", color="0.9")
    strip.set_xscale("log")
    strip.set_xlabel("LRMAX (log scale; LRMIN = LRMAX / 10)")
    fig.tight_layout()
    outputs.write_bytes(path, _png(fig))


def _noise_span(setting: Setting, best: dict) -> tuple[float, float]:
    """The LRs whose interpolated grid accuracy is within noise of the best (inside the grid)."""
    lrs = np.geomspace(min(setting.grid), max(setting.grid), 400)
    ok = [lr for lr in lrs if setting.accuracy_at(lr)[0] >= best["mean"] - best["noise"]]
    return min(ok), max(ok)


def _png(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def markdown(summaries: dict[str, dict], rules: tuple[str, ...]) -> str:
    lines = [
        "| rule | " + " | ".join(summaries) + " | within | worst shortfall |",
        "|---" * (len(summaries) + 3) + "|",
    ]
    for name in rules:
        cells, wins, short = [], 0, []
        for summary in summaries.values():
            r = summary["rules"][name]
            lrs = [v for v in r["picks"].values() if v]
            pick = statistics.geometric_mean(lrs) if lrs else float("nan")
            mark = "".join(r["marks"])
            acc = "-" if r["mean_accuracy"] is None else f"{mark}{r['mean_accuracy']:.2f}"
            acc += " trained" if r["judged_on"] == "trained" else ""
            sign = {"within": "**ok**", "miss": "miss", "?": "?"}[r["verdict"]]
            wins += r["verdict"] == "within"
            if r["verdict"] != "?":
                short.append(summary["best"]["mean"] - r["mean_accuracy"])
            cells.append(f"{pick:.3g} {acc} {sign}")
        worst = f"{max(short):.2f}" if short else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wins}/{len(summaries)} | {worst} |")
    head = ["| setting | best LRMAX | best mean | noise | grid (LRMAX: mean over seeds) |", "|---|---|---|---|---|"]
    for setting, s in summaries.items():
        grid = ", ".join(f"{float(lr):.3g}: {statistics.fmean(a):.2f} (n={len(a)})" for lr, a in s["grid"].items())
        b = s["best"]
        head.append(f"| {setting} | {b['lr_max']:.3g} | {b['mean']:.2f} | {b['noise']:.2f} | {grid} |")
    return "\n".join(head) + "\n\n" + "\n".join(lines)


def found_table(summaries: dict[str, dict], rule: str) -> str:
    """Per setting and sweep: the range `rule` found on it, what it trained to, and what the grid reads there."""
    lines = [
        f"| setting | sweep | {rule}'s LRMAX | trained to | the grid read there | best less noise "
        "| that seed's best grid point |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, summary in summaries.items():
        r, b = summary["rules"][rule], summary["best"]
        for key, lr in r["picks"].items():
            trained = r["trained"].get(key)
            acc = f"{trained['test_acc']:.2f}" if trained else "not yet"
            grid = r["accuracy"].get(key)
            grid_read = "-" if grid is None else f"{grid:.2f}"
            lr_text = "-" if lr is None else f"{lr:.3g}"
            own = r["seed_best"].get(key)
            own_text = "-" if own is None else f"{own:.2f}"
            lines.append(
                f"| {setting} | {key} | {lr_text} | {acc} | {grid_read} | {b['mean'] - b['noise']:.2f} | {own_text} |"
            )
    return "\n".join(lines)


def base_sweeps(s: Setting) -> list[picks.Sweep]:
    return [v for k, v in s.sweeps.items() if "-" not in k]


def fit_budget(group: list[Setting], feature: str = "training steps") -> tuple[float, float]:
    """budget's two constants, by least squares in logs over every base sweep of `group`: log(best LRMAX /
    lowest loss's LR) = power x log(feature / reference). Returns (power, reference)."""
    x, y = [], []
    for s in group:
        for w in base_sweeps(s):
            x.append(math.log(s.features[feature]))
            y.append(math.log(s.best()[0] / picks.lowest_loss_lr(w)))
    power, intercept = np.polyfit(x, y, 1)
    return float(power), float(math.exp(-intercept / power))


def fitted(settings: list[Setting]) -> list[Setting]:
    """The settings a fit may use: 5 grid points or more with the first two seeds each (one, where the setting has
    one seed: the H200's grid), the best among them; a setting still running is left out until it has them."""

    def need(s: Setting) -> int:
        return min(2, max(map(len, s.grid.values())))

    return [
        s
        for s in settings
        if sum(len(a) >= need(s) for a in s.grid.values()) >= 5 and len(s.grid[s.best()[0]]) >= need(s)
    ]


def budget_read(s: Setting, power: float, reference: float, feature: str = "training steps") -> tuple[float, float]:
    """(geometric mean pick, mean grid accuracy read at the picks) of budget with these constants on s's sweeps."""
    scale = (s.features[feature] / reference) ** power
    lrs = [float(np.clip(picks.lowest_loss_lr(w) * scale, w.lr[0], w.lr[-1])) for w in base_sweeps(s)]
    return statistics.geometric_mean(lrs), statistics.fmean(s.accuracy_at(lr)[0] for lr in lrs)


def leave_one_out(settings: list[Setting], summaries: dict[str, dict]) -> str:
    """The headline: for each setting, budget's constants fitted on all the other settings, its picks on this
    setting's sweeps read off this setting's grid, and the verdict (within noise of the best mean, or the
    shortfall); beside it, in sample, the committed constants' verdict from the main table."""
    group = fitted(settings)
    if len(group) < 3:
        return f"No fit: {len(group)} setting(s) with a grid of 5 points or more, and leaving one out needs 3."
    lines = [
        "| setting | best LRMAX | best mean | noise (seeds at best) | fitted on the others: power, reference | "
        "pick | accuracy read there | shortfall | out of sample | in sample (committed constants) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    shorts, within = [], 0
    for s in group:
        power, reference = fit_budget([o for o in group if o is not s])
        lr, acc = budget_read(s, power, reference)
        best_lr, best, noise = s.best()
        short = best - acc
        ok = short <= noise
        within += ok
        shorts.append(short)
        r = summaries[s.name]["rules"]["budget"]
        inside = {"within": "within", "miss": "miss", "?": "?"}[r["verdict"]]
        inside += f" ({best - r['mean_accuracy']:.2f} short)" if r["mean_accuracy"] is not None else ""
        lines.append(
            f"| {s.name} | {best_lr:.3g} | {best:.2f} | {noise:.2f} ({len(s.grid[best_lr])}) | {power:.3f}, "
            f"{reference:.3g} | {lr:.3g} | {acc:.2f} | {short:.2f} | {'**within**' if ok else 'miss'} | {inside} |"
        )
    power, reference = fit_budget(group)
    return "\n".join(
        [
            f"Out of sample, `budget` is within noise in {within} of {len(group)} settings; the worst shortfall is "
            f"{max(shorts):.2f} points (median {statistics.median(shorts):.2f}). Fitted on all {len(group)}: power "
            f"{power:.3f}, reference {reference:.3g} steps (committed in onecycle/picks.py: "
            f"{picks.BUDGET_POWER:.3f}, {picks.BUDGET_REFERENCE_STEPS:.3g}).",
            "",
            *lines,
        ]
    )


def anchor_loo(group: list[Setting], anchors, feature: str | None) -> list[tuple[Setting, float, float, float]]:
    """Leave one setting out for the rule LRMAX = anchor x C (x (feature / reference) ** power when `feature`):
    the constants fitted by least squares in logs on the other settings, read on this one's sweeps. `anchors(s)`
    gives the anchor LR of each of s's sweeps. Returns (setting, geometric mean pick, accuracy read, shortfall)."""
    rows = []
    for s in group:
        x, y = [], []
        for o in group:
            if o is not s:
                for a in anchors(o):
                    x.append(math.log(o.features[feature]) if feature else 0.0)
                    y.append(math.log(o.best()[0] / a))
        slope, intercept = np.polyfit(x, y, 1) if feature else (0.0, statistics.fmean(y))
        scale = math.exp(intercept + slope * (math.log(s.features[feature]) if feature else 0.0))
        lrs = [a * scale for a in anchors(s)]
        acc = statistics.fmean(s.accuracy_at(lr)[0] for lr in lrs)
        rows.append((s, statistics.geometric_mean(lrs), acc, s.best()[1] - acc))
    return rows


def fine_sweeps(s: Setting) -> list[picks.Sweep]:
    return [w.fine for w in base_sweeps(s) if w.fine is not None]


def fine_anchors(s: Setting) -> list[float]:
    """What the `fine` rule scales on each of s's sweeps: its fine sweeps' lowest losses (picks.fine_lowest_mean)."""
    return [picks.fine_lowest_mean(w) for w in base_sweeps(s) if w.fine is not None]


def fit_fine(group: list[Setting]) -> float:
    """The `fine` rule's constant: exp of the mean over the sweeps of `group` of log(best LRMAX / their fine sweeps'
    lowest-loss LRs' geometric mean), least squares in logs as anchor_loo fits it."""
    logs = [math.log(s.best()[0] / fine_anchor) for s in group for fine_anchor in fine_anchors(s)]
    return math.exp(statistics.fmean(logs))


def fine_table(settings: list[Setting]) -> str:
    """The fine sweep's lowest loss as the anchor, judged leave-one-out on the settings that have fine sweeps,
    beside budget's anchor (the user's sweep) on the same settings, each with a constant alone and with the
    training steps."""
    group = [s for s in fitted(settings) if fine_sweeps(s)]
    if len(group) < 3:
        return f"No fine sweeps yet in 3 settings with complete grids ({len(group)})."
    rules = {
        "fine (both fine sweeps' lowest losses) x C": (fine_anchors, None),
        "the first fine sweep's lowest loss alone x C": (
            lambda s: [picks.lowest_loss_lr(w) for w in fine_sweeps(s)],
            None,
        ),
        "budget's anchor (the user's sweep) x C": (lambda s: [picks.lowest_loss_lr(w) for w in base_sweeps(s)], None),
        "budget (the user's sweep) x (steps / ref) ** p": (
            lambda s: [picks.lowest_loss_lr(w) for w in base_sweeps(s)],
            "training steps",
        ),
    }
    head = "| setting | best LRMAX | best mean | noise | " + " | ".join(rules) + " |"
    lines = [head, "|---" * (len(rules) + 4) + "|"]
    results = {name: anchor_loo(group, anchors, feature) for name, (anchors, feature) in rules.items()}
    for i, s in enumerate(group):
        best_lr, best, noise = s.best()
        cells = []
        for rows in results.values():
            _, lr, _, short = rows[i]
            cells.append(f"{lr:.3g}: {short:.2f} short" + (" **within**" if short <= noise else ""))
        seeds = len(s.grid[best_lr])
        noisy = " (noisy)" if noise >= NOISY else ""
        head_cells = f"| {s.name} | {best_lr:.3g} | {best:.2f} | {noise:.2f}{noisy}, {seeds} seed{'s' * (seeds > 1)} | "
        lines.append(head_cells + " | ".join(cells) + " |")
    summary = []
    for rows in results.values():
        shorts = [short for _, _, _, short in rows]
        within = sum(short <= s.best()[2] for s, _, _, short in rows)
        summary.append(f"{within}/{len(rows)}, worst {max(shorts):.2f}, median {statistics.median(shorts):.2f}")
    lines.append("| **within noise, out of sample** | | | | " + " | ".join(summary) + " |")
    return "\n".join(lines)


def seeds_table(settings: list[Setting]) -> str:
    """How far each seed moves a whole grid: its mean accuracy, less the mean of all the seeds, over the grid points
    that every one of the setting's seeds trained (the first two seeds' points where none has them all). A seed
    that trains every LRMAX lower makes the best point's mean noisy without moving which LRMAX is best."""
    lines = ["| setting | grid points | each seed's offset (points of accuracy) |", "|---|---|---|"]
    lowest = []
    for s in settings:
        seeds = sorted(s.by_seed)
        shared = [lr for lr in s.grid if all(lr in s.by_seed[k] for k in seeds)]
        if not shared:
            seeds = seeds[:2]
            shared = [lr for lr in s.grid if all(lr in s.by_seed.get(k, {}) for k in seeds)]
        if len(seeds) < 2 or not shared:
            continue
        means = {k: statistics.fmean(s.by_seed[k][lr] for lr in shared) for k in seeds}
        centre = statistics.fmean(means.values())
        lowest.append(min(means, key=means.get))
        cells = ", ".join(f"{k} {means[k] - centre:+.2f}" for k in seeds)
        lines.append(f"| {s.name} | {len(shared)} | {cells} |")
    counts = ", ".join(f"{k} in {lowest.count(k)}" for k in sorted(set(lowest), key=lowest.count, reverse=True))
    return "\n".join([f"The lowest seed: {counts} of {len(lowest)} settings.", "", *lines])


def dropped_table(dropped: Path) -> str:
    """The settings dropped for noise (their results moved to `dropped`, docs/results/lr_bench_dropped/): each one's
    best grid point, its seeds' standard error, and the seeds that spread would need to bring it under NOISY."""
    lines = [
        "| setting | best LRMAX | best mean | seeds there | their standard deviation | standard error | "
        f"seeds needed for an error under {NOISY} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, done in sorted(load_results(dropped).items()):
        means = grid_means(done)
        lr = max(means, key=lambda x: statistics.fmean(means[x]))
        accs = means[lr]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {name} | {lr:.3g} | {statistics.fmean(accs):.2f} | {len(accs)} | {spread:.2f} | "
            f"{spread / len(accs) ** 0.5:.2f} | {math.floor((spread / NOISY) ** 2) + 1} |"
        )
    return "\n".join(lines)


def features_table(settings: list[Setting]) -> str:
    """The leave-one-out shortfall with another feature of the setting in place of the training steps."""
    group = fitted(settings)
    if len(group) < 3:
        return "No fit."
    lines = ["| scaled by | leave-one-out shortfall, worst | median |", "|---|---|---|"]
    for feature in group[0].features:
        shorts = []
        for s in group:
            power, reference = fit_budget([o for o in group if o is not s], feature)
            shorts.append(s.best()[1] - budget_read(s, power, reference, feature)[1])
        lines.append(f"| {feature} | {max(shorts):.2f} | {statistics.median(shorts):.2f} |")
    return "\n".join(lines)


def write_fit(settings: list[Setting], source: Path) -> tuple[float, float, float]:
    """Fit budget's constants and the `fine` rule's on every setting (that has fine sweeps) and write them between
    the `# fit:` marks of `source` (onecycle/picks.py)."""
    power, reference = fit_budget(fitted(settings))
    scale = fit_fine([s for s in fitted(settings) if fine_sweeps(s)])
    body = (
        f"BUDGET_REFERENCE_STEPS = {reference:.1f}  # the training length at which LRMAX is the lowest loss's LR "
        f"itself\nBUDGET_POWER = {power:.4f}\n"
        f"FINE_SCALE = {scale:.4f}  # LRMAX over the fine sweeps' lowest-loss LRs' geometric mean\n"
    )
    text = re.sub(
        r"(# fit:begin\n).*?(# fit:end)", lambda m: m.group(1) + body + m.group(2), source.read_text(), flags=re.S
    )
    outputs.write_bytes(source, text.encode())
    return power, reference, scale


def variant_table(summaries: dict[str, dict], compare: dict[str, str], rules: tuple[str, ...], names: set[str]) -> str:
    """Each sweep of the variants `names` against its compared sweep, for `rules`: the factor between their picks
    (* where the two read opposite verdicts), and the worst factor (either way) of each rule."""
    lines = ["| sweep | compared with | " + " | ".join(rules) + " |", "|---" * (len(rules) + 2) + "|"]
    worst: dict[str, float | None] = dict.fromkeys(rules)  # None: no variant sweep of that rule's kind (`fine`)
    for setting, summary in summaries.items():
        keys = sorted({k for r in rules for k in summary["rules"][r]["variant_factors"]})
        for key in keys:
            seed, _, variant = key.partition("-")
            if variant not in names:
                continue
            cells = []
            for r in rules:
                f = summary["rules"][r]["variant_factors"].get(key)
                if f is not None:
                    worst[r] = max(worst[r] or 1.0, f["factor"], 1 / f["factor"])
                cells.append("-" if f is None else f"{f['factor']:.3f}" + ("" if f["same_verdict"] else " *"))
            against = f"{seed}-{compare[variant]}" if compare.get(variant) else seed
            lines.append(f"| {setting} {key} | {setting} {against} | " + " | ".join(cells) + " |")
    cells = ("-" if worst[r] is None else f"**{worst[r]:.2f}**" for r in rules)
    lines.append("| **worst factor, either way** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pictures(names: list[str]) -> str:
    """Every setting's picture, two a row (docs/results/lr_bench/<setting>.png, linked from docs/)."""
    cells = [f"![{n}](results/lr_bench/{n}.png)" for n in names] + [""] * (len(names) % 2)
    rows = ["| | |", "| --- | --- |"]
    rows += [f"| {a} | {b} |" for a, b in zip(cells[::2], cells[1::2], strict=True)]
    return "\n".join(rows)


def refresh_page(page: Path, sections: dict[str, str]) -> None:
    """Put the report's tables into `page` between its `<!-- report:NAME -->` and `<!-- /report:NAME -->`
    marks, so that the page quotes what the report prints."""
    text = page.read_text()
    for name, body in sections.items():
        pattern = rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)"
        text = re.sub(pattern, lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text, flags=re.S)
    outputs.write_bytes(page, text.encode())
    print(f"refreshed the tables of {page}")


def all_settings(out: Path, config: Path) -> list[Setting]:
    return [h200_setting(), *bench_settings(out, config)]


def report(args) -> dict:
    settings = all_settings(args.out, args.config)
    rules = dict(picks.RULES)
    variants = read_bench(args.config).variants
    compare = {v.name: v.compare for v in variants}
    # the sweep's own knobs: variants that change an lr_finder key (the others change float rounding alone)
    knobs = {v.name for v in variants if any(k.startswith("lr_finder.") for k in v.overrides | v.times)}
    shown = (DEFAULT, "min_loss", "acc_drop", "fastai_valley")
    summaries = {s.name: evaluate(s, rules, compare) for s in settings}
    for s in settings:
        plot(s, summaries[s.name], args.out / f"{s.name}.png", tuple(rules), DEFAULT)
    outputs.write_json(args.out / "summary.json", summaries)
    sections = {
        "results": markdown(summaries, tuple(rules)),
        "found": found_table(summaries, DEFAULT),
        "loo": leave_one_out(settings, summaries),
        "features": features_table(settings),
        "fine": fine_table(settings),
        "knobs": variant_table(summaries, compare, shown, knobs),
        "pictures": pictures(list(summaries)),
        "seeds": seeds_table(settings),
        "dropped": dropped_table(args.out.with_name(args.out.name + "_dropped")),
        "rounding": variant_table(summaries, compare, shown, set(compare) - knobs),
    }
    print("\n\n".join(sections.values()))
    if args.page:
        refresh_page(args.page, sections)
    return summaries


@tool_main
def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    report_ = sub.add_parser("report", help="the tables and plots, from what has finished")
    report_.add_argument("--page", type=Path, help="also refresh the tables of this page (docs/lr-finder.md)")
    fit = sub.add_parser("fit", help="fit budget's constants on every setting, into src/onecycle/picks.py")
    for command in (report_, fit):
        command.add_argument("--out", type=Path, default=ROOT / "docs/results/lr_bench")
        command.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args()
    if args.command == "fit":
        power, reference, scale = write_fit(all_settings(args.out, args.config), PICKS)
        print(f"wrote budget's power {power:.4f}, reference {reference:.1f} steps, fine's scale {scale:.4f}: {PICKS}")
    else:
        report(args)


if __name__ == "__main__":
    main()

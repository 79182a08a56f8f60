"""The LR-finder benchmark's report: every rule's pick on every sweep, read off the trained grids.

    python -m research.lr_bench report [--out docs/results/lr_bench]

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

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onecycle import outputs, picks
from onecycle.config import LRFinderParams
from research.lr_bench import ROOT, grid_means, load_results, read_bench, sweep_from, training_steps

NOISE_FLOOR = 0.3  # points of test accuracy
DEFAULT = LRFinderParams().pick
H200 = ROOT / "docs/results/h200_gpu_run.json"


@dataclass(frozen=True)
class Setting:
    name: str
    grid: dict[float, list[float]]  # LRMAX -> test accuracy per seed
    sweeps: dict[str, picks.Sweep]  # "s0", "s1", "s0-isa_default", ...
    note: str = ""
    features: dict[str, float] = field(default_factory=dict)  # what a rule might scale with: steps, images, ...
    # rule -> sweep ("s0", ...) -> (LRMAX, test accuracy) of the range that rule found on that sweep, trained
    trained: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    by_seed: dict[str, dict[float, float]] = field(default_factory=dict)  # "s0" -> LRMAX -> that seed's accuracy

    def means(self) -> dict[float, float]:
        return {lr: statistics.fmean(accs) for lr, accs in sorted(self.grid.items())}

    def best(self) -> tuple[float, float, float]:
        """(LRMAX, mean, noise) of the best grid point."""
        lr, mean = max(self.means().items(), key=lambda kv: kv[1])
        spread = statistics.stdev(self.grid[lr]) if len(self.grid[lr]) > 1 else 0.0
        return lr, mean, max(NOISE_FLOOR, spread)

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
        train = params.train
        features = {"training steps": steps, "warm-up steps": steps // train.epochs * train.peak_epoch}
        features |= {"training images": images, "epochs": train.epochs}
        trained: dict[str, dict[str, tuple[float, float]]] = {}
        by_seed: dict[str, dict[float, float]] = {}
        for r in done.values():
            if r["kind"] == "found":
                trained.setdefault(r["rule"], {})[f"s{r['seed']}"] = (r["lr_max"], r["test_acc"])
            elif r["kind"] == "train":
                by_seed.setdefault(f"s{r['seed']}", {})[r["lr_max"]] = r["test_acc"]
        if grid and sweeps:
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
        trained = setting.trained.get(name, {})
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


def calibration(settings: list[Setting]) -> str:
    """The budget rule's two constants, fitted by least squares in logs: log(best LRMAX / lowest loss's LR) =
    BUDGET_POWER x log(training steps / BUDGET_REFERENCE_STEPS), on every setting with a grid of 5 points or
    more; each setting's shortfall from its best when the constants are fitted on the others only; and the same
    leave-one-out with another feature of the setting in place of the training steps."""

    def sweeps(s: Setting) -> list[picks.Sweep]:
        return [v for k, v in s.sweeps.items() if "-" not in k]

    def fit(group: list[Setting], feature: str) -> tuple[float, float]:
        x, y = [], []
        for s in group:
            for w in sweeps(s):
                x.append(math.log(s.features[feature]))
                y.append(math.log(s.best()[0] / picks.lowest_loss_lr(w)))
        power, intercept = np.polyfit(x, y, 1)
        return float(power), float(math.exp(-intercept / power))  # (power, reference)

    def shortfall(s: Setting, feature: str, power: float, reference: float) -> float:
        scale = (s.features[feature] / reference) ** power
        return s.best()[1] - statistics.fmean(s.accuracy_at(picks.lowest_loss_lr(w) * scale)[0] for w in sweeps(s))

    def left_out(s: Setting, feature: str) -> tuple[float, float, float]:
        power, reference = fit([o for o in fitted if o is not s], feature)
        return shortfall(s, feature, power, reference), power, reference

    fitted = [s for s in settings if len(s.grid) >= 5]
    if len(fitted) < 3:
        return f"No fit: {len(fitted)} setting(s) with a grid of 5 points or more, and leaving one out needs 3."
    power, reference = fit(fitted, "training steps")
    lines = [
        f"Fitted on {', '.join(s.name for s in fitted)}: power {power:.3f}, reference {reference:.0f} steps "
        f"(committed: {picks.BUDGET_POWER:.3f}, {picks.BUDGET_REFERENCE_STEPS})",
        "",
        "| setting | training steps | best LRMAX / lowest loss's LR | shortfall, committed constants | "
        "shortfall, fitted without this setting |",
        "|---|---|---|---|---|",
    ]
    for s in fitted:
        ratio = statistics.geometric_mean([s.best()[0] / picks.lowest_loss_lr(w) for w in sweeps(s)])
        committed = shortfall(s, "training steps", picks.BUDGET_POWER, picks.BUDGET_REFERENCE_STEPS)
        short, p, r = left_out(s, "training steps")
        lines.append(
            f"| {s.name} | {s.features['training steps']:.0f} | {ratio:.3f} | {committed:.2f} | "
            f"{short:.2f} (power {p:.2f}, reference {r:.0f}) |"
        )
    lines += ["", "| scaled by | leave-one-out shortfall, worst | mean |", "|---|---|---|"]
    for feature in fitted[0].features:
        shorts = [left_out(s, feature)[0] for s in fitted]
        lines.append(f"| {feature} | {max(shorts):.2f} | {statistics.fmean(shorts):.2f} |")
    return "\n".join(lines)


def rounding(summaries: dict[str, dict], compare: dict[str, str], rules: tuple[str, ...]) -> str:
    """Each variant sweep's pick over its compared sweep's, for `rules` (a factor; * where the two read opposite
    verdicts)."""
    lines = ["| sweep | compared with | " + " | ".join(rules) + " |", "|---" * (len(rules) + 2) + "|"]
    for setting, summary in summaries.items():
        keys = sorted({k for r in rules for k in summary["rules"][r]["variant_factors"]})
        for key in keys:
            seed, _, variant = key.partition("-")
            cells = []
            for r in rules:
                f = summary["rules"][r]["variant_factors"].get(key)
                cells.append("-" if f is None else f"{f['factor']:.3f}" + ("" if f["same_verdict"] else " *"))
            against = f"{seed}-{compare[variant]}" if compare.get(variant) else seed
            lines.append(f"| {setting} {key} | {setting} {against} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def refresh_page(page: Path, sections: dict[str, str]) -> None:
    """Put the report's tables into `page` between its `<!-- report:NAME -->` and `<!-- /report:NAME -->`
    marks, so that the page quotes what the report prints."""
    text = page.read_text()
    for name, body in sections.items():
        pattern = rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)"
        text = re.sub(pattern, lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text, flags=re.S)
    outputs.write_bytes(page, text.encode())
    print(f"refreshed the tables of {page}")


def report(args) -> dict:
    settings = [h200_setting(), *bench_settings(args.out, args.config)]
    rules = dict(picks.RULES)
    compare = {v.name: v.compare for v in read_bench(args.config).variants}
    summaries = {s.name: evaluate(s, rules, compare) for s in settings}
    for s in settings:
        plot(s, summaries[s.name], args.out / f"{s.name}.png", tuple(rules), DEFAULT)
    outputs.write_json(args.out / "summary.json", summaries)
    sections = {
        "results": markdown(summaries, tuple(rules)),
        "found": found_table(summaries, DEFAULT),
        "calibration": calibration(settings),
        "rounding": rounding(summaries, compare, (DEFAULT, "min_loss", "acc_drop")),
    }
    print("\n\n".join(sections.values()))
    if args.page:
        refresh_page(args.page, sections)
    return summaries

"""The LR-finder benchmark: in each setting, trained grids of LRMAX beside what every pick rule reads off the sweep.

    python -m research.lr_bench run --archive cifar-10-binary.tar.gz [--out docs/results/lr_bench] [--workers 2]

`run` works through the settings of research/lr_bench.yaml: per seed, a range test (the lr_range_test stage's
own `lr_finder.find_range`, whose curve every rule reads later), one `training.fit` per LRMAX of the grid (as
train_one_cycle, LRMIN = LRMAX / lr_finder.min_div), then the test accuracy on every test image; and the found
range trained: that seed's sweep read by the setting's `lr_finder.pick` (the default rule), as `dvc repro`
would train it, so that the default is judged on what it trains to, not on the grid read between points. Each job
runs in a process of its own with one thread (`--workers` at once: on a shared 2-core CPU two one-thread
processes lose less to a busy core than one two-thread process), and writes one JSON under --out/<setting>/.
A rerun skips what is there, so a killed benchmark keeps every finished job; what is planned next depends on
what has finished (a grid grows past an edge that holds its best mean, a noisy best point gets more seeds).

The jobs run through research.jobs, the harness research/study.py runs on too: its data cache, its child
processes, its result files. research/lr_report.py turns those files into the tables and plots of
docs/lr-finder.md, and fits the default rule's constants on them (it imports this module; this one never imports
it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from onecycle import outputs
from onecycle.config import LRFinderParams, Params, parse_params, read_yaml
from onecycle.errors import UserError
from research import jobs
from scripts.experiments import apply_overrides, git_commit, tool_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).with_name("lr_bench.yaml")
NOISY = 0.5  # points of test accuracy: a best grid point whose seeds' standard error is this or more gets seeds
MAX_SEEDS = 8  # seeds of a setting, at most: a setting still noisy then is replaced (the page says how noisy)
MAX_GROWTH = 3  # grid points added past each edge, at most
SWEEPS = ("sweep", "fine", "fine2")  # the job kinds that sweep, not train


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: dict[str, Any]
    grid: tuple[float, ...]
    more_seeds: tuple[int, ...] = ()  # seeds of this setting only, after every setting's seeds


@dataclass(frozen=True)
class Variant:
    """Sweeps of the same settings and seeds under other float kernels, threads or overrides; their picks are
    compared with those of the sweep `compare` names (a variant, or the plain sweep when empty)."""

    name: str
    settings: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    compare: str = ""
    times: dict[str, float] = field(default_factory=dict)  # key -> factor on the setting's own value

    def applied(self, raw: dict) -> dict:
        """The overrides of this variant for a setting whose params mapping is `raw`: `set` as it is, and each key
        of `times` as the setting's value times its factor (an integer key stays an integer)."""
        scaled = {}
        for key, factor in self.times.items():
            section, name = key.split(".")
            value = raw[section][name] * factor
            scaled[key] = round(value) if isinstance(raw[section][name], int) else value
        return self.overrides | scaled


@dataclass(frozen=True)
class Job:
    setting: str
    kind: str  # "sweep" (a range test), "fine" (lr_finder's fine sweep around a sweep's lowest loss), "fine2" (the
    # same design again, around the fine sweep's lowest loss), "train" (a
    # grid point's LRMAX) or "found" (the pick on that seed's sweep)
    seed: int
    lr_max: float | None = None
    variant: str = ""  # a sweep under other float kernels (Variant.name)
    rule: str = ""  # "found": the rule that picked lr_max (the setting's lr_finder.pick)

    @property
    def name(self) -> str:
        if self.kind in SWEEPS:
            return f"{self.kind}-s{self.seed}" + (f"-{self.variant}" if self.variant else "")
        if self.kind == "found":  # its LRMAX in the name: the same sweep picked under other constants is another job
            return f"found-{self.rule}-{self.lr_max:.6g}-s{self.seed}"
        return f"train-{self.lr_max:.6g}-s{self.seed}"


@dataclass(frozen=True)
class Bench:
    shared: dict[str, Any]
    seeds: tuple[int, ...]
    settings: tuple[Setting, ...]
    variants: tuple[Variant, ...]
    fine: str = ""  # fine sweeps (lr_finder.fine_sweep) after: "plain" the plain sweeps, "all" every sweep, "" none
    found: tuple[str, ...] = ()  # rules whose found ranges are trained too, beside each setting's own pick
    fine2: bool = False  # and a second fine sweep after each fine one (`fine2`), around its lowest loss

    def setting(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)

    def variant(self, name: str) -> Variant:
        """The variant of that name; "" (a plain sweep or a training) gives one that changes nothing."""
        return next((v for v in self.variants if v.name == name), Variant("", ()))


def read_bench(path: Path = CONFIG) -> Bench:
    raw = read_yaml(path.read_text())
    settings = tuple(
        Setting(s["name"], s.get("set") or {}, tuple(float(x) for x in s["grid"]), tuple(s.get("more_seeds", ())))
        for s in raw["settings"]
    )
    variants = tuple(
        Variant(
            v["name"],
            tuple(v["settings"]),
            {k: str(x) for k, x in (v.get("env") or {}).items()},
            v.get("threads", 1),
            v.get("set") or {},
            v.get("compare", ""),
            {k: float(x) for k, x in (v.get("times") or {}).items()},
        )
        for v in raw.get("variants") or ()
    )
    found = tuple(raw.get("found") or ())
    fine, fine2 = raw.get("fine") or "", bool(raw.get("fine2"))
    return Bench(raw.get("set") or {}, tuple(raw["seeds"]), settings, variants, fine, found, fine2)


def setting_params(
    bench: Bench, setting: Setting, data_set: dict, seed: int, extra: dict | None = None
) -> tuple[dict, Params]:
    """The params mapping of one job (params.yaml, the benchmark's, the setting's and a variant's overrides, the
    archive, the seed), and its parsed Params: a wrong key stops the benchmark before any work."""
    base = read_yaml((ROOT / "params.yaml").read_text())
    raw = apply_overrides(base, bench.shared | setting.overrides | (extra or {}) | data_set | {"train.seed": seed})
    try:
        return raw, parse_params(raw)
    except UserError as exc:
        raise UserError(f"setting {setting.name!r}: {exc}") from None


def training_steps(params: Params) -> int:
    """Optimizer steps of the training a setting's range serves: what `budget` reads."""
    from onecycle import schedules

    images = params.data.train_limit or 50_000  # CIFAR-10's training set when not limited
    return params.train.epochs * schedules.steps_per_epoch(images, params.train.batch_size)


def sweep_from(curve: dict, finder: LRFinderParams, train_steps: int):
    """A saved sweep's curve (lr, loss, accuracy per step) as the rules read it (`picks.Sweep`, its moving averages
    recomputed as the range test computes them), for a training of `train_steps` steps."""
    import numpy as np

    from onecycle import picks
    from onecycle.lr_finder import smooth

    loss, accuracy = curve["loss"], curve["accuracy"]
    return picks.Sweep(
        np.asarray(curve["lr"], float),
        np.asarray(loss, float),
        np.asarray(smooth(loss, finder.smooth_beta), float),
        np.asarray(accuracy, float),
        np.asarray(smooth(accuracy, finder.smooth_beta), float),
        finder.num_iter,
        train_steps,
    )


def found_jobs(bench: Bench, setting: Setting, done: dict[str, dict], seeds) -> list[Job]:
    """Per seed whose sweep has finished: a training from the range its setting's pick rule finds on it, and each
    rule of the YAML's `found` (`fine` reads the fine sweep around that sweep, once it has finished)."""
    from onecycle import picks

    params = setting_params(bench, setting, {}, 0)[1]
    steps = training_steps(params)
    jobs = []
    for rule in dict.fromkeys([params.lr_finder.pick, *bench.found]):
        for seed in seeds:
            sweep, fine = done.get(f"sweep-s{seed}"), [done.get(f"{kind}-s{seed}") for kind in ("fine", "fine2")]
            if not sweep or (picks.RULES[rule].needs_fine and not all(fine)):  # lr_finder.FINE_ROUNDS: 2
                continue
            read = sweep_from(sweep["curve"], params.lr_finder, steps)
            if all(fine):
                rounds = [sweep_from(r["curve"], LRFinderParams(**r["lr_finder"]), 0) for r in fine]
                read = dataclasses.replace(read, fine=dataclasses.replace(rounds[0], fine=rounds[1]))
            if lr := picks.RULES[rule].pick(read):
                jobs.append(Job(setting.name, "found", seed, lr, rule=rule))
    return jobs


def load_results(out: Path) -> dict[str, dict[str, dict]]:
    """setting -> job name -> its result, of every finished job under `out`."""
    results: dict[str, dict[str, dict]] = {}
    for path in sorted(out.glob("*/*.json")):
        results.setdefault(path.parent.name, {})[path.stem] = json.loads(path.read_text())
    return results


def grid_means(done: dict[str, dict]) -> dict[float, list[float]]:
    """LRMAX -> test accuracies (one per seed) of a setting's finished trainings."""
    means: dict[float, list[float]] = {}
    for result in done.values():
        if result["kind"] == "train":
            means.setdefault(result["lr_max"], []).append(result["test_acc"])
    return means


def grown_grid(setting: Setting, done: dict[str, dict]) -> list[float]:
    """The grid, grown by factors of 2 past an edge while that edge holds the best mean (once every point has a
    result), so that the best is an inner point."""
    grid = sorted(setting.grid)
    trained = grid_means(done)
    for _ in range(2 * MAX_GROWTH):
        if not all(lr in trained for lr in grid):
            break
        best = max(grid, key=lambda lr: statistics.fmean(trained[lr]))
        if best == grid[0] and grid[0] > setting.grid[0] / 2**MAX_GROWTH:
            grid.insert(0, grid[0] / 2)
        elif best == grid[-1] and grid[-1] < setting.grid[-1] * 2**MAX_GROWTH:
            grid.append(grid[-1] * 2)
        else:
            break
    return grid


def noise_seeds(bench: Bench, setting: Setting, done: dict[str, dict], grid: list[float]) -> list[Job]:
    """More seeds while the best grid point's mean is noisy (standard error NOISY or more), up to MAX_SEEDS: each a
    sweep and the best point with its two neighbours, once every point of the grid has the first seeds."""
    trained = grid_means(done)
    if not all(len(trained.get(lr, [])) >= len(bench.seeds) for lr in grid):
        return []
    best = max(grid, key=lambda lr: statistics.fmean(trained[lr]))
    accs = trained[best]
    if not 2 <= len(accs) < MAX_SEEDS or statistics.stdev(accs) / len(accs) ** 0.5 < NOISY:  # one seed: no error
        return []
    at_best = {r["seed"] for r in done.values() if r["kind"] == "train" and r["lr_max"] == best}
    # the first later seed the best point lacks: a seed that came for an earlier best point may lack this one
    seed = next(s for s in itertools.count(max(bench.seeds) + 1) if s not in at_best)
    i = grid.index(best)
    around = grid[max(0, i - 1) : i + 2]
    return [Job(setting.name, "sweep", seed)] + [Job(setting.name, "train", seed, lr) for lr in around]


def plan(bench: Bench, results: dict[str, dict[str, dict]]) -> list[Job]:
    """Every job the results so far call for, most needed first: setting by setting, its seeds' sweeps and grid,
    the points its grid grew by and its first seed's variant sweeps; then the noisy settings' further seeds;
    then the found ranges of every swept seed (every setting's own pick before the YAML's other `found` rules);
    then the later seeds' variant sweeps."""
    jobs = []
    grids = {s.name: grown_grid(s, results.get(s.name, {})) for s in bench.settings}
    first = bench.seeds[0]
    for s in bench.settings:
        for seed in bench.seeds:
            jobs += [Job(s.name, "sweep", seed)] + [Job(s.name, "train", seed, lr) for lr in s.grid]
        jobs += [Job(s.name, "train", seed, lr) for seed in bench.seeds for lr in grids[s.name] if lr not in s.grid]
        jobs += [Job(s.name, "sweep", first, variant=v.name) for v in bench.variants if s.name in v.settings]
    for s in bench.settings:
        for seed in s.more_seeds:
            jobs += [Job(s.name, "sweep", seed)] + [Job(s.name, "train", seed, lr) for lr in grids[s.name]]
        jobs += noise_seeds(bench, s, results.get(s.name, {}), grids[s.name])
    found = []
    for s in bench.settings:  # every seed swept so far (later seeds too, even once their grid is not needed)
        done = results.get(s.name, {})
        swept = sorted(r["seed"] for r in done.values() if r["kind"] == "sweep" and not r.get("variant"))
        found += found_jobs(bench, s, done, swept)
    pick = {s.name: setting_params(bench, s, {}, 0)[1].lr_finder.pick for s in bench.settings}
    jobs += sorted(found, key=lambda j: j.rule != pick[j.setting])  # each setting's own pick first, everywhere
    for seed in bench.seeds[1:]:
        jobs += [Job(name, "sweep", seed, variant=v.name) for v in bench.variants for name in v.settings]
    if bench.fine:  # a fine sweep after each finished sweep (plain ones only, or all)
        for s in bench.settings:
            for r in results.get(s.name, {}).values():
                if r["kind"] == "sweep" and (bench.fine == "all" or not r.get("variant")):
                    jobs.append(Job(s.name, "fine", r["seed"], variant=r.get("variant", "")))
                if r["kind"] == "fine" and bench.fine2:
                    jobs.append(Job(s.name, "fine2", r["seed"], variant=r.get("variant", "")))
    return jobs


def payload_of(bench: Bench, job: Job, data_set: dict, results: dict, out: Path, cache: Path, commit: str) -> dict:
    """The job as research.jobs runs it: its params, its data folder, what it sweeps around, its record."""
    setting = bench.setting(job.setting)
    variant = bench.variant(job.variant)
    plain = setting_params(bench, setting, data_set, job.seed)[0]
    raw, params = setting_params(bench, setting, data_set, job.seed, variant.applied(plain))
    record = dataclasses.asdict(job) | {"overrides": setting.overrides, "commit": commit, "env": variant.env}
    record |= {"variant_overrides": variant.applied(plain), "compare": variant.compare}
    under = {"fine": "sweep", "fine2": "fine"}.get(job.kind)  # the sweep whose lowest loss centres this one
    around = results.get(job.setting, {}).get(f"{under}-s{job.seed}" + (f"-{job.variant}" if job.variant else ""))
    return {
        "work": "sweep" if job.kind in SWEEPS else "train",
        "params": raw,
        "data": str(jobs.data_folder(params, cache)[0]),
        "around": around if under else None,
        "lr_max": job.lr_max,
        "test_every_epoch": False,  # a grid reads the final accuracy alone
        "record": record,
        "result": str(out / job.setting / f"{job.name}.json"),
    }


def run(args: argparse.Namespace) -> None:
    if not Path(args.archive).is_file():
        raise UserError(f"--archive {args.archive}: no such file")
    md5 = hashlib.md5(Path(args.archive).read_bytes()).hexdigest()
    data_set = {"data.url": str(Path(args.archive).resolve()), "data.md5": md5}
    bench = read_bench(args.config)
    for s in bench.settings:
        setting_params(bench, s, data_set, 0)  # every setting's params checked before any work
    found = git_commit(ROOT)
    commit = found["commit"] + ("+uncommitted" if found.get("uncommitted_changes") else "")
    pool = jobs.Pool(args.workers, args.cache / "logs")
    began = time.perf_counter()
    while True:
        results = load_results(args.out)
        waiting = [
            j
            for j in dict.fromkeys(plan(bench, results))
            if (not args.kinds or j.kind in args.kinds) and pool.pending(args.out / j.setting / f"{j.name}.json")
        ]
        for job in waiting[: max(args.workers - len(pool.running), 0)]:
            payload = payload_of(bench, job, data_set, results, args.out, args.cache, commit)
            variant = bench.variant(job.variant)
            pool.start(payload, variant.env | {"OMP_NUM_THREADS": str(variant.threads)})
            print(f"[{time.perf_counter() - began:6.0f} s] start {job.setting}/{job.name}", flush=True)
        if not pool.running:
            break
        for result, status, seconds in pool.finished():
            key = f"{result.parent.name}/{result.stem}"
            if status != 0:
                outputs.write_json(result.with_suffix(".failed"), {"returncode": status})
            said = "done" if status == 0 else f"FAILED ({status}; log in {pool.log(result)})"
            print(f"[{time.perf_counter() - began:6.0f} s] {said} {key} in {seconds:.0f} s", flush=True)
    print(f"all planned jobs done in {time.perf_counter() - began:.0f} s")


H200 = ROOT / "docs/results/h200_gpu_run.json"  # the spec's setting (w64_full): one seed's grid and sweeps


def fine_h200(args: argparse.Namespace) -> None:
    """The fine sweep around the H200 record's default sweep, on this machine, with that record's params (width 64,
    all 50,000 images, tensor augmentation, bf16 as on the GPU): what the `fine` rule reads at the spec's setting,
    until a GPU sweeps it. Written to --out/w64_full/fine-s0.json, where lr_report finds it; with --kind fine2, the
    second fine sweep around that one's lowest loss, to fine2-s0.json."""
    record = json.loads(H200.read_text())
    md5 = hashlib.md5(Path(args.archive).read_bytes()).hexdigest()
    base = read_yaml((ROOT / "params.yaml").read_text())
    overrides = {"data.url": str(Path(args.archive).resolve()), "data.md5": md5, "augment.backend": "tensor"}
    overrides |= {"model.width": 64, "train.precision": "bf16", "train.device": "cpu"}
    raw = apply_overrides(base, overrides)
    rows = record["range_test"]["default"]["curve"]
    curve = {"lr": [r[1] for r in rows], "loss": [r[2] for r in rows], "accuracy": [r[4] for r in rows]}
    folder = ROOT / args.out / "w64_full"
    folder.mkdir(parents=True, exist_ok=True)
    around = {"curve": curve, "stop_reason": "finished", "images_seen": 0}
    base = "the H200 record's default sweep"
    if args.kind == "fine2":
        around, base = json.loads((folder / "fine-s0.json").read_text()), "fine-s0.json"
    result = folder / f"{args.kind}-s0.json"
    payload = {
        "work": "sweep", "params": raw, "data": str(jobs.data_folder(parse_params(raw), args.cache)[0]),
        "around": around, "result": str(result),
        "record": {"setting": "w64_full", "kind": args.kind, "seed": 0, "variant": "", "overrides": overrides,
                   "base": base, "commit": git_commit(ROOT)["commit"]},
    }  # fmt: skip
    torch.set_num_threads(args.threads)
    outputs.write_json(result, payload["record"] | jobs.work(payload))
    print(f"wrote {result}")


def shares(out: Path) -> None:
    """How much of each trained job's process went to training.fit (its steps and the final test), from the
    set-up times research.jobs records: interpreter start, imports and data load are the rest."""
    rows = []
    for results in load_results(out).values():
        for r in results.values():
            if "setup" in r and "fit_seconds" in r:
                rows.append((r["fit_seconds"] / (r["setup"]["setup_seconds"] + r["fit_seconds"]), r))
    if not rows:
        raise UserError(f"no trained job under {out} records its set-up (research.jobs writes it)")
    rows.sort(key=lambda x: x[0])
    low, r = rows[0]
    imports = statistics.median(r["setup"]["imports_seconds"] for _, r in rows)
    print(f"{len(rows)} trained jobs: training.fit is {statistics.median(s for s, _ in rows):.1%} of a job's process "
          f"(median), {low:.1%} at the least ({r['setting']}/{r['kind']}, fit {r['fit_seconds']:.1f} s); "
          f"imports {imports:.2f} s (median), on {r['device']}")  # fmt: skip


@tool_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="run (or resume) the benchmark")
    go.add_argument("--archive", required=True, help="the CIFAR-10 binary archive (a local file)")
    go.add_argument("--out", type=Path, default=ROOT / "docs/results/lr_bench")
    go.add_argument("--config", type=Path, default=CONFIG)
    go.add_argument("--cache", type=Path, default=Path("/tmp/lr_bench"), help="decoded data, job payloads, logs")
    go.add_argument("--workers", type=int, default=2)
    go.add_argument("--kinds", nargs="+", choices=(*SWEEPS, "train", "found"), help="only these jobs' kinds")
    h200 = sub.add_parser("fine-h200", help="the fine sweep around the H200 record's sweep, on this machine")
    h200.add_argument("--archive", required=True, help="the full CIFAR-10 binary archive (a local file)")
    h200.add_argument("--out", type=Path, default=ROOT / "docs/results/lr_bench")
    h200.add_argument("--cache", type=Path, default=Path("/tmp/lr_bench"))
    h200.add_argument("--threads", type=int, default=2)
    h200.add_argument("--kind", choices=("fine", "fine2"), default="fine", help="fine2: around fine-s0.json")
    share = sub.add_parser("shares", help="each trained job's share of its process spent in training.fit")
    share.add_argument("--out", type=Path, default=ROOT / "docs/results/lr_bench")
    args = parser.parse_args()
    if args.command == "shares":
        shares(args.out)
    elif args.command == "fine-h200":
        args.cache.mkdir(parents=True, exist_ok=True)
        fine_h200(args)
    else:
        args.cache.mkdir(parents=True, exist_ok=True)
        run(args)


if __name__ == "__main__":
    main()

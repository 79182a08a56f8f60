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

research/lr_report.py turns those files into the tables and plots of docs/lr-finder.md, and fits the default
rule's constants on them (it imports this module; this one never imports it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onecycle.config import LRFinderParams, Params, parse_params, read_yaml
from onecycle.errors import UserError
from scripts.experiments import apply_overrides, git_commit, tool_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).with_name("lr_bench.yaml")
NOISY = 0.5  # points of test accuracy: a best grid point whose seeds' standard error is this or more gets seeds
MAX_SEEDS = 4  # seeds of a setting, at most (then the page says how noisy it stayed)
MAX_GROWTH = 3  # grid points added past each edge, at most


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
    kind: str  # "sweep" (a range test), "fine" (lr_finder's fine sweep around a sweep's lowest loss), "train" (a
    # grid point's LRMAX) or "found" (the pick on that seed's sweep)
    seed: int
    lr_max: float | None = None
    variant: str = ""  # a sweep under other float kernels (Variant.name)
    rule: str = ""  # "found": the rule that picked lr_max (the setting's lr_finder.pick)

    @property
    def name(self) -> str:
        if self.kind in ("sweep", "fine"):
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

    def setting(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)


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
    return Bench(raw.get("set") or {}, tuple(raw["seeds"]), settings, variants, raw.get("fine") or "", found)


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


def fine_finder(finder: LRFinderParams, sweep: dict) -> LRFinderParams:
    """The fine sweep's design (lr_finder.fine_params) around the lowest loss of `sweep`, a finished sweep job's
    result swept with `finder`: what lr_finder.fine_sweep runs after that sweep."""
    from onecycle import lr_finder, picks

    return lr_finder.fine_params(finder, picks.lowest_loss_lr(sweep_from(sweep["curve"], finder, 0)))


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
            sweep, fine = done.get(f"sweep-s{seed}"), done.get(f"fine-s{seed}")
            if not sweep or (picks.RULES[rule].needs_fine and not fine):
                continue
            read = sweep_from(sweep["curve"], params.lr_finder, steps)
            if fine:
                read = dataclasses.replace(read, fine=sweep_from(fine["curve"], LRFinderParams(**fine["lr_finder"]), 0))
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
    seed = max(bench.seeds) + 1 + len(accs) - len(bench.seeds)  # the next seed this setting has not used
    i = grid.index(best)
    around = grid[max(0, i - 1) : i + 2]
    return [Job(setting.name, "sweep", seed)] + [Job(setting.name, "train", seed, lr) for lr in around]


def plan(bench: Bench, results: dict[str, dict[str, dict]]) -> list[Job]:
    """Every job the results so far call for, most needed first: setting by setting, its seeds' sweeps and grid,
    the points its grid grew by and its first seed's variant sweeps; then the noisy settings' further seeds;
    then the found ranges of every swept seed; then the later seeds' variant sweeps."""
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
    for s in bench.settings:  # every seed swept so far (later seeds too, even once their grid is not needed)
        done = results.get(s.name, {})
        swept = sorted(r["seed"] for r in done.values() if r["kind"] == "sweep" and not r.get("variant"))
        jobs += found_jobs(bench, s, done, swept)
    for seed in bench.seeds[1:]:
        jobs += [Job(name, "sweep", seed, variant=v.name) for v in bench.variants for name in v.settings]
    if bench.fine:  # a fine sweep after each finished sweep (plain ones only, or all)
        for s in bench.settings:
            for r in results.get(s.name, {}).values():
                if r["kind"] == "sweep" and (bench.fine == "all" or not r.get("variant")):
                    jobs.append(Job(s.name, "fine", r["seed"], variant=r.get("variant", "")))
    return jobs


def data_folder(params: Params, cache: Path) -> Path:
    """The folder `data.prepare` writes for this data section (as download_cifar), made once."""
    from onecycle import data

    section = json.dumps(dataclasses.asdict(params.data), sort_keys=True)
    folder = cache / hashlib.sha256(section.encode()).hexdigest()[:16]
    if not (folder / "meta.json").exists():
        data.prepare(params.data, folder, progress=False)
    return folder


def run_job(payload: dict) -> dict:
    """One job in this process: the sweep's curve, or the trained grid point's test accuracy on every test image."""
    import torch

    from onecycle import batches, data, lr_finder, training
    from onecycle.model import build_model
    from scripts.measure import device_name

    torch.set_num_threads(payload["threads"])
    params = parse_params(payload["params"])
    dataset = data.load(Path(payload["data"]))
    device = torch.device("cpu")
    start = time.perf_counter()
    result: dict[str, Any] = {"device": device_name(device), "threads": payload["threads"], "torch": torch.__version__}
    if payload["kind"] in ("sweep", "fine"):
        if payload["kind"] == "fine":
            params = dataclasses.replace(params, lr_finder=fine_finder(params.lr_finder, payload["base"]))
        curve, found = lr_finder.find_range(params, dataset, device, progress=False)
        result |= {
            "curve": {"lr": curve.lr, "loss": curve.loss, "accuracy": curve.accuracy},
            "stop_reason": curve.stop_reason,
            "images_seen": curve.images_seen,
            "found": found.as_dict(curve, len(dataset.train.labels)),
            "lr_finder": dataclasses.asdict(params.lr_finder),  # the fine sweep's design, as it ran
        }
    else:
        lr_max = payload["lr_max"]
        torch.manual_seed(params.train.seed)
        model = build_model(params.model)
        # fit evaluates after every epoch: on one image here, and the final model below on every test image
        one = data.Split(dataset.test.images[:1], dataset.test.labels[:1])
        try:
            training.fit(model, dataclasses.replace(dataset, test=one), params, lr_max / params.lr_finder.min_div,
                         lr_max, device, progress=False)  # fmt: skip
            options = training.StepOptions.of(params.train, device)
            test = batches.EvalSet(dataset.test, dataset.mean, dataset.std, device)
            test_loss, correct, total = training.evaluate(model, test.batches(1024), options)
            result |= {"test_acc": 100 * correct / total, "test_loss": test_loss, "test_images": total}
        except training.Diverged as exc:  # too high an LR: a finding, scored as chance
            result |= {"test_acc": 10.0, "test_loss": float("nan"), "diverged": str(exc)}
    return result | {"seconds": time.perf_counter() - start}


def child(path: Path) -> None:
    from onecycle import outputs

    payload = json.loads(path.read_text())
    result = run_job(payload)
    outputs.write_json(Path(payload["result"]), payload["record"] | result)


def alive(marker: Path) -> bool:
    """Whether the job process whose pid `marker` holds still runs (a rerun leaves it to finish)."""
    try:
        os.kill(int(marker.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def run(args: argparse.Namespace) -> None:
    from onecycle import outputs

    if not Path(args.archive).is_file():
        raise UserError(f"--archive {args.archive}: no such file")
    md5 = hashlib.md5(Path(args.archive).read_bytes()).hexdigest()
    data_set = {"data.url": str(Path(args.archive).resolve()), "data.md5": md5}
    bench = read_bench(args.config)
    for s in bench.settings:
        setting_params(bench, s, data_set, 0)  # every setting's params checked before any work
    cache, out = args.cache, args.out
    found = git_commit(ROOT)
    commit = found["commit"] + ("+uncommitted" if found.get("uncommitted_changes") else "")
    running: dict[str, tuple[subprocess.Popen, Job, float]] = {}
    began = time.perf_counter()
    while True:
        results = load_results(out)
        waiting = [
            j
            for j in dict.fromkeys(plan(bench, results))
            if j.name not in results.get(j.setting, {})
            and f"{j.setting}/{j.name}" not in running
            and not (out / j.setting / f"{j.name}.failed").exists()  # look at its log; delete the file to retry
            and not alive(out / j.setting / f"{j.name}.running")  # a child a killed scheduler left running
            and (not args.kinds or j.kind in args.kinds)
        ]
        while waiting and len(running) < args.workers:
            job = waiting.pop(0)
            setting = bench.setting(job.setting)
            variant = next((v for v in bench.variants if v.name == job.variant), Variant("", ()))
            plain = setting_params(bench, setting, data_set, job.seed)[0]
            raw, params = setting_params(bench, setting, data_set, job.seed, variant.applied(plain))
            folder = out / job.setting
            folder.mkdir(parents=True, exist_ok=True)
            payload_path = cache / f"{job.setting}-{job.name}.payload.json"
            record = dataclasses.asdict(job) | {"overrides": setting.overrides, "commit": commit, "env": variant.env}
            record |= {"variant_overrides": variant.applied(plain), "compare": variant.compare}
            base = results.get(job.setting, {}).get(f"sweep-s{job.seed}" + (f"-{job.variant}" if job.variant else ""))
            payload = {
                "base": base if job.kind == "fine" else None,  # the sweep whose lowest loss centres the fine one
                "params": raw,
                "data": str(data_folder(params, cache)),
                "kind": job.kind,
                "lr_max": job.lr_max,
                "threads": variant.threads,
                "record": record,
                "result": str(folder / f"{job.name}.json"),
            }
            payload_path.write_text(json.dumps(payload))
            env = os.environ | variant.env | {"OMP_NUM_THREADS": str(variant.threads)}
            log = (cache / f"{job.setting}-{job.name}.log").open("w")
            command = [sys.executable, "-m", "research.lr_bench", "child", str(payload_path)]
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[f"{job.setting}/{job.name}"] = (process, job, time.perf_counter())
            (folder / f"{job.name}.running").write_text(str(process.pid))
            print(f"[{time.perf_counter() - began:6.0f} s] start {job.setting}/{job.name}", flush=True)
        if not running:
            break
        time.sleep(1)
        for key, (process, _job, started) in list(running.items()):
            if process.poll() is not None:
                del running[key]
                (out / f"{key}.running").unlink(missing_ok=True)
                status = "done" if process.returncode == 0 else f"FAILED ({process.returncode}; log in {cache})"
                print(f"[{time.perf_counter() - began:6.0f} s] {status} {key} in {time.perf_counter() - started:.0f} s")
                if process.returncode != 0:
                    outputs.write_json(out / f"{key}.failed", {"returncode": process.returncode})
    print(f"all planned jobs done in {time.perf_counter() - began:.0f} s")


H200 = ROOT / "docs/results/h200_gpu_run.json"  # the spec's setting (w64_full): one seed's grid and sweeps


def fine_h200(args: argparse.Namespace) -> None:
    """The fine sweep around the H200 record's default sweep, on this machine, with that record's params (width 64,
    all 50,000 images, tensor augmentation, bf16 as on the GPU): what the `fine` rule reads at the spec's setting,
    until a GPU sweeps it. Written to --out/w64_full/fine-s0.json, where lr_report finds it."""
    record = json.loads(H200.read_text())
    md5 = hashlib.md5(Path(args.archive).read_bytes()).hexdigest()
    base = read_yaml((ROOT / "params.yaml").read_text())
    overrides = {"data.url": str(Path(args.archive).resolve()), "data.md5": md5, "augment.backend": "tensor"}
    overrides |= {"model.width": 64, "train.precision": "bf16", "train.device": "cpu"}
    raw = apply_overrides(base, overrides)
    rows = record["range_test"]["default"]["curve"]
    curve = {"lr": [r[1] for r in rows], "loss": [r[2] for r in rows], "accuracy": [r[4] for r in rows]}
    result = ROOT / args.out / "w64_full" / "fine-s0.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "params": raw, "data": str(data_folder(parse_params(raw), args.cache)), "kind": "fine", "lr_max": None,
        "base": {"curve": curve}, "threads": args.threads, "result": str(result),
        "record": {"setting": "w64_full", "kind": "fine", "seed": 0, "variant": "", "overrides": overrides,
                   "base": "the H200 record's default sweep", "commit": git_commit(ROOT)["commit"]},
    }  # fmt: skip
    path = args.cache / "w64_full-fine.payload.json"
    path.write_text(json.dumps(payload))
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    subprocess.run([sys.executable, "-m", "research.lr_bench", "child", str(path)], cwd=ROOT, env=env, check=True)
    print(f"wrote {result}")


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
    go.add_argument("--kinds", nargs="+", choices=("sweep", "fine", "train", "found"), help="only these jobs' kinds")
    sub.add_parser("child", help=argparse.SUPPRESS).add_argument("payload", type=Path)
    h200 = sub.add_parser("fine-h200", help="the fine sweep around the H200 record's sweep, on this machine")
    h200.add_argument("--archive", required=True, help="the full CIFAR-10 binary archive (a local file)")
    h200.add_argument("--out", type=Path, default=ROOT / "docs/results/lr_bench")
    h200.add_argument("--cache", type=Path, default=Path("/tmp/lr_bench"))
    h200.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "child":
        child(args.payload)
    elif args.command == "fine-h200":
        args.cache.mkdir(parents=True, exist_ok=True)
        fine_h200(args)
    else:
        args.cache.mkdir(parents=True, exist_ok=True)
        run(args)


if __name__ == "__main__":
    main()

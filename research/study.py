"""The study tool: param settings trained through the stages' own library calls, into one JSON of results.

    python -m research.study --out RESULTS.json [--params params.yaml] [-S KEY=VALUE]...
        [--grid GRID.yaml] [--setting "NAME: KEY=VALUE ..."]... [--seeds N | --seeds 0,1,2]
        [--fresh] [--final-test-only] [--deadline SECONDS] [--cache DIR] [--commit SHA]
        [--peak] [--datasheet-tflops TFLOPS] [--profile PROFILE.txt]

A setting is a name and `KEY=VALUE` overrides exactly as `dvc exp run -S` takes them (dotted keys of
params.yaml, values read as YAML as DVC reads them), applied on top of --params, after the -S overrides that
every setting shares. Two keys are not params:
  lr_max=VALUE   train from LRMAX = VALUE and LRMIN = VALUE / lr_finder.min_div, with no range test. Without
                 it, each run first runs the LR range test and trains from the range it finds (recorded, with
                 the curve).
  seeds=N|LIST   one run per seed (train.seed): N means seeds 0..N-1. Default: --seeds, else train.seed once.
Every run's params go through config.parse_params before any work: a wrong key stops the study, naming it.
No setting at all: the params as they are, one setting named "params".

Each run does what the stages do, without MLflow: `data.load` of the folder `data.prepare` wrote (as
download_cifar; once per distinct data section, kept in --cache), `lr_finder.find_range` (as lr_range_test),
then `build_model` and `training.fit` (as train_one_cycle), through research.jobs, the harness that
research/lr_bench.py runs on too. All runs share this one warm process, or with --fresh each runs in a Python
process of its own, as `dvc repro` runs a stage, and its set-up (interpreter
and imports, CUDA context, data load) is timed apart. Runs go seed by seed through the settings (seed 0 of
every setting, then seed 1, ...), so that a deadline cut leaves every setting some seeds. A run whose
estimated time (the mean of its setting's finished runs, else of all finished runs) would end after
--deadline seconds from the start is skipped and recorded as skipped; with --fresh, a run still going at the
deadline is stopped. The JSON is rewritten after every run: a killed study keeps what finished. Exit
status: 0, or 1 when a run failed (the others are kept), 2 for a wrong setting.

--grid takes the settings from a YAML file (keep a device call's grid in a committed file):

    set:                  # optional: overrides for every setting, as -S
      data.url: /tmp/standin/full.tar.gz
      data.md5: 5ab9e89ebdcb436820f05160b3a4b9d6
    seeds: 1              # optional: the default seeds
    settings:
      - name: defaults    # the params as they are, seeds 0..4
        seeds: 5
      - name: lr0.02-wd1e-3
        seeds: [0, 1]
        set: {lr_max: 0.02, train.weight_decay: 1e-3}

--final-test-only tests the last epoch alone (training.fit's test_every_epoch=False): the same training and
final accuracy, no per-epoch history, and none of the per-epoch evaluation's arithmetic (about 40% of a job's at
width 32 on 5,000 images, by issue 26's count).

Extras: --peak measures a bf16 matrix product on the device (8192^3 on CUDA), and gives each run its
achieved TFLOP/s (2.28 GFLOP per training image at width 64, forward and backward, times (width / 64)^2,
over fit_seconds, which include the per-epoch evaluation) and its share of the measured peak and of
--datasheet-tflops (989 for an H200's dense bf16). --profile FILE puts two epochs of the first finished run's
params and range under torch.profiler (after the same two epochs unprofiled, as a warm-up) and writes the
kernels' table to FILE.

On a machine without the project installed (a lent GPU), run it from the repository root with
PYTHONPATH=src; it needs torch, numpy, PyYAML, tqdm, opencv and albumentations 2.0.8 (with its own needs), not
DVC or MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from onecycle import data, distributed, outputs, training
from onecycle.config import Params, parse_params, read_yaml
from onecycle.errors import UserError
from onecycle.model import build_model
from research import jobs
from scripts.experiments import apply_overrides, git_commit, parse_override, read_params, seeds_summary, tool_main
from scripts.measure import device_name, matmul_tflops, sync

SPECIAL_KEYS = ("lr_max", "seeds")


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: dict[str, Any]  # dotted params key -> value
    lr_max: float | None = None  # None: run the range test
    seeds: tuple[int, ...] | None = None  # None: the study's default


@dataclass(frozen=True)
class Run:
    setting: Setting
    seed: int
    raw: dict[str, Any]  # the params mapping: --params, -S, the setting's overrides, train.seed
    params: Params


def fail(where: str, message: str) -> UserError:
    return UserError(f"{where}: {message}")


def parse_seeds(value: Any, where: str) -> tuple[int, ...]:
    """A count N (seeds 0..N-1), a list of seeds, or '0,1,2'."""
    if isinstance(value, str) and "," in value:
        value = [read_yaml(part) for part in value.split(",")]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return tuple(range(value))
    seeds = value if isinstance(value, list) else []
    whole = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    if seeds and whole and len(set(seeds)) == len(seeds):
        return tuple(seeds)
    raise fail(where, f"seeds = {value!r} is not allowed: use a count N (seeds 0..N-1) or a list of distinct seeds")


def make_setting(name: Any, overrides: dict[str, Any], seeds: Any = None) -> Setting:
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"a setting needs a name, got {name!r}")
    where = f"setting {name!r}"
    overrides = dict(overrides)
    if "seeds" in overrides:
        if seeds is not None:
            raise fail(where, "give seeds once, not both as a key and beside the overrides")
        seeds = overrides.pop("seeds")
    lr_max = overrides.pop("lr_max", None)
    if lr_max is not None and (
        isinstance(lr_max, bool) or not isinstance(lr_max, (int, float)) or not 0 < lr_max < float("inf")
    ):
        raise fail(where, f"lr_max = {lr_max!r} is not allowed: use a positive number")
    seeds = None if seeds is None else parse_seeds(seeds, where)
    if seeds is not None and "train.seed" in overrides:
        raise fail(where, "give train.seed or seeds, not both")
    return Setting(name.strip(), overrides, None if lr_max is None else float(lr_max), seeds)


def setting_from_text(text: str) -> Setting:
    """'NAME: KEY=VALUE KEY=VALUE' (shell quoting inside: 'train.momentum=[0.9, 0.8]')."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise UserError(f"--setting {text!r}: write NAME: KEY=VALUE ... (for example 'wd: train.weight_decay=1e-3')")
    try:
        tokens = shlex.split(rest)
    except ValueError as exc:
        raise UserError(f"--setting {text!r}: {exc}") from None
    return make_setting(name, dict(parse_override(token) for token in tokens))


def read_grid(path: Path) -> tuple[dict[str, Any], Any, list[Setting]]:
    """(overrides for every setting, default seeds, settings) from a grid YAML file."""
    grid = read_params(path, "--grid")
    if not isinstance(grid, dict) or not isinstance(grid.get("settings"), list):
        raise UserError(f"--grid {path}: expected a mapping with a list under 'settings'")
    for key in grid:
        if key not in ("set", "seeds", "settings"):
            raise UserError(f"--grid {path}: unknown key {key!r} (known: set, seeds, settings)")
    shared = grid.get("set") or {}
    if not isinstance(shared, dict):
        raise UserError(f"--grid {path}: set must be a mapping of KEY: VALUE")
    settings = []
    for i, entry in enumerate(grid["settings"]):
        if not isinstance(entry, dict) or not set(entry) <= {"name", "seeds", "set"}:
            raise UserError(f"--grid {path}: settings[{i}] must be a mapping of name, seeds (optional), set (optional)")
        overrides = entry.get("set") or {}
        if not isinstance(overrides, dict):
            raise UserError(f"--grid {path}: settings[{i}].set must be a mapping of KEY: VALUE")
        settings.append(make_setting(entry.get("name"), overrides, entry.get("seeds")))
    return shared, grid.get("seeds"), settings


def plan_runs(base: dict, shared: dict, settings: list[Setting], default_seeds: tuple[int, ...] | None) -> list[Run]:
    """Every run, validated; in order seed index by seed index through the settings."""
    names = [s.name for s in settings]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two settings are named {name!r}: give each its own name")
    for key in shared:
        if key in SPECIAL_KEYS:
            raise UserError(f"-S {key}: {key} belongs to a setting, not to every setting (use --seeds for seeds)")
    per_setting = []
    for setting in settings:
        where = f"setting {setting.name!r}"
        raw = apply_overrides(apply_overrides(base, shared), setting.overrides)
        seeds = setting.seeds or (None if "train.seed" in setting.overrides else default_seeds)
        runs = []
        try:
            if seeds is None:
                params = parse_params(raw)
                runs.append(Run(setting, params.train.seed, raw, params))
            for seed in seeds or ():
                raw_seed = apply_overrides(raw, {"train.seed": seed})
                runs.append(Run(setting, seed, raw_seed, parse_params(raw_seed)))
        except UserError as exc:
            raise fail(where, str(exc)) from None
        per_setting.append(runs)
    order = []
    for i in range(max(len(runs) for runs in per_setting)):
        order += [runs[i] for runs in per_setting if i < len(runs)]
    return order


def payload_of(run: Run, folder: Path, result: Path, peaks: dict, every: bool = True) -> dict:
    """The run as research.jobs runs it: a training, from its setting's lr_max or from the range it finds; `every`
    False tests the last epoch alone."""
    return {
        "work": "train",
        "test_every_epoch": every,
        "params": run.raw,
        "data": str(folder),
        "lr_max": run.setting.lr_max,
        "peaks": peaks,
        "result": str(result),
    }


def run_fresh(run: Run, folder: Path, workdir: Path, peaks: dict, timeout: float, every: bool = True) -> dict:
    """`run` in a new Python process (research.jobs.Pool); its result, with process_seconds measured from here."""
    result = workdir / "result.json"
    result.unlink(missing_ok=True)
    pool = jobs.Pool(1, workdir / "logs")
    pool.start(payload_of(run, folder, result, peaks, every), timeout=timeout)
    while not (ended := pool.finished()):
        pass
    _, status, seconds = ended[0]
    log = pool.log(result).read_text()
    if log:
        print(log, end="", file=sys.stderr, flush=True)
    if status == -9:
        return {"error": f"stopped at the deadline after {seconds:.0f} s"}
    if not result.exists():
        return {"error": f"the process exited with {status} and no result: {log[-2000:]}"}
    return json.loads(result.read_text()) | {"process_seconds": seconds}


def profile(params: Params, lr_min: float, lr_max: float, dataset: data.Dataset, device: torch.device) -> str:
    """Two epochs of training.fit under torch.profiler (after the same two unprofiled): the kernels' table."""
    train = dataclasses.replace(params.train, epochs=2, peak_epoch=1)
    short = dataclasses.replace(params, train=train)

    def fit() -> None:
        torch.manual_seed(params.train.seed)
        training.fit(build_model(params.model), dataset, short, lr_min, lr_max, device, progress=False)
        sync(device)

    fit()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        fit()
        seconds = time.perf_counter() - start
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    return (
        f"2 epochs of training.fit ({len(dataset.train.labels)} images, batch {params.train.batch_size}, "
        f"width {params.model.width}) in {seconds:.3f} s under the profiler\n{table}"
    )


def too_late(estimate: float, left: float) -> str | None:
    """Why a run of about `estimate` seconds does not start with `left` seconds to the deadline; None: it starts."""
    return f"needs about {estimate:.0f} s, {max(left, 0):.0f} s left" if estimate > left else None


def header(tool: str, args: argparse.Namespace, mode: str, device: str, shared: dict) -> dict[str, Any]:
    """The head of a study's JSON: the tool and its arguments, when, where, at which commit, from which params."""
    return {
        "tool": tool,
        "argv": sys.argv[1:],
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "commit": args.commit or git_commit()["commit"],
        "params_file": str(args.params),
        "set": shared,
        "deadline_seconds": args.deadline,
    }


def summary_of(records: list[dict], runs: list[Run], default_device: str) -> dict:
    """Per setting, in the format of reports/seeds.json (n, median, mean, min, max, std of test_acc, device,
    width, runs), with the counts of skipped and failed runs."""
    table = {}
    for name in dict.fromkeys(run.setting.name for run in runs):
        width = next(run.params.model.width for run in runs if run.setting.name == name)
        mine = [r for run, r in zip(runs, records, strict=False) if run.setting.name == name]  # records: so far
        done = [r for r in mine if r["status"] == "ok"]
        entries = [
            {"seed": r["seed"], "exp_name": None, "mlflow_run_id": None}
            | {k: r.get(k) for k in ("test_acc", "best_test_acc", "lr_min", "lr_max", "lr_found")}
            for r in done
        ]
        device = done[0]["device"] if done else default_device
        table[name] = seeds_summary(entries, device, width) | {
            "skipped": sum(r["status"] == "skipped" for r in mine),
            "failed": sum(r["status"] == "failed" for r in mine),
        }
    return table


def print_summary(summary: dict) -> None:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print("\n| setting | n | median | mean | min | max | std | skipped | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        cells = [pct(s[k]) for k in ("median", "mean", "min", "max", "std")]
        print(f"| {name} | {s['n']} | {' | '.join(cells)} | {s['skipped']} | {s['failed']} |")


def study(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    params_path = Path(args.params)
    base = read_params(params_path)
    shared = dict(parse_override(text) for text in args.set)
    settings, default_seeds = [], None
    if args.grid:
        grid_shared, grid_seeds, settings = read_grid(args.grid)
        shared = grid_shared | shared  # the command line's -S wins over the grid's
        default_seeds = None if grid_seeds is None else parse_seeds(grid_seeds, f"--grid {args.grid}")
    settings += [setting_from_text(text) for text in args.setting]
    if args.seeds is not None:
        default_seeds = parse_seeds(args.seeds if "," in args.seeds else read_yaml(args.seeds), "--seeds")
    settings = settings or [Setting("params", {})]
    runs = plan_runs(base, shared, settings, default_seeds)  # every run's params checked before any work

    try:
        first_device = distributed.resolve_device(runs[0].params.train.device)
    except UserError:  # that run will fail and say why; the others still run
        first_device = distributed.resolve_device("auto")
    results = header("research/study.py", args, "fresh" if args.fresh else "warm", device_name(first_device), shared)
    results |= {"settings": [dataclasses.asdict(s) for s in settings], "data": {}, "runs": []}
    commit = results["commit"]

    def save() -> None:
        results["summary"] = summary_of(results["runs"], runs, results["device"])
        results["elapsed_seconds"] = time.perf_counter() - began
        outputs.write_json(args.out, results)

    def left() -> float:
        return args.deadline - (time.perf_counter() - began)

    peaks: dict[str, float] = {}
    if args.peak:
        peaks["measured_matmul"] = matmul_tflops(first_device)
        if args.datasheet_tflops:
            peaks["datasheet"] = args.datasheet_tflops
        results["peak_tflops"] = peaks
        print(f"peak: {json.dumps(peaks)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="study-") as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "data"
        folders, datasets = {}, {}
        for run in runs:
            folder, seconds = jobs.data_folder(run.params, cache)
            if folder not in folders.values():
                meta = json.loads((folder / "meta.json").read_text())
                results["data"][folder.name] = {
                    "url": run.params.data.url,
                    "train_images": meta["train_images"],
                    "test_images": meta["test_images"],
                    "prepare_seconds": seconds,
                }
            folders[id(run)] = folder
        save()

        durations: dict[str, list[float]] = {}
        for run in runs:
            name = run.setting.name
            record: dict[str, Any] = {
                "setting": name,
                "overrides": run.setting.overrides
                | ({} if run.setting.lr_max is None else {"lr_max": run.setting.lr_max}),
                "seed": run.seed,
                "torch": torch.__version__,
                "commit": commit,
            }
            past = durations.get(name) or [d for ds in durations.values() for d in ds]
            late = too_late(sum(past) / len(past) if past else 0.0, left())
            if late:
                record |= {"status": "skipped", "reason": late}
                results["runs"].append(record)
                save()
                print(f"{name} seed {run.seed}: skipped ({record['reason']})", flush=True)
                continue
            start = time.perf_counter()
            folder = folders[id(run)]
            if args.fresh:
                result = run_fresh(run, folder, Path(tmp), peaks, left(), not args.final_test_only)
            else:
                try:
                    if folder not in datasets:
                        datasets[folder] = data.load(folder)
                    payload = payload_of(run, folder, Path(tmp) / "unused.json", peaks, not args.final_test_only)
                    result = jobs.work(payload, datasets[folder])
                except Exception as exc:  # one failed run is a finding; the others still run
                    result = {"error": str(exc) if isinstance(exc, UserError) else traceback.format_exc()[-3000:]}
            if "diverged" in result:  # the benchmark's finding is this study's failed run
                result = {"error": result["diverged"]}
            wall = time.perf_counter() - start
            status = "failed" if "error" in result else "ok"
            record |= {"status": status, "wall_seconds": wall} | result
            results["runs"].append(record)
            save()
            if status == "ok":
                durations.setdefault(name, []).append(wall)
                how = "found" if record["lr_found"] else "given"
                print(
                    f"[{time.perf_counter() - began:7.1f} s] {name} seed {run.seed}: LR {record['lr_min']:.4g} -> "
                    f"{record['lr_max']:.4g} ({how}), test {record['test_acc']:.2f}% (best "
                    f"{record.get('best_test_acc', float('nan')):.2f}%), fit {record['fit_seconds']:.1f} s, "
                    f"run {wall:.1f} s",
                    flush=True,
                )
            else:
                print(f"{name} seed {run.seed}: FAILED: {result['error'].strip()[-600:]}", file=sys.stderr, flush=True)

        if args.profile:
            done = [(run, r) for run, r in zip(runs, results["runs"], strict=True) if r["status"] == "ok"]
            if not done:
                results["profile"] = {"skipped": "no run finished"}
            else:
                run, record = done[0]
                # 2 epochs unprofiled and 2 profiled, at up to twice the cost, and 10 s of the profiler's own
                late = too_late(3 * 2 * record["fit_seconds"] / run.params.train.epochs + 10, left())
                if late:
                    results["profile"] = {"skipped": late}
                else:
                    device = distributed.resolve_device(run.params.train.device)
                    dataset = datasets.get(folders[id(run)]) or data.load(folders[id(run)])
                    table = profile(run.params, record["lr_min"], record["lr_max"], dataset, device)
                    Path(args.profile).write_text(table + "\n")
                    results["profile"] = {"setting": run.setting.name, "seed": run.seed, "table": str(args.profile)}
                    print(table, flush=True)
            save()

    save()
    print_summary(results["summary"])
    return 1 if any(r["status"] == "failed" for r in results["runs"]) else 0


@tool_main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the JSON of results, rewritten after every run")
    parser.add_argument("--params", default="params.yaml", help="the params every setting starts from")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="for every setting")
    parser.add_argument("--grid", type=Path, help="a YAML file of settings (see the top of this file)")
    parser.add_argument("--setting", action="append", default=[], metavar="'NAME: KEY=VALUE ...'")
    parser.add_argument("--seeds", help="default seeds of every setting: a count N (0..N-1) or a list 0,1,2")
    parser.add_argument("--fresh", action="store_true", help="each run in a new Python process")
    parser.add_argument("--final-test-only", action="store_true", help="test the last epoch alone (no history)")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds from the start")
    parser.add_argument("--cache", type=Path, help="keep the prepared data folders here (default: a temp folder)")
    parser.add_argument("--commit", help="the commit to record (default: git rev-parse HEAD, when in git)")
    parser.add_argument("--peak", action="store_true", help="measure the matmul peak and each run's FLOP rate")
    parser.add_argument("--datasheet-tflops", type=float, help="also compare to this peak (H200 dense bf16: 989)")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table of two epochs here")
    args = parser.parse_args()
    if not args.out:
        parser.error("--out is required")
    return study(args)


if __name__ == "__main__":
    main()

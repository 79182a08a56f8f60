"""`make seeds N=5`: the current params trained with seeds 0..N-1 through the pipeline, into reports/seeds.json.

A table, and the median and spread of the test accuracy in reports/seeds.json.

    python -m scripts.seeds [-n 5] [-S KEY=VALUE]... [--group NAME] [--out reports/seeds.json]
    make seeds N=5 SET="-S model.width=16"

First `dvc repro download_cifar` (nothing to do when the data is up to date). Then, one seed after another,

    dvc exp run --temp -f --downstream lr_range_test -S train.seed=S [-S KEY=VALUE ...] -n GROUP-sS

a DVC experiment in a temporary copy of the workspace (the workspace, params.yaml included, is left as it
was; uncommitted edits of tracked files are part of the experiment), forced (-f) so that each seed trains
even where DVC's run cache knows the result, from the range test on: every seed runs its own LR range test,
as `dvc repro` would with that seed. Each experiment's training run in MLflow (experiment
"cifar10-one-cycle", found by its dvc.exp_name tag) gets the tags seeds.group = GROUP, seeds.seed and
seeds.n, so that the UI lists the group with `tags.seeds.group = 'GROUP'`. -S overrides go to every
experiment, as `dvc exp run -S` takes them; data.* cannot change here (the experiments train on the
workspace's data/cifar10: change data.* in params.yaml instead), nor train.seed (the seeds set it).

reports/seeds.json (rewritten after every seed): n, median, mean, min, max and std (sample, n - 1) of the
final test_acc in percent, the device, width (model.width), the group, the commit, the overrides, and the
runs (seed, exp_name, test_acc, best_test_acc, lr_min, lr_max, mlflow_run_id); seeds that failed are listed
under `failed`, and make the command exit 1 once the others have run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from onecycle import distributed, outputs
from onecycle.config import Params, parse_params
from onecycle.errors import UserError
from onecycle.tracking import Tracker, repo_root
from scripts.experiments import apply_overrides, git_commit, parse_override, read_params, seeds_summary, tool_main
from scripts.measure import device_name

STAGE = "train_one_cycle"


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]  # this environment's DVC


def check_overrides(texts: list[str], params_path: Path, seeds: range) -> tuple[dict, Params]:
    """The overrides, each seed's params validated (a wrong key stops here, naming it); the params of seed 0."""
    overrides = dict(parse_override(text) for text in texts)
    for key in overrides:
        if key == "train.seed" or key.startswith("data.") or key == "data":
            raise UserError(
                f"-S {key}: make seeds sets train.seed itself and trains on the workspace's data/cifar10; "
                "change data.* in params.yaml (then the experiments download nothing of their own)"
            )
    raw = read_params(params_path, "params file")
    checked = [parse_params(apply_overrides(raw, overrides | {"train.seed": seed})) for seed in seeds]
    return overrides, checked[0]


def training_run(tracker: Tracker, exp_name: str):
    """The finished training run that the experiment exp_name logged, or None."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`dvc.exp_name` = '{exp_name}' and tags.stage = '{STAGE}'",
        order_by=["attributes.start_time DESC"],
    )
    return next((r for r in runs if r.info.status == "FINISHED"), None)


def print_table(report: dict) -> None:
    print(f"\n{'seed':>4}  {'experiment':<34}  {'LR range':<22}  test_acc")
    for run in report["runs"]:
        lr = f"{run['lr_min']:.4g} -> {run['lr_max']:.4g}"
        print(f"{run['seed']:>4}  {run['exp_name']:<34}  {lr:<22}  {run['test_acc']:.2f}%")
    for run in report["failed"]:
        print(f"{run['seed']:>4}  {run['exp_name']:<34}  FAILED: {run['error']}")
    if report["n"]:
        std = "-" if report["std"] is None else f"{report['std']:.2f}"
        print(
            f"test_acc over {report['n']} seeds: median {report['median']:.2f}%, mean {report['mean']:.2f}%, "
            f"min {report['min']:.2f}%, max {report['max']:.2f}%, std {std} (width {report['width']}, "
            f"{report['device']}); MLflow: tags.seeds.group = '{report['group']}'"
        )


def run_seeds(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    root = repo_root()
    os.chdir(root)
    seeds = range(args.n)
    overrides, params = check_overrides(args.set, Path("params.yaml"), seeds)
    tracker = Tracker(root)  # an unreachable tracking server stops here, before any training
    group = args.group or f"seeds-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(args.out)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    subprocess.run(dvc("repro", "download_cifar"), check=True, env=env)
    # an experiment copies what git tracks: a dvc.lock not yet committed (and with it the data's hash) is copied
    untracked = subprocess.run(["git", "ls-files", "--error-unmatch", "dvc.lock"], capture_output=True).returncode
    copy = ["-C", "dvc.lock"] if untracked else []
    report = {
        "metric": "test_acc",  # percent, after the last epoch
        "device": device_name(distributed.resolve_device(params.train.device)),
        "width": params.model.width,
        "group": group,
        **git_commit(),
        "overrides": overrides,
        "epochs": params.train.epochs,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    runs, failed = [], []

    def save() -> dict:
        summary = seeds_summary(runs, report["device"], report["width"])
        summary.pop("runs")  # last, after the figures
        document = summary | report | {"elapsed_seconds": time.perf_counter() - began, "runs": runs, "failed": failed}
        outputs.write_json(out, document)
        return document

    for seed in seeds:
        name = f"{group}-s{seed}"
        sets = [arg for text in [f"train.seed={seed}", *args.set] for arg in ("-S", text)]
        print(f"== seed {seed}: dvc exp run {name}", flush=True)
        command = dvc("exp", "run", "--temp", "-f", "--downstream", "lr_range_test", *sets, *copy, "-n", name)
        status = subprocess.run(command, env=env).returncode
        run = training_run(tracker, name)
        if status or run is None:
            why = f"dvc exp run exited with {status} (its output is above)" if status else "no finished MLflow run"
            failed.append({"seed": seed, "exp_name": name, "error": why})
        else:
            tracker.run(run.info.run_id).set_tags({"seeds.group": group, "seeds.seed": seed, "seeds.n": args.n})
            metrics, logged = run.data.metrics, run.data.params
            runs.append(
                {
                    "seed": seed,
                    "exp_name": name,
                    "test_acc": metrics["test_acc"],  # the latest step: the last epoch
                    "best_test_acc": metrics.get("best_test_acc"),
                    "lr_min": float(logged["lr_min"]),
                    "lr_max": float(logged["lr_max"]),
                    "mlflow_run_id": run.info.run_id,
                }
            )
        save()
    print_table(save())
    print(f"wrote {out}")
    return 1 if failed else 0


@tool_main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="seeds 0..n-1 (default 5)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="as dvc exp run -S")
    parser.add_argument("--group", help="the MLflow tag seeds.group and the experiments' name prefix")
    parser.add_argument("--out", default="reports/seeds.json", help="relative to the repository root")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("-n must be at least 1")
    try:
        return run_seeds(args)
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(exc.cmd[1:])} failed (exit {exc.returncode}); no seed was run", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()

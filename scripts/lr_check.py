"""`make lr-check`: the current params trained from the found LR range times a few factors, as DVC experiments.

    python -m scripts.lr_check [--factors 0.5,1,2] [--group NAME] [--out reports/lr_check.json]
    make lr-check FACTORS=0.5,1,2

Is the found LRMAX the best on this setup? First `dvc repro lr_range_test` (the download and the range test of
the workspace's params.yaml; nothing to do when they are up to date) gives the found range. Then, one factor
after another,

    dvc exp run --temp -f --downstream train_one_cycle -S train.lr_scale=F -n GROUP-xF

trains from LRMIN x F and LRMAX x F (factor 1 is the spec's run: the range as found), in a temporary copy of
the workspace, which is left as it was. Each experiment's training run in MLflow gets the tags
lr_check.group = GROUP and lr_check.factor = F (the UI lists the group with `tags.lr_check.group = 'GROUP'`).
Prints accuracy against LRMAX, and writes reports/lr_check.json (the found range, each factor's LRMAX and test
accuracy, the device and the commit) and reports/lr_check.png (accuracy against LRMAX, the found pick marked).
Exit status 1 when a factor failed (the others are kept), 2 for a wrong argument.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from onecycle import distributed, lr_finder, outputs
from onecycle.config import load_params
from onecycle.errors import UserError
from onecycle.tracking import Tracker, repo_root
from scripts.experiments import git_commit, tool_main
from scripts.measure import device_name
from scripts.seeds import dvc, training_run


def parse_factors(text: str) -> list[float]:
    try:
        factors = [float(part) for part in text.split(",")]
    except ValueError:
        factors = []
    if not factors or any(not 0 < f < float("inf") for f in factors) or len(set(factors)) < len(factors):
        raise UserError(f"--factors {text!r}: give distinct positive numbers, for example 0.5,1,2")
    return sorted(factors)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    runs = report["runs"]
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot()
    ax.plot([r["lr_max"] for r in runs], [r["test_acc"] for r in runs], "o-", color="tab:blue")
    for r in runs:
        ax.annotate(f"x{r['factor']:g}: {r['test_acc']:.2f}%", (r["lr_max"], r["test_acc"]), fontsize=9,
                    textcoords="offset points", xytext=(0, 7), ha="center")  # fmt: skip
    found = report["found"]["lr_max"]
    ax.axvline(found, color="tab:red", ls="--", label=f"found LRMAX {found:.4g} ({report['found']['pick']})")
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.15)  # room for the labels of the end points
    ax.set_xlabel("LRMAX (log scale; LRMIN = LRMAX / min_div)")
    ax.set_ylabel("test accuracy after the last epoch (%)")
    ax.set_title(f"Accuracy against LRMAX, {report['epochs']} epochs, width {report['width']}")
    ax.legend(loc="lower center")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    outputs.write_bytes(path, buffer.getvalue())


def check(args: argparse.Namespace) -> int:
    root = repo_root()
    os.chdir(root)
    factors = parse_factors(args.factors)
    params = load_params("params.yaml")  # a wrong key stops here, naming it
    tracker = Tracker(root)  # an unreachable tracking server stops here, before any training
    group = args.group or f"lr-check-{datetime.now():%Y%m%d-%H%M%S}"
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(dvc("repro", "lr_range_test"), check=True, env=env)
    found = lr_finder.read_range(Path("reports/lr_range.json"))
    # an experiment copies what git tracks: a dvc.lock not yet committed (and with it the range) is copied
    untracked = subprocess.run(["git", "ls-files", "--error-unmatch", "dvc.lock"], capture_output=True).returncode
    copy = ["-C", "dvc.lock"] if untracked else []
    report = {
        "group": group,
        "found": {k: found.get(k) for k in ("lr_min", "lr_max", "pick")},
        "device": device_name(distributed.resolve_device(params.train.device)),
        "width": params.model.width,
        "epochs": params.train.epochs,
        "commit": git_commit(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": [],
        "failed": [],
    }
    for factor in factors:
        name = f"{group}-x{factor:g}"
        print(f"== LRMAX x {factor:g} = {found['lr_max'] * factor:.4g}: dvc exp run {name}", flush=True)
        sets = ["-S", f"train.lr_scale={factor * params.train.lr_scale!r}"]
        command = dvc("exp", "run", "--temp", "-f", "--downstream", "train_one_cycle", *sets, *copy, "-n", name)
        status = subprocess.run(command, env=env).returncode
        run = training_run(tracker, name)
        if status or run is None:
            why = f"dvc exp run exited with {status} (its output is above)" if status else "no finished MLflow run"
            report["failed"].append({"factor": factor, "exp_name": name, "error": why})
        else:
            tracker.run(run.info.run_id).set_tags({"lr_check.group": group, "lr_check.factor": factor})
            report["runs"].append(
                {
                    "factor": factor,
                    "exp_name": name,
                    "lr_max": float(run.data.params["lr_max"]),
                    "test_acc": run.data.metrics["test_acc"],
                    "mlflow_run_id": run.info.run_id,
                }
            )
        outputs.write_json(Path(args.out), report)
    print(f"\n{'factor':>6}  {'LRMAX':>9}  test_acc   (found: {found['lr_max']:.4g}, {found.get('pick')})")
    best = max(report["runs"], key=lambda r: r["test_acc"], default=None)
    for r in report["runs"]:
        marks = ("  <- found" if r["factor"] == 1 else "") + ("  (best)" if r is best else "")
        print(f"{r['factor']:>6g}  {r['lr_max']:>9.4g}  {r['test_acc']:6.2f}%{marks}")
    for r in report["failed"]:
        print(f"{r['factor']:>6g}  FAILED: {r['error']}")
    if report["runs"]:
        plot(report, Path(args.out).with_suffix(".png"))
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}; MLflow: tags.lr_check.group = '{group}'")
    return 1 if report["failed"] else 0


@tool_main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", default="0.5,1,2", help="LRMAX multipliers, comma-separated (default 0.5,1,2)")
    parser.add_argument("--group", help="the MLflow tag lr_check.group and the experiments' name prefix")
    parser.add_argument("--out", default="reports/lr_check.json", help="relative to the repository root")
    args = parser.parse_args()
    try:
        return check(args)
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(exc.cmd[1:])} failed (exit {exc.returncode}); nothing was trained", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()

"""The real pipeline on a lent GPU machine in one call: `dvc repro` from a clean checkout, each stage timed.

    PYTHONPATH=src python3 -m device.prepare    # here, once: .whl/ and .carry/ (see device/prepare.py)
    PYTHONPATH=src python3 -m device.pipeline   # there, carrying .whl and .carry: $OUT/h200-pipeline.json

It installs the wheels into $SITE (pip --no-index --no-deps --target), builds the stand-in archive (170 MB:
too big to carry), makes a fresh repository of the pipeline (scripts/pipeline_repo.py), points data.url and
data.md5 at the archive in its params.yaml and runs `dvc repro` there: the four stages of dvc.yaml, each a
fresh `python` process, logging to MLflow in the SQLite file mlflow.db at that repository's root. A `python`
shim first on PATH runs the stages with this interpreter and writes each stage process's start and end, so
the record has the wall time of each stage, of the whole `dvc repro` timed from outside, and of the part
after the download stage. Then, if it fits before $DEADLINE, a second `dvc repro -f` (bytecode compiled, page
cache warm); a bf16 matrix product measures the peak that model FLOP utilisation is given against
(device/probe.py); and `make bench`'s GPU path runs into $OUT/bench.json. $OUT/h200-pipeline.json is written
after each step, so a run cut short keeps what it measured; $OUT/pipeline.log holds every log (the stages'
own output included).

Environment (the defaults are the real run; small values try it on a CPU first):
    OUT        results folder (the device sets it)
    WIDTH      model.width (64)        EPOCHS  train.epochs (24)        BATCH  train.batch_size (512)
    SET        more params, space-separated KEY=VALUE read as `dvc exp run -S` reads them (YAML 1.2: 1e-4 is a
               number), e.g. "lr_finder.num_iter=8 train.peak_epoch=1"
    ARCHIVE    an existing CIFAR-10 binary archive to use; else the stand-in is built from .carry/
    PROXY_OPTS options of the stand-in's generator, e.g. "--train 2000 --test 500" (none: all 60,000 images)
    REPEAT     1: the second, warm `dvc repro -f` when it fits (default); 0: none
    BENCH      1: then `make bench` (python -m scripts.bench $BENCH_ARGS, default the GPU sizes "--width 64
               --batch-size 512 --steps 20") into $OUT/bench.json when 60 s are left (default); 0: none
    DEADLINE   seconds from the start after which nothing new starts and a running `dvc repro` is stopped (480)
    WHEELS     the wheels folder (.whl)      SITE  where they are installed (/tmp/site)
    WORK       folder for the stand-in and the clean checkout (a new temporary folder)
Without wheels in $WHEELS, it uses this interpreter's own dvc, mlflow and albumentations (as `make test` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onecycle.config import parse_params
from onecycle.errors import UserError
from scripts.experiments import git_commit, parse_override, read_params, tool_main
from scripts.measure import H200_DATASHEET_TFLOPS, flop_rate
from scripts.pipeline_repo import ROOT, pipeline_repo, shim_env, timed_repro

CARRY = ROOT / ".carry"
# the env variables that size a run, as they go into the recorded command
TUNABLES = ("WIDTH", "EPOCHS", "BATCH", "SET", "ARCHIVE", "PROXY_OPTS", "REPEAT", "DEADLINE", "BENCH", "BENCH_ARGS")


class Run:
    """One `run`: the log, the deadline and the record written to $OUT/h200-pipeline.json."""

    def __init__(self, out: Path, work: Path) -> None:
        self.out, self.work = out, work
        self.start = time.time()
        self.deadline = self.start + float(os.environ.get("DEADLINE", "480"))
        self.log = open(out / "pipeline.log", "w")  # noqa: SIM115 (open for the whole run)
        self.record: dict = {}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def save(self, **values) -> None:
        self.record |= values
        # renamed into place: a run killed mid-write keeps the last whole record, which device/session.sh reads
        path = self.out / "h200-pipeline.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(tmp, path)

    def call(self, args: list[str], *, cwd: Path = ROOT, env=None, timeout: float | None = None) -> tuple[int, str]:
        """Run a command, its output into the log (and printed); (exit status, output). A timeout stops its
        whole process group (`dvc` and the stage it runs) and returns status None."""
        self.say(f"$ {shlex.join(args)}")
        with tempfile.TemporaryFile("w+") as captured:
            process = subprocess.Popen(
                args, cwd=cwd, env=env, stdout=captured, stderr=subprocess.STDOUT, start_new_session=True, text=True
            )
            try:
                status = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = None
            captured.seek(0)
            output = captured.read()
        self.log.write(output)
        self.log.flush()
        print(output[-4000:], end="", flush=True)  # the tail; the log has all of it
        return status, output


def install(run: Run, wheels: Path, site: Path) -> list[str]:
    """Install the carried wheels (or use this interpreter's packages): the PYTHONPATH entries to add."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        probe = [sys.executable, "-c", "import dvc, mlflow, albumentations"]
        if subprocess.run(probe, capture_output=True).returncode:
            raise UserError(f"no wheels in {wheels} and {sys.executable} lacks dvc, mlflow or albumentations: "
                            "run `python3 -m device.prepare` here and carry .whl")  # fmt: skip
        run.save(packages=f"{sys.executable}'s own")
        return []
    start = time.time()
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--no-cache-dir", "--upgrade", "--target", str(site)]
    status, _ = run.call(pip + [str(w) for w in found])
    if status:
        raise UserError("the wheels did not install (see pipeline.log)")
    # the carried packages' requirements that the machine's own packages do not meet, for the record
    check = [sys.executable, "-m", "device.unmet_requirements", str(site)]
    unmet = subprocess.run(check, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(site)}, capture_output=True, text=True)
    problems = unmet.stdout.split("\n") if unmet.returncode == 0 else [unmet.stderr.strip()[-500:]]
    run.save(packages=f"{len(found)} wheels into {site}", install_seconds=time.time() - start,
             unmet_requirements=[p for p in problems if p])  # fmt: skip
    return [str(site)]


def archive_and_md5(run: Run) -> tuple[Path, str]:
    if os.environ.get("ARCHIVE"):
        archive = Path(os.environ["ARCHIVE"]).resolve()
        return archive, hashlib.md5(archive.read_bytes()).hexdigest()
    archive = run.work / "cifar-10-binary.tar.gz"
    generator = [sys.executable, str(CARRY / "make_cifar10_proxy.py"), str(archive)]
    start = time.time()
    status, output = run.call(generator + shlex.split(os.environ.get("PROXY_OPTS", "")))
    run.save(standin_seconds=time.time() - start)
    md5 = [line.split()[1] for line in output.splitlines() if line.startswith("md5 ")]
    if status or not md5:
        raise UserError(f"no archive at {archive} (see pipeline.log)")
    return archive, md5[-1]


def settings() -> dict:
    """The params the run changes, from WIDTH, EPOCHS, BATCH and SET, checked as params.yaml is checked."""
    texts = [f"model.width={os.environ.get('WIDTH', '64')}", f"train.epochs={os.environ.get('EPOCHS', '24')}"]
    texts += [f"train.batch_size={os.environ.get('BATCH', '512')}", *shlex.split(os.environ.get("SET", ""))]
    return dict(parse_override(text) for text in texts)


def checkout(run: Run, archive: Path, md5: str, changes: dict) -> Path:
    """The pipeline in a fresh repository, params.yaml pointed at the archive and sized by `changes`."""
    repo = pipeline_repo(run.work / "repo", changes | {"data.url": str(archive), "data.md5": md5})
    parse_params(read_params(repo / "params.yaml"))  # a wrong SET key stops here, naming it, before any stage runs
    run.save(params=changes, archive={"path": str(archive), "md5": md5}, git_in_checkout=(repo / ".git").exists())
    return repo


def repro(run: Run, repo: Path, env: dict, args: list[str], times: Path) -> dict:
    """One `dvc repro ARGS` in `repo`, stopped at the deadline, with its reports/metrics.json figures."""

    def call(command: list[str]) -> int | None:
        timeout = max(1.0, run.deadline - time.time())
        return run.call([sys.executable, "-m", *command], cwd=repo, env=env, timeout=timeout)[0]

    result = timed_repro(args, times, call)
    if result["exit_status"] is None:
        result["stopped"] = "at DEADLINE"
    metrics_file = repo / "reports" / "metrics.json"
    if result["exit_status"] == 0 and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        result |= {"fit_seconds": metrics["train_seconds"], "test_acc": metrics["test_acc"]}
        result |= {"best_test_acc": metrics["best_test_acc"], "lr_min": metrics["lr_min"], "lr_max": metrics["lr_max"]}
    return result


def mlflow_counts(db: Path) -> dict:
    """What the stages logged to the SQLite store: runs, metric values, params, artifacts' runs."""
    if not db.exists():
        return {"store": None}
    with sqlite3.connect(db) as connection:
        tables = ("runs", "metrics", "params")
        count = {t: connection.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
        names = [row[0] for row in connection.execute("select name from experiments order by experiment_id")]
    return {"store": str(db), "experiments": names} | count


@tool_main
def main() -> int:
    if not os.environ.get("OUT"):
        raise UserError("set OUT to the folder for the results (the device sets it)")
    changes = settings()  # a SET that is not KEY=VALUE stops here, before any work
    out = Path(os.environ["OUT"])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("WORK") or tempfile.mkdtemp(prefix="device_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(out, work)
    command = [f"{k}={shlex.quote(os.environ[k])}" for k in TUNABLES if os.environ.get(k)]
    run.save(command=" ".join([*command, "python3 -m device.pipeline"]), **commit_of_tree())

    wheels = (ROOT / os.environ.get("WHEELS", ".whl")).resolve()
    path = install(run, wheels, Path(os.environ.get("SITE", "/tmp/site")))
    archive, md5 = archive_and_md5(run)
    repo = checkout(run, archive, md5, changes)

    times = work / "stage_times.txt"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow: repo/mlflow.db
    # the carried packages' scripts (`dvc`, for make bench's tiny repro), and before them the shim's `python`
    env |= {"PATH": os.pathsep.join([*(f"{p}/bin" for p in path), os.environ["PATH"]])}
    env = shim_env(work / "shim", times, env)
    env |= {"PYTHONPATH": os.pathsep.join([*path, str(repo / "src")]), "PYTHONUNBUFFERED": "1"}
    env |= {"NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}

    runs = [repro(run, repo, env, [], times)]
    run.save(runs=runs, **headline(runs[0]))
    warm_fits = runs[0]["seconds"] * 1.2 < run.deadline - time.time()
    if os.environ.get("REPEAT", "1") != "0" and runs[0]["exit_status"] == 0 and warm_fits:
        runs.append(repro(run, repo, env, ["-f"], times))
        run.save(runs=runs)
    run.save(mlflow=mlflow_counts(repo / "mlflow.db"))

    # the probe and make bench run from ROOT (python -m: its tools), with the same library from the checkout
    probe = [sys.executable, "-m", "device.probe"]
    status, output = run.call(probe, env=env, timeout=max(10.0, run.deadline - time.time()))
    meta_file = repo / "data" / "cifar10" / "meta.json"
    if status == 0 and meta_file.exists():
        figures = json.loads(output.strip().splitlines()[-1])
        run.save(device=figures["device"], torch=figures["torch"], python=figures["python"])
        images = json.loads(meta_file.read_text())["train_images"]
        peaks = {"measured_matmul": figures["matmul_bf16_tflops"], "datasheet": H200_DATASHEET_TFLOPS}
        for result in runs:
            if "fit_seconds" in result:  # training images x epochs over the whole fit, evaluation included
                trained = images * changes["train.epochs"]
                result |= flop_rate(trained, result["fit_seconds"], changes["model.width"], peaks)
        run.save(peak_tflops=peaks, train_images=images, runs=runs, **headline(runs[0]))
    if os.environ.get("BENCH", "1") != "0":  # `make bench`'s GPU path (and its tiny `dvc repro`), if it fits
        bench_out = out / "bench.json"
        args = shlex.split(os.environ.get("BENCH_ARGS", "--width 64 --batch-size 512 --steps 20"))
        bench_env = env | {"PEAK_TFLOPS": str(H200_DATASHEET_TFLOPS)}
        if run.deadline - time.time() > 60:
            bench = [sys.executable, "-m", "scripts.bench", "--out", str(bench_out), *args]
            bench_status = run.call(bench, env=bench_env, timeout=run.deadline - time.time())[0]
            run.save(bench={"file": bench_out.name, "exit_status": bench_status})
        else:
            run.save(bench={"skipped": "less than 60 s left before DEADLINE"})
    run.save(total_seconds=time.time() - run.start)
    failed = [r["command"] for r in runs if r["exit_status"] != 0]
    run.say(json.dumps({k: v for k, v in run.record.items() if k != "runs"}, indent=2))
    if failed or status:
        print(f"error: {', '.join(failed) or 'the device probe'} failed (see pipeline.log)", file=sys.stderr)
        return 1
    return 0


def headline(first: dict) -> dict:
    """The contract's keys, from the first `dvc repro` (cold: a clean checkout, nothing compiled yet)."""
    keys = ("stage_seconds", "after_download_seconds", "fit_seconds", "test_acc")
    out = {k: first[k] for k in keys if k in first} | {"repro_seconds": first["seconds"]}
    if "flop_utilisation" in first:
        share = first["flop_utilisation"]
        out |= {"mfu": share["measured_matmul"], "mfu_datasheet": share["datasheet"]}
    return out


def commit_of_tree() -> dict:
    """The commit of the working tree: git's, else the one device.prepare recorded (the device may get no .git)."""
    found = git_commit(ROOT)
    recorded = CARRY / "commit.json"
    if found["commit"] == "unknown" and recorded.exists():
        return json.loads(recorded.read_text()) | {"commit_recorded_by": "prepare"}
    return found


if __name__ == "__main__":
    main()

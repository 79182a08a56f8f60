"""The real pipeline on a lent GPU machine in one call: `dvc repro` from a clean checkout, each stage timed.

    python3 scripts/device_pipeline.py prepare   # here, once: .whl/ (scripts/device-wheels.txt) and .carry/
    python3 scripts/device_pipeline.py run       # there, carrying .whl and .carry: $OUT/h200-pipeline.json

The lent H200 machines have torch, numpy, pandas, matplotlib, pyyaml and opencv but neither DVC, MLflow nor
albumentations, and no internet. `prepare` downloads the wheels they lack for the device's Python 3.12 on
x86-64 (the pinned list in scripts/device-wheels.txt; antlr4-python3-runtime has no wheel on PyPI and is built
here), copies the stand-in's source (18 MB) into .carry/, records the commit, and checks that the wheels,
.carry/ and the working tree fit the 64 MiB a call carries.

`run` installs the wheels into $SITE (pip --no-index --no-deps --target), builds the stand-in archive (170 MB:
too big to carry), copies the working tree into a fresh repository, points data.url and data.md5 at the archive
in its params.yaml and runs `dvc repro` there: the four stages of dvc.yaml, each a fresh `python` process,
logging to MLflow in the SQLite file mlflow.db at that repository's root. A `python` shim first on PATH runs
the stages with this interpreter and writes each stage process's start and end, so the record has the wall
time of each stage, of the whole `dvc repro` timed from outside, and of the part after the download stage.
Then, if it fits before $DEADLINE, a second `dvc repro -f` (bytecode compiled, page cache warm); a bf16
matrix product measures the peak that model FLOP utilisation is given against; and `make bench`'s GPU path
runs into $OUT/bench.json. $OUT/h200-pipeline.json is written after each step, so a run cut short keeps what
it measured; $OUT/pipeline.log holds every log (the stages' own output included).

Environment (the defaults are the real run; small values try `run` on a CPU first):
    OUT        results folder (the device sets it)
    WIDTH      model.width (64)        EPOCHS  train.epochs (24)        BATCH  train.batch_size (512)
    SET        more params, space-separated KEY=VALUE with YAML values, e.g. "lr_finder.num_iter=8 train.peak_epoch=1"
    ARCHIVE    an existing CIFAR-10 binary archive to use; else the stand-in is built from .carry/
    PROXY_OPTS options of the stand-in's generator, e.g. "--train 2000 --test 500" (none: all 60,000 images)
    REPEAT     1: the second, warm `dvc repro -f` when it fits (default); 0: none
    BENCH      1: then `make bench` (scripts/bench.py $BENCH_ARGS, default the GPU sizes "--width 64
               --batch-size 512 --steps 20") into $OUT/bench.json when 60 s are left (default); 0: none
    DEADLINE   seconds from the start after which nothing new starts and a running `dvc repro` is stopped (480)
    WHEELS     the wheels folder (.whl)      SITE  where they are installed (/tmp/site)
    WORK       folder for the stand-in and the clean checkout (a new temporary folder)
    WHEEL_PYTHON  prepare: the Python version the wheels are for (3.12, the device's)
    SHARED     prepare: the workplace's shared folder holding data/make_cifar10_proxy.py (../shared)
Without wheels in $WHEELS, `run` uses this interpreter's own dvc, mlflow and albumentations (as `make test` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WHEEL_LIST = ROOT / "scripts" / "device-wheels.txt"
CARRY = ROOT / ".carry"
CARRY_LIMIT = 64 * 2**20  # bytes: what one device call may carry (working tree + carried paths)
DATASHEET_TFLOPS = 989.0  # H200 dense bf16
# not copied into the clean checkout: at the root, carried paths and what a run writes; anywhere, caches
SKIP_AT_ROOT = {".git", ".whl", ".carry", ".gl", ".venv", "data", "models", "mlflow.db", "mlruns", "mlartifacts"}
SKIP_AT_ROOT |= {".checkpoints", "dvc.lock"}
SKIP_ANYWHERE = {"__pycache__", ".pytest_cache", ".ruff_cache"}
# the env variables that size a run, as they go into the recorded command
TUNABLES = ("WIDTH", "EPOCHS", "BATCH", "SET", "ARCHIVE", "PROXY_OPTS", "REPEAT", "DEADLINE", "BENCH", "BENCH_ARGS")
SHIM = """#!/bin/sh
# dvc.yaml's `python`: this interpreter, and each stage process's start and end (epoch seconds) in {log}
start=$(date +%s.%N)
{python} "$@"
status=$?
echo "$start $(date +%s.%N) $status $1" >> {log}
exit $status
"""
REQUIREMENTS_CHECK = """
import importlib.metadata as md, sys
from packaging.requirements import Requirement
unmet = []
for dist in md.distributions(path=[sys.argv[1]]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{dist.metadata['Name']} needs {req}: missing")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{dist.metadata['Name']} needs {req}: {version} is there")
print("\\n".join(sorted(set(unmet))))
"""
PROBE = """
import json, platform, time, torch
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
n = 8192 if cuda else 512  # a bf16 matrix product: the measured peak, mean of 10 products after 3 warm-ups
sync = torch.cuda.synchronize if cuda else (lambda: None)
a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
for i in range(13):
    if i == 3:
        sync()
        start = time.perf_counter()
    a @ b
sync()
print(json.dumps({
    "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})",
    "torch": torch.__version__, "python": platform.python_version(),
    "matmul_bf16_tflops": 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12,
}))
"""


def pins() -> list[tuple[str, bool]]:
    """(name==version, built here from its sdist) for each line of scripts/device-wheels.txt."""
    out = []
    for line in WHEEL_LIST.read_text().splitlines():
        pin, _, comment = line.partition("#")
        if pin.strip():
            out.append((pin.strip(), comment.strip() == "sdist"))
    return out


def tree_files() -> list[Path]:
    """The files a device call carries besides the named paths: tracked and untracked-not-ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prepare(wheels: Path) -> None:
    python_version = os.environ.get("WHEEL_PYTHON", "3.12")
    shared = Path(os.environ.get("SHARED", ROOT.parent / "shared"))
    shutil.rmtree(wheels, ignore_errors=True)  # no stale wheel: two versions of one package stop the install
    wheels.mkdir(parents=True)
    CARRY.mkdir(exist_ok=True)  # other device checks' files there stay (counted in the total below)
    for name in ("make_cifar10_proxy.py", "cifar10-jpeg-proxy.npz"):
        shutil.copy(shared / "data" / name, CARRY / name)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    record = {"commit": commit.stdout.strip(), "uncommitted_changes": bool(changed.stdout.strip())}
    (CARRY / "commit.json").write_text(json.dumps(record) + "\n")

    binary = [pin for pin, sdist in pins() if not sdist]
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    platforms += ["manylinux1_x86_64", "manylinux_2_26_x86_64"]
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    download += ["--python-version", python_version, "--implementation", "cp", "-d", str(wheels)]
    download += [arg for p in platforms for arg in ("--platform", p)]
    subprocess.run(download + binary, check=True)
    for pin in (pin for pin, sdist in pins() if sdist):  # pure Python, so one build serves any Python 3
        build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), pin]
        subprocess.run(build, check=True)

    sizes = {"wheels": folder_bytes(wheels), ".carry": folder_bytes(CARRY)}
    sizes["tree"] = sum(f.stat().st_size for f in tree_files())
    total = sum(sizes.values())
    count = len(list(wheels.glob("*.whl")))
    print(f"{count} wheels for Python {python_version} in {wheels}; the call carries:")
    for name, size in sizes.items():
        print(f"  {name:7} {size / 2**20:6.1f} MiB")
    print(f"  total   {total / 2**20:6.1f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a call may carry")
    if total > CARRY_LIMIT:
        sys.exit(f"error: {total / 2**20:.1f} MiB is more than a device call carries")


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
        # renamed into place: a run killed mid-write keeps the last whole record, which device_session.sh reads
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
            sys.exit(f"error: no wheels in {wheels} and {sys.executable} lacks dvc, mlflow or albumentations: "
                     "run `python3 scripts/device_pipeline.py prepare` here and carry .whl")  # fmt: skip
        run.save(packages=f"{sys.executable}'s own")
        return []
    start = time.time()
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--no-cache-dir", "--upgrade", "--target", str(site)]
    status, _ = run.call(pip + [str(w) for w in found])
    if status:
        sys.exit("error: the wheels did not install (see pipeline.log)")
    # needs the carried packages' requirements that the machine's own packages do not meet, for the record
    check = [sys.executable, "-c", REQUIREMENTS_CHECK, str(site)]
    unmet = subprocess.run(check, env=os.environ | {"PYTHONPATH": str(site)}, capture_output=True, text=True)
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
        sys.exit(f"error: no archive at {archive} (see pipeline.log)")
    return archive, md5[-1]


def checkout(run: Run, archive: Path, md5: str) -> Path:
    """The working tree's files in a fresh repository (git init when git is there, else DVC without SCM),
    with params.yaml pointed at the archive and sized by WIDTH, EPOCHS, BATCH and SET."""
    repo = run.work / "repo"

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = SKIP_ANYWHERE | (SKIP_AT_ROOT if Path(folder) == ROOT else set())
        skip |= {"cache", "tmp"} if Path(folder) == ROOT / ".dvc" else set()  # DVC's cache and state
        return skip & set(names)

    shutil.copytree(ROOT, repo, ignore=ignore, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(url=str(archive), md5=md5)
    settings = {"model.width": os.environ.get("WIDTH", "64"), "train.epochs": os.environ.get("EPOCHS", "24")}
    settings["train.batch_size"] = os.environ.get("BATCH", "512")
    for item in shlex.split(os.environ.get("SET", "")):
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"error: SET item {item!r} is not KEY=VALUE")
        settings[key] = value
    for key, value in settings.items():
        section, _, name = key.partition(".")
        if section not in params or not name:
            sys.exit(f"error: SET key {key!r} is not SECTION.NAME of params.yaml")
        params[section][name] = yaml.safe_load(value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    else:
        (repo / ".dvc" / "config").write_text("[core]\n    analytics = false\n    no_scm = true\n")
    run.save(params={k: yaml.safe_load(v) for k, v in settings.items()}, archive={"path": str(archive), "md5": md5},
             git_in_checkout=bool(shutil.which("git")))  # fmt: skip
    return repo


def stage_shim(folder: Path, times: Path) -> Path:
    """A folder holding a `python` that runs this interpreter and appends each process's start, end (epoch
    seconds), exit status and script to `times`: first on PATH, it times each stage inside `dvc repro`."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python"
    shim.write_text(SHIM.format(python=shlex.quote(sys.executable), log=shlex.quote(str(times))))
    shim.chmod(0o755)
    return folder


def timed_repro(args: list[str], times: Path, call) -> dict:
    """`call(["dvc", "repro", *args])` (it returns the exit status) timed from outside: the whole run, each
    stage's process (from the shim's `times`), DVC's own share and the part after the download stage."""
    times.write_text("")
    start = time.time()
    status = call(["dvc", "repro", *args])
    end = time.time()
    result: dict = {"command": shlex.join(["dvc", "repro", *args]), "exit_status": status, "seconds": end - start}
    stages, download_end = {}, None
    for line in times.read_text().splitlines():
        began, ended, code, script = line.split(maxsplit=3)
        name = Path(script).stem  # stages/NAME.py: the stage's name in dvc.yaml
        stages[name] = float(ended) - float(began)
        if code != "0":
            result.setdefault("failed_stages", []).append(name)
        if name == "download_cifar":
            download_end = float(ended)
    result["stage_seconds"] = stages
    result["dvc_seconds"] = result["seconds"] - sum(stages.values())  # DVC's own start-up, hashing and caching
    if download_end is not None:  # from the end of the download stage's process to the end of `dvc repro`
        result["after_download_seconds"] = end - download_end
    return result


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


def run_pipeline(wheels: Path) -> None:
    out = Path(os.environ.get("OUT") or sys.exit("error: set OUT to the folder for the results (the device sets it)"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("WORK") or tempfile.mkdtemp(prefix="device_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(out, work)
    command = [f"{k}={shlex.quote(os.environ[k])}" for k in TUNABLES if os.environ.get(k)]
    run.save(command=" ".join([*command, "python3 scripts/device_pipeline.py run"]), **commit_of_tree())

    path = install(run, wheels, Path(os.environ.get("SITE", "/tmp/site")))
    archive, md5 = archive_and_md5(run)
    repo = checkout(run, archive, md5)

    times = work / "stage_times.txt"
    shim = stage_shim(work / "shim", times)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow: repo/mlflow.db
    # the shim's `python` first; then the carried packages' scripts (`dvc`, for make bench's tiny repro)
    env |= {"PATH": os.pathsep.join([str(shim), *(f"{p}/bin" for p in path), os.environ["PATH"]])}
    env |= {"PYTHONUNBUFFERED": "1"}
    env |= {"PYTHONPATH": os.pathsep.join([*path, str(repo / "src")]), "NO_ALBUMENTATIONS_UPDATE": "1"}
    env |= {"DVC_NO_ANALYTICS": "1"}

    runs = [repro(run, repo, env, [], times)]
    run.save(runs=runs, **headline(runs[0]))
    warm_fits = runs[0]["seconds"] * 1.2 < run.deadline - time.time()
    if os.environ.get("REPEAT", "1") != "0" and runs[0]["exit_status"] == 0 and warm_fits:
        runs.append(repro(run, repo, env, ["-f"], times))
        run.save(runs=runs)
    run.save(mlflow=mlflow_counts(repo / "mlflow.db"))

    status, output = run.call([sys.executable, "-c", PROBE], env=env, timeout=max(10.0, run.deadline - time.time()))
    meta_file = repo / "data" / "cifar10" / "meta.json"
    if status == 0 and meta_file.exists():
        probe = json.loads(output.strip().splitlines()[-1])
        run.save(device=probe["device"], torch=probe["torch"], python=probe["python"])
        meta = json.loads(meta_file.read_text())
        width = run.record["params"]["model.width"]
        sys.path.insert(0, str(ROOT / "src"))
        from onecycle.model import training_flop  # here: the other steps need neither torch nor the project

        peaks = {"measured_matmul": probe["matmul_bf16_tflops"], "datasheet": DATASHEET_TFLOPS}
        for result in runs:
            if "fit_seconds" in result:  # training images x epochs, forward + backward, over the whole fit
                flop = meta["train_images"] * run.record["params"]["train.epochs"] * training_flop(width)
                result["achieved_tflops"] = flop / result["fit_seconds"] / 1e12
                result["mfu"] = {name: result["achieved_tflops"] / peak for name, peak in peaks.items()}
        run.save(peak_tflops=peaks, train_images=meta["train_images"], runs=runs, **headline(runs[0]))
    if os.environ.get("BENCH", "1") != "0":  # `make bench`'s GPU path (and its tiny `dvc repro`), if it fits
        bench_out = out / "bench.json"
        args = shlex.split(os.environ.get("BENCH_ARGS", "--width 64 --batch-size 512 --steps 20"))
        bench_env = env | {"PEAK_TFLOPS": str(DATASHEET_TFLOPS)}
        if run.deadline - time.time() > 60:
            timeout = run.deadline - time.time()
            bench_status = run.call([sys.executable, "scripts/bench.py", "--out", str(bench_out), *args],
                                    env=bench_env, timeout=timeout)[0]  # fmt: skip
            run.save(bench={"file": bench_out.name, "exit_status": bench_status})
        else:
            run.save(bench={"skipped": "less than 60 s left before DEADLINE"})
    run.save(total_seconds=time.time() - run.start)
    failed = [r["command"] for r in runs if r["exit_status"] != 0]
    run.say(json.dumps({k: v for k, v in run.record.items() if k != "runs"}, indent=2))
    if failed or status:
        sys.exit(f"error: {', '.join(failed) or 'the device probe'} failed (see pipeline.log)")


def headline(first: dict) -> dict:
    """The contract's keys, from the first `dvc repro` (cold: a clean checkout, nothing compiled yet)."""
    keys = ("stage_seconds", "after_download_seconds", "fit_seconds", "test_acc")
    out = {k: first[k] for k in keys if k in first} | {"repro_seconds": first["seconds"]}
    if "mfu" in first:
        out |= {"mfu": first["mfu"]["measured_matmul"], "mfu_datasheet": first["mfu"]["datasheet"]}
    return out


def commit_of_tree() -> dict:
    """The commit of the working tree: git's, else the one `prepare` recorded (the device may get no .git)."""
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        changed = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode == 0:
            return {"commit": head.stdout.strip(), "uncommitted_changes": bool(changed.stdout.strip())}
    recorded = CARRY / "commit.json"
    if recorded.exists():
        return json.loads(recorded.read_text()) | {"commit_recorded_by": "prepare"}
    return {"commit": "unknown"}


def main() -> None:
    step = sys.argv[1] if len(sys.argv) == 2 else ""
    wheels = (ROOT / os.environ.get("WHEELS", ".whl")).resolve()
    if step == "prepare":
        prepare(wheels)
    elif step == "run":
        run_pipeline(wheels)
    else:
        sys.exit("usage: python3 scripts/device_pipeline.py prepare|run")


if __name__ == "__main__":
    main()

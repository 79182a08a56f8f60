"""The research tools' one harness: the data cache, one job's work through the stages' own library calls, and the
child processes that run jobs, each job's result in a file of its own.

    python -m research.jobs PAYLOAD.json      # one job, in this fresh process (what Pool starts)

research/study.py (settings trained as the stages train them) and research/lr_bench.py (the LR finder's benchmark)
are short layers over it. A job is a payload, a JSON object:

    work       "sweep": the range test (lr_finder.find_range, as lr_range_test runs it), its curve recorded;
               "train": build_model and training.fit (as train_one_cycle), from lr_max, or without lr_max from
               the range its own range test finds first
    params     the params mapping (config.parse_params reads it in the child)
    data       the folder data_folder made (data.prepare, as download_cifar writes it)
    result     the file the result goes to: the record below, or {"error": ...}
    record     what the caller wants kept beside the result (the job's name, setting, commit, ...)
    around     "sweep" only: a finished sweep's result; this sweep is the fine sweep around its lowest loss
               (lr_finder.fine_params), not the user's
    lr_max, test_every_epoch (false: the final test alone), peaks (model FLOP rate against these TFLOP/s)
    spawned_at the caller's time.time() at spawning: the child's imports are timed from it

A diverged training (training.Diverged) is a finding, not an error: test_acc 10 (chance) and `diverged`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from onecycle import data, distributed, lr_finder, outputs, training
from onecycle.config import LRFinderParams, Params, parse_params
from onecycle.errors import UserError
from onecycle.model import build_model
from scripts.measure import device_name, flop_rate, sync

ROOT = Path(__file__).resolve().parents[1]


def data_folder(params: Params, cache: Path) -> tuple[Path, float]:
    """The folder data.prepare wrote for this data section (made now if missing) and the seconds it took."""
    section = json.dumps(dataclasses.asdict(params.data), sort_keys=True)
    folder = cache / hashlib.sha256(section.encode()).hexdigest()[:16]
    start = time.perf_counter()
    if not (folder / "meta.json").exists():  # data.prepare writes the folder whole or not at all
        data.prepare(params.data, folder, progress=False)
    return folder, time.perf_counter() - start


def fine_design(finder: LRFinderParams, around: dict) -> LRFinderParams:
    """The fine sweep's design (lr_finder.fine_params) around the lowest loss of `around`, a finished sweep's result:
    what lr_finder.fine_sweep runs after that sweep. A fine sweep's result holds its own design; a user's sweep's
    is `finder`'s (the smoothing that reads its lowest loss)."""
    swept = LRFinderParams(**around["lr_finder"]) if "lr_finder" in around else finder
    lr, loss, accuracy = (around["curve"][k] for k in ("lr", "loss", "accuracy"))
    smoothed = [lr_finder.smooth(values, swept.smooth_beta) for values in (loss, accuracy)]
    curve = lr_finder.Curve(lr, loss, smoothed[0], accuracy, smoothed[1], around["stop_reason"], around["images_seen"])
    return lr_finder.fine_params(finder, lr_finder.fine_anchor(curve, swept))


def sweep(params: Params, dataset: data.Dataset, device: torch.device, around: dict | None = None) -> dict:
    """The range test (or, `around` a sweep, the fine sweep): its curve, what the params' pick found on it, and
    the design it ran with."""
    if around is not None:
        params = dataclasses.replace(params, lr_finder=fine_design(params.lr_finder, around))
    start = time.perf_counter()
    curve, found = lr_finder.find_range(params, dataset, device, progress=False)
    sync(device)
    return {
        "curve": {"lr": curve.lr, "loss": curve.loss, "accuracy": curve.accuracy},
        "stop_reason": curve.stop_reason,
        "images_seen": curve.images_seen,
        "found": found.as_dict(curve, len(dataset.train.labels)),
        "lr_finder": dataclasses.asdict(params.lr_finder),
        "seconds": time.perf_counter() - start,
    }


def train(
    params: Params,
    lr_max: float | None,
    dataset: data.Dataset,
    device: torch.device,
    *,
    test_every_epoch: bool = True,
    peaks: dict[str, float] | None = None,
) -> dict:
    """One training as the stages make it: the range test unless lr_max is given (recorded as `range_test`), then
    the model and training.fit from LRMIN = LRMAX / lr_finder.min_div."""
    result: dict[str, Any] = {"lr_found": lr_max is None}
    if lr_max is None:
        result["range_test"] = sweep(params, dataset, device)
        lr_max = result["range_test"]["found"]["lr_max"]
    lr_min = lr_max / params.lr_finder.min_div
    result |= {"lr_min": lr_min, "lr_max": lr_max}
    torch.manual_seed(params.train.seed)
    model = build_model(params.model)
    sync(device)
    start = time.perf_counter()
    try:
        history = training.fit(
            model, dataset, params, lr_min, lr_max, device, progress=False, test_every_epoch=test_every_epoch
        )
    except training.Diverged as exc:  # too high an LR: a finding, scored as chance
        return result | {"test_acc": 10.0, "test_loss": None, "diverged": str(exc)}
    sync(device)
    seconds = time.perf_counter() - start
    last = history[-1]
    result |= {
        "test_acc": last.test_acc,  # percent, after the last epoch, on every test image of `dataset`
        "test_loss": last.test_loss,
        "test_images": len(dataset.test.labels),
        "train_acc": last.train_acc,  # augmented, over the last epoch, as trained
        "fit_seconds": seconds,  # training.fit: training, evaluation and warm-ups
        "first_epoch_seconds": history[0].seconds,
        "median_epoch_seconds": sorted(r.seconds for r in history)[len(history) // 2],
    }
    if test_every_epoch:
        best = max(history, key=lambda r: r.test_acc)
        result |= {"best_test_acc": best.test_acc, "best_epoch": best.epoch}
        result["history"] = [dataclasses.asdict(r) for r in history]
    if peaks:  # training images x epochs over the whole fit, evaluation included
        result |= flop_rate(len(dataset.train.labels) * params.train.epochs, seconds, params.model.width, peaks)
    return result


def work(payload: dict, dataset: data.Dataset | None = None) -> dict:
    """The payload's job in this process (its data loaded here unless given): its result, device included."""
    params = parse_params(payload["params"])
    device = distributed.resolve_device(params.train.device)
    dataset = dataset or data.load(Path(payload["data"]))
    if payload["work"] == "sweep":
        result = sweep(params, dataset, device, payload.get("around"))
    else:
        options = {"test_every_epoch": payload.get("test_every_epoch", True), "peaks": payload.get("peaks")}
        result = train(params, payload.get("lr_max"), dataset, device, **options)
    return result | {"device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__}


def child(path: Path) -> int:
    """One job in this fresh process: its record and result, or its error, to the file its payload names, with
    its set-up timed apart (interpreter start and imports, CUDA context, data load)."""
    payload = json.loads(path.read_text())
    imported = time.time() - payload.get("spawned_at", time.time())  # on the caller's clock
    try:
        params = parse_params(payload["params"])
        device = distributed.resolve_device(params.train.device)
        start = time.perf_counter()
        if device.type == "cuda":
            torch.zeros(1, device=device)  # the CUDA context, timed apart from the first epoch
            sync(device)
        context = time.perf_counter() - start
        start = time.perf_counter()
        dataset = data.load(Path(payload["data"]))
        setup = {"imports_seconds": imported, "cuda_context_seconds": context}
        setup["data_load_seconds"] = time.perf_counter() - start
        setup["setup_seconds"] = time.time() - payload.get("spawned_at", time.time())  # start to the first step
        result = work(payload, dataset) | {"setup": setup}
    except Exception as exc:
        text = str(exc) if isinstance(exc, UserError) else traceback.format_exc()[-3000:]
        outputs.write_json(Path(payload["result"]), payload.get("record", {}) | {"error": text})
        return 1
    outputs.write_json(Path(payload["result"]), payload.get("record", {}) | result)
    return 0


@dataclasses.dataclass
class Running:
    process: subprocess.Popen
    result: Path
    started: float
    deadline: float  # time.perf_counter() past which the job is stopped


class Pool:
    """Jobs in child processes (`python -m research.jobs PAYLOAD`), up to `workers` at once, each writing its result
    file. Beside it, `<name>.running` holds the child's pid while it runs and `<name>.failed` its exit status after
    a failure (delete it to retry), so that a killed scheduler's rerun resumes: a job with a result is done, a
    failed one waits for a look at its log, and one whose child still runs is left to finish."""

    def __init__(self, workers: int, logs: Path):
        self.workers, self.logs = workers, logs
        self.running: dict[str, Running] = {}

    def pending(self, result: Path) -> bool:
        """Whether the job writing `result` is still to start here."""
        if result.exists() or str(result) in self.running or result.with_suffix(".failed").exists():
            return False
        try:
            os.kill(int(result.with_suffix(".running").read_text()), 0)
        except (OSError, ValueError):
            return True
        return False  # a child that a killed scheduler left running

    def full(self) -> bool:
        return len(self.running) >= self.workers

    def start(self, payload: dict, env: dict[str, str] | None = None, timeout: float = float("inf")) -> None:
        result = Path(payload["result"])
        result.parent.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        stem = f"{result.parent.name}-{result.stem}"
        path = self.logs / f"{stem}.payload.json"
        path.write_text(json.dumps(payload | {"spawned_at": time.time()}))
        log = (self.logs / f"{stem}.log").open("w")
        command = [sys.executable, "-m", "research.jobs", str(path)]
        process = subprocess.Popen(command, cwd=ROOT, env=os.environ | (env or {}), stdout=log, stderr=log)
        result.with_suffix(".running").write_text(str(process.pid))
        now = time.perf_counter()
        self.running[str(result)] = Running(process, result, now, now + timeout)

    def finished(self) -> list[tuple[Path, int, float]]:
        """The jobs that ended since the last call, after a second's wait: (result file, exit status, seconds). A
        job past its timeout is stopped (status -9) and leaves no result."""
        time.sleep(1)
        ended = []
        for key, job in list(self.running.items()):
            if job.process.poll() is None:
                if time.perf_counter() <= job.deadline:
                    continue
                job.process.kill()
                job.process.wait()
            del self.running[key]
            job.result.with_suffix(".running").unlink(missing_ok=True)
            ended.append((job.result, job.process.returncode, time.perf_counter() - job.started))
        return ended

    def log(self, result: Path) -> Path:
        return self.logs / f"{result.parent.name}-{result.stem}.log"


if __name__ == "__main__":
    sys.exit(child(Path(sys.argv[1])))

"""One stage process, its time split into the phases of `make bench`'s breakdown of `make quick`.

    python scripts/stage_profile.py OUT.json stages/train_one_cycle.py --data ... (the stage's own arguments)

scripts/python_shim.sh runs a stage through this file when SHIM_PROFILE names it (a file, not a module: the
stage's `onecycle` stays the one its repository puts first on the path). It runs the script as `python script`
would and writes OUT.json: the process's seconds from its start (read from /proc/self/stat), the interpreter's
start-up before this file ran, and each phase's own seconds. A phase is the time inside the library functions
of PHASES, less the time inside other phases they call; every import statement is the phase "imports" (also
inside another phase: `log_model`'s lazy import of mlflow.pytorch counts as imports). The functions are wrapped
as their module is first imported, so a stage imports nothing it would not import anyway.
"""

from __future__ import annotations

import builtins
import functools
import json
import os
import sys
import time

TRACKING_LOGGING = ("start_run", "run_of_model", "log_metrics", "log_metric_rows", "log_artifacts", "log_datasets")
# module -> {function or Class.method: phase}
PHASES = {
    "onecycle.data": {"load": "data load", "prepare": "archive: md5, decode, write"},
    "onecycle.tracking": {"Tracker.__init__": "MLflow store set-up", "Run.log_model": "MLflow model logging"}
    | {f"Tracker.{name}": "MLflow run logging" for name in TRACKING_LOGGING[:2]}
    | {f"Run.{name}": "MLflow run logging" for name in TRACKING_LOGGING[2:]}
    | {f"Run.{name}": "MLflow run logging" for name in ("set_note", "set_tags", "log_model_metrics", "__exit__")},
    "onecycle.lr_finder": {"range_test": "sweep steps"},
    "onecycle.training": {"train_one_epoch": "training steps", "evaluate": "evaluation"},
    "onecycle.plots": {name: "plots" for name in ("save", "cyclic_lr", "lr_range", "one_cycle", "accuracy", "loss")}
    | {name: "plots" for name in ("misclassified", "confusion_matrix")},
}


class Clock:
    """Each phase's own seconds: a stack of open phases, a call's time less its nested phases' going to its own."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stack: list[list] = []  # [phase, start, seconds in nested phases]

    def timed(self, phase: str, fn, *args, **kwargs):
        self.stack.append([phase, time.perf_counter(), 0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            _, start, nested = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - nested
            if self.stack:
                self.stack[-1][2] += elapsed


def wrap(clock: Clock, owner, name: str, phase: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        return clock.timed(phase, original, *args, **kwargs)

    setattr(owner, name, timed)


def install(clock: Clock) -> None:
    """Time every import statement, and wrap PHASES' functions as their modules arrive."""
    real_import, pending = builtins.__import__, dict(PHASES)

    def timed_import(*args, **kwargs):
        module = clock.timed("imports", real_import, *args, **kwargs)
        ready = [m for m in pending if m in sys.modules and not getattr(sys.modules[m].__spec__, "_initializing", 0)]
        for name in ready:  # fully imported: a module still running its own body has not defined them all yet
            for path, phase in pending.pop(name).items():
                *classes, attribute = path.split(".")
                owner = sys.modules[name]
                for cls in classes:
                    owner = getattr(owner, cls)
                wrap(clock, owner, attribute, phase)
        return module

    builtins.__import__ = timed_import


def process_start() -> float:
    """When this process started (epoch seconds, to the kernel's clock tick), from /proc (Linux): its start in
    ticks after boot against the seconds since boot now. Now, where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return time.time()


def main() -> int:
    out, script, *args = sys.argv[1:]
    started, now = process_start(), time.time()
    clock = Clock()
    install(clock)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` sets it
    status = 0
    try:
        import runpy

        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        ended = time.time()
        record = {"script": script, "seconds": ended - started, "exit_status": status}
        record["phases"] = {"interpreter start-up": now - started, **clock.seconds}
        with open(out, "w") as f:
            json.dump(record, f)
    return status


if __name__ == "__main__":
    sys.exit(main())

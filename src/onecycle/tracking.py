"""MLflow tracking: where runs go, and what a training run and a range-test run log.

Tracking URI: MLFLOW_TRACKING_URI, else the SQLite file mlflow.db at the repository root (also inside
`dvc exp run`, whose stages DVC runs with DVC_ROOT set to that root). Experiment "cifar10-one-cycle".
Everything goes through one MlflowClient per stage: no global active run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from onecycle.errors import UserError

EXPERIMENT = "cifar10-one-cycle"
BATCH = 500  # metrics per log_batch call (MLflow takes up to 1,000)
LOCK_RETRIES = 8  # attempts at a call that SQLite answers with "database is locked" (parallel experiments)


def repo_root() -> Path:
    """The repository root: DVC_ROOT inside a DVC stage (the real root, also for queued experiments)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(top.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def git_commit() -> str:
    """The commit the workspace (or DVC's experiment copy of it) is at; 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail now, before any work, when a tracking server named by the URI does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"cannot reach the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI): {reason}. Start it, "
            "or unset MLFLOW_TRACKING_URI to log to mlflow.db at the repository root"
        ) from None


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """The experiment in the tracking store, and the runs a stage makes in it.

    Once a run has started, a logging call that fails (a server that went away) does not stop training:
    it is reported once when it happens, remembered in `lost`, and summed up by `report_lost()`.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or repo_root()
        self.uri = tracking_uri(self.root)
        if self.uri.startswith(("http://", "https://")):
            # MLflow retries a failing request for minutes by default; a server that is down should cost seconds
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        check_server(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.lost: list[str] = []
        try:
            self.experiment_id = self._call(self._experiment)
        except Exception as exc:
            raise UserError(f"cannot open the MLflow experiment {EXPERIMENT!r} at {self.uri}: {exc}") from None

    def _call(self, fn: Callable[[], Any]) -> Any:
        """fn(), retried while SQLite says another process holds the database (parallel experiments)."""
        for attempt in range(LOCK_RETRIES):
            try:
                return fn()
            except Exception as exc:
                if "database is locked" not in str(exc) or attempt == LOCK_RETRIES - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
        return None

    def _try(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn() for a run already started. A failure is reported and remembered, not raised; after it the store
        is not asked again in this stage (each call to a dead server would cost its retries)."""
        if self.lost:
            self.lost.append(what)
            return None
        try:
            return self._call(fn)
        except Exception as exc:
            reason = " ".join(str(exc).split())
            if len(reason) > 300:  # the root cause (e.g. "Connection refused") ends MLflow's long messages
                reason = f"{reason[:140]} ... {reason[-140:]}"
            print(f"warning: MLflow at {self.uri} did not take {what} ({reason}); carrying on without MLflow")
            self.lost.append(what)
            return None

    def report_lost(self, kept_in: str) -> None:
        """One line naming what never reached the tracking store, and where it is kept instead."""
        if self.lost:
            missed = "; ".join(self.lost) if len(self.lost) <= 6 else f"{'; '.join(self.lost[:3])}; ... {self.lost[-1]}"
            print(f"warning: MLflow at {self.uri} did not take {missed}. They are kept in {kept_in}")

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(EXPERIMENT)
        if found:
            return found.experiment_id
        # Artifacts beside mlflow.db, not under the working folder (which is a temporary copy for queued
        # experiments). A tracking server decides for itself.
        location = None if self.uri.startswith("http") else (self.root / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=location)
        except Exception:  # another stage created it meanwhile
            found = self.client.get_experiment_by_name(EXPERIMENT)
            if found:
                return found.experiment_id
            raise

    def start_run(self, stage: str, params: Mapping[str, object], tags: Mapping[str, str], run_id: str | None = None):
        """A new run (or the run `run_id`, when it still exists: a resumed training)."""
        exp_name = os.environ.get("DVC_EXP_NAME")
        if run_id:
            try:
                run = self._call(lambda: self.client.get_run(run_id))
            except Exception:
                print(f"MLflow run {run_id} of the checkpoint is gone from {self.uri}: starting a new run")
            else:
                earlier = run.data.tags.get("dvc.exp_name")
                if exp_name and earlier != exp_name:  # DVC names the rerun of a killed experiment afresh
                    self._rename(run_id, exp_name, earlier)
                return run_id
        all_tags = {"stage": stage, "mlflow.source.git.commit": git_commit(), **tags}
        if exp_name:
            all_tags["dvc.exp_name"] = exp_name
        try:
            run = self._call(lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=exp_name))
            logged = [Param(k, str(v)) for k, v in params.items()]
            self._call(lambda: self.client.log_batch(run.info.run_id, params=logged, synchronous=True))
        except Exception as exc:
            raise UserError(f"cannot start an MLflow run at {self.uri}: {' '.join(str(exc).split())[:300]}") from None
        return run.info.run_id

    def _rename(self, run_id: str, exp_name: str, earlier: str | None) -> None:
        """Name a resumed run after the DVC experiment that finished it, keeping the killed attempt's name."""
        tags = {"dvc.exp_name": exp_name} | ({"dvc.exp_name.resumed_from": earlier} if earlier else {})
        self.set_tags(run_id, tags)
        self._try("the run's new name", lambda: self.client.update_run(run_id, name=exp_name))

    def log_metrics(self, run_id: str, step: int, values: Mapping[str, float], what: str | None = None) -> None:
        stamp = _now_ms()
        rows = [Metric(k, float(v), stamp, step) for k, v in values.items()]
        self.log_metric_rows(run_id, rows, what or f"the metrics of step {step}")

    def log_metric_rows(self, run_id: str, metrics: Iterable[Metric], what: str = "metrics") -> None:
        metrics = list(metrics)
        for start in range(0, len(metrics), BATCH):
            chunk = metrics[start : start + BATCH]
            self._try(what, lambda chunk=chunk: self.client.log_batch(run_id, metrics=chunk, synchronous=True))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        rows = [RunTag(k, str(v)) for k, v in tags.items()]
        self._try(f"the tags {', '.join(tags)}", lambda: self.client.log_batch(run_id, tags=rows, synchronous=True))

    def log_artifacts(self, run_id: str, paths: Iterable[Path], folder: str | None = None) -> None:
        for path in paths:
            self._try(f"the artifact {path}", lambda path=path: self.client.log_artifact(run_id, str(path), folder))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._try(f"the run's end ({status})", lambda: self.client.set_terminated(run_id, status))

    def run_of_model(self, model_sha256: str) -> str | None:
        """The newest training run that produced the model with this hash."""
        runs = self._try(
            "a search for the run of this model",
            lambda: self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.model_sha256 = '{model_sha256}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            ),
        )
        return runs[0].info.run_id if runs else None

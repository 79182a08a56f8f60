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
from collections.abc import Iterable, Mapping
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from onecycle.errors import UserError

EXPERIMENT = "cifar10-one-cycle"
BATCH = 500  # metrics per log_batch call (MLflow takes up to 1,000)


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
    """The experiment in the tracking store, and the runs a stage makes in it."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or repo_root()
        self.uri = tracking_uri(self.root)
        check_server(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment()

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
        if run_id:
            try:
                self.client.get_run(run_id)
                return run_id
            except Exception:
                print(f"MLflow run {run_id} of the checkpoint is gone from {self.uri}: starting a new run")
        exp_name = os.environ.get("DVC_EXP_NAME")
        all_tags = {"stage": stage, "mlflow.source.git.commit": git_commit(), **tags}
        if exp_name:
            all_tags["dvc.exp_name"] = exp_name
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=exp_name)
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()], synchronous=True)
        return run.info.run_id

    def log_metrics(self, run_id: str, step: int, values: Mapping[str, float]) -> None:
        stamp = _now_ms()
        self.log_metric_rows(run_id, [Metric(k, float(v), stamp, step) for k, v in values.items()])

    def log_metric_rows(self, run_id: str, metrics: Iterable[Metric]) -> None:
        metrics = list(metrics)
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + BATCH], synchronous=True)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_artifacts(self, run_id: str, paths: Iterable[Path], folder: str | None = None) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path), folder)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def run_of_model(self, model_sha256: str) -> str | None:
        """The newest training run that produced the model with this hash."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.model_sha256 = '{model_sha256}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

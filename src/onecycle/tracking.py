"""MLflow tracking: where runs go, and what a training run and a range-test run log.

Tracking URI: MLFLOW_TRACKING_URI, else the SQLite file mlflow.db at the repository root (also inside
`dvc exp run`, whose stages DVC runs with DVC_ROOT set to that root). Experiment "cifar10-one-cycle" holds
the training runs only; the LR range test's runs go to "cifar10-lr-range-test", under metric keys of their
own (range/...), so the training experiment's charts overlay One Cycle runs alone.
Everything goes through one MlflowClient per stage: no global active run.

What `mlflow ui` (3.17) shows by default, and why the stages print a link:
- It opens an experiment in its GenAI view unless the URL says `workflowType=machine_learning` (or the
  browser remembers the "Model training" toggle). The `mlflow.experimentKind` tag does not change that in
  3.17: its UI reads the kind from the URL and the toggle only.
- Its runs table shows no metric or param column until one is added, and keeps that choice per browser.
  A URL with `viewStateShareKey=K` loads the view stored in the experiment tag `mlflow.sharedViewState.K`
  (what its "Share" button writes): the experiments carry such a view with the columns that matter here.
"""

from __future__ import annotations

import getpass
import hashlib
import json
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

EXPERIMENT = "cifar10-one-cycle"  # the training runs, and only them
RANGE_EXPERIMENT = "cifar10-lr-range-test"  # the LR range test's runs
VIEW_KEY = "onecycle"  # the shared view's key: mlflow.sharedViewState.onecycle, ?viewStateShareKey=onecycle
UI_PORT = 5000  # where `mlflow ui` listens by default (on 127.0.0.1)


def _column(kind: str, name: str) -> str:
    """A runs-table column as MLflow's UI names it: metrics.`test_acc`."""
    return f"{kind}.`{name}`"


# Each experiment's shared view: the runs table's columns, the figures a user compares runs by (MLflow's UI
# orders them metrics, then params, then tags, each alphabetically), and a run-name column wide enough (pixels)
# for the names `start_run` gives.
VIEW_COLUMNS = {
    EXPERIMENT: [
        *(_column("metrics", m) for m in ("test_acc", "best_test_acc")),
        *(_column("params", p) for p in ("lr_min", "lr_max", "train.epochs", "model.width", "train.seed")),
        _column("tags", "dvc.exp_name"),
    ],
    RANGE_EXPERIMENT: [
        *(_column("metrics", m) for m in ("range/lr_min", "range/lr_max")),
        *(_column("params", p) for p in ("lr_finder.pick", "lr_finder.num_iter", "model.width", "train.batch_size")),
        _column("tags", "dvc.exp_name"),
    ],
}
RUN_NAME_WIDTH = 340


def shared_view(experiment: str) -> str:
    """The experiment's shared view, as the JSON MLflow's UI reads from the tag mlflow.sharedViewState.<key>."""
    name_column = _column("attributes", "Run Name")
    return json.dumps(
        {
            "selectedColumns": VIEW_COLUMNS[experiment],
            "columnOrder": [name_column],  # the UI applies the widths only to the columns listed here
            "columnWidths": {name_column: RUN_NAME_WIDTH},
        }
    )


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


def user() -> str:
    """Who runs the stage, as MLflow itself would record it ("Created by" in its UI)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry and no USER variable
        return "unknown"


def run_label() -> str:
    """What a run is called first: the DVC experiment's name, else (`dvc repro`, a bare stage) when it started."""
    return os.environ.get("DVC_EXP_NAME") or time.strftime("repro %Y-%m-%d %H:%M:%S")


class Tracker:
    """The experiment in the tracking store, and the runs a stage makes in it.

    Once a run has started, a logging call that fails (a server that went away) does not stop training:
    it is reported once when it happens, remembered in `lost`, and summed up by `report_lost()`.
    """

    def __init__(self, root: Path | None = None, experiment: str = EXPERIMENT) -> None:
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
            # the training experiment first, so that it is experiment 1 in a fresh store (the README's link)
            training_id = self._call(lambda: self._experiment(EXPERIMENT))
            self.experiment_id = (
                training_id if experiment == EXPERIMENT else self._call(lambda: self._experiment(experiment))
            )
        except Exception as exc:
            raise UserError(f"cannot open the MLflow experiment {experiment!r} at {self.uri}: {exc}") from None

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

    def _experiment(self, name: str) -> str:
        """The experiment's id, created when missing; its shared view is (re)stored when missing or outdated."""
        found = self.client.get_experiment_by_name(name)
        if found:
            experiment_id, tags = found.experiment_id, found.tags
        else:
            # Artifacts beside mlflow.db, not under the working folder (which is a temporary copy for queued
            # experiments). A tracking server decides for itself.
            location = None if self.uri.startswith("http") else (self.root / "mlartifacts").as_uri()
            try:
                experiment_id, tags = self.client.create_experiment(name, artifact_location=location), {}
            except Exception:  # another stage created it meanwhile
                found = self.client.get_experiment_by_name(name)
                if not found:
                    raise
                experiment_id, tags = found.experiment_id, found.tags
        view = shared_view(name)
        if tags.get(f"mlflow.sharedViewState.{VIEW_KEY}") != view:
            self.client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", view)
        return experiment_id

    def runs_url(self) -> str:
        """The experiment's runs table in MLflow's UI, with its shared view's columns."""
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{UI_PORT}"
        query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
        return f"{base}/#/experiments/{self.experiment_id}/runs?{query}"

    def print_where(self) -> None:
        """One line that says where to look at the runs."""
        if self.lost:
            return
        if self.uri.startswith(("http://", "https://")):
            print(f"MLflow: {self.runs_url()}")
        else:
            print(f"MLflow: `mlflow ui --backend-store-uri {self.uri}`, then open {self.runs_url()}")

    def start_run(
        self,
        stage: str,
        params: Mapping[str, object],
        tags: Mapping[str, str],
        run_id: str | None = None,
        *,
        detail: str = "",
        note: str = "",
    ) -> str:
        """A new run (or the run `run_id`, when it still exists: a resumed training).

        Its name is the DVC experiment's name (or when it started) then `detail`, what sets it apart (width, seed,
        ...); `note` is its description (markdown), until `set_note` replaces it.
        """
        exp_name = os.environ.get("DVC_EXP_NAME")
        name = " · ".join(part for part in (run_label(), detail) if part)
        if run_id:
            try:
                run = self._call(lambda: self.client.get_run(run_id))
            except Exception:
                print(f"MLflow run {run_id} of the checkpoint is gone from {self.uri}: starting a new run")
            else:
                earlier = run.data.tags.get("dvc.exp_name")
                if exp_name and earlier != exp_name:  # DVC names the rerun of a killed experiment afresh
                    self._rename(run_id, name, exp_name, earlier)
                return run_id
        all_tags = {
            "stage": stage,
            "mlflow.source.name": f"stages/{stage}.py",  # "Source" in MLflow's UI: the stage script dvc.yaml runs
            "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": git_commit(),
            "mlflow.user": user(),  # "Created by"
            **tags,
        }
        if note:
            all_tags["mlflow.note.content"] = note
        if exp_name:
            all_tags["dvc.exp_name"] = exp_name
        try:
            run = self._call(lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=name))
            logged = [Param(k, str(v)) for k, v in params.items()]
            self._call(lambda: self.client.log_batch(run.info.run_id, params=logged, synchronous=True))
        except Exception as exc:
            raise UserError(f"cannot start an MLflow run at {self.uri}: {' '.join(str(exc).split())[:300]}") from None
        return run.info.run_id

    def _rename(self, run_id: str, name: str, exp_name: str, earlier: str | None) -> None:
        """Name a resumed run after the DVC experiment that finished it, keeping the killed attempt's name."""
        tags = {"dvc.exp_name": exp_name} | ({"dvc.exp_name.resumed_from": earlier} if earlier else {})
        self.set_tags(run_id, tags)
        self._try("the run's new name", lambda: self.client.update_run(run_id, name=name))

    def set_note(self, run_id: str, markdown: str) -> None:
        """The run's description: what MLflow's UI shows atop the run's page."""
        self.set_tags(run_id, {"mlflow.note.content": markdown})

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

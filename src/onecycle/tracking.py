"""MLflow tracking: where runs go, and what a training run and a range-test run log.

Tracking URI: MLFLOW_TRACKING_URI, else the SQLite file mlflow.db at the repository root (also inside
`dvc exp run`, whose stages DVC runs with DVC_ROOT set to that root). Experiment "cifar10-one-cycle" holds
the training runs only; the LR range test's runs go to "cifar10-lr-range-test", under metric keys of their
own (range/...), so the training experiment's charts overlay One Cycle runs alone.
Everything goes through one MlflowClient per stage: no global active run. A stage holds its run as a `Run`,
which `with` ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED. What MLflow's UI needs (the links, the saved
runs view) is in `mlflow_ui`.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from onecycle import mlflow_ui
from onecycle.errors import UserError

EXPERIMENT = "cifar10-one-cycle"  # the training runs, and only them
RANGE_EXPERIMENT = "cifar10-lr-range-test"  # the LR range test's runs
MODEL_PREFIX = "resnet"  # the logged MLflow model's name: resnet-w<width>-<run label> (model_name)

# Each experiment's runs-table columns in its shared view: the figures a user compares runs by.
VIEW_COLUMNS = {
    EXPERIMENT: [
        *(mlflow_ui.column("metrics", m) for m in ("test_acc", "best_test_acc")),
        *(mlflow_ui.column("params", p) for p in ("lr_min", "lr_max", "train.epochs", "model.width", "train.seed")),
        mlflow_ui.column("tags", "dvc.exp_name"),
        # the runs' data (name and md5) and logged model, which a view of its own hides unless it lists them
        *(mlflow_ui.column("attributes", a) for a in ("Dataset", "Models")),
    ],
    RANGE_EXPERIMENT: [
        *(mlflow_ui.column("metrics", m) for m in ("range/lr_min", "range/lr_max")),
        *(
            mlflow_ui.column("params", p)
            for p in ("lr_finder.pick", "lr_finder.num_iter", "model.width", "train.batch_size")
        ),
        mlflow_ui.column("tags", "dvc.exp_name"),
    ],
}
SYSTEM_METRICS_SECONDS = 10  # MLflow's default sampling interval of CPU, memory and GPU use (its env var overrides)


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


def dataset_name(context: str, limit: int | None) -> str:
    """The name a split's dataset is logged under: "cifar10-test", or "cifar10-test-first-500" for the first 500
    images (the same archive cut to its first N images is other data: the name says so, the digest cannot)."""
    return f"cifar10-{context}" + (f"-first-{limit}" if limit is not None else "")


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


def model_name(width: int, label: str) -> str:
    """The logged model's name, which tells it from other runs' models in MLflow's Models tab: the width and the
    run's label (Run.label: the DVC experiment's name, or when the run started), in the letters MLflow takes in
    a logged model's name (no '/', ':', '.', '%' or quotes): resnet-w16-bally-cess, resnet-w8-lrc-x0-5,
    resnet-w64-repro-2026-12-05-14-03-21."""
    return f"{MODEL_PREFIX}-w{width}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")


def system_metrics_on() -> bool:
    """System metrics (CPU, memory, disk, network and GPU use, every SYSTEM_METRICS_SECONDS) are logged unless
    MLflow's own switch, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, says false: `make bench` measures their cost."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0", "no")


def ended_status(exc: BaseException | None) -> str:
    """The status a run ends with: KILLED by Ctrl-C or SIGTERM (both a KeyboardInterrupt here), FAILED by any other
    exception, FINISHED without one."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


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
            # the training experiment first, so that a fresh store numbers it 1
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

    def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
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
        mlflow_ui.store_view(self.client, experiment_id, tags, VIEW_COLUMNS[name])
        return experiment_id

    def runs_url(self) -> str:
        """The experiment's runs table in MLflow's UI, with its shared view's columns."""
        return mlflow_ui.runs_url(self.uri, self.experiment_id)

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
        stopped_note: Callable[[str], str] | None = None,
        start_ms: int | None = None,
        system_metrics: bool = False,
    ) -> Run:
        """A new run (or the run `run_id`, when it still exists: a resumed training), to use as `with ... as run:`.

        Its name is the DVC experiment's name (or when it started) then `detail`, what sets it apart (width, seed,
        ...); `note` is its description (markdown), until `set_note` replaces it, and `stopped_note(status)` the
        description of a run that ends KILLED or FAILED. `start_ms`: when its work began (ms since the epoch), if
        before now. `system_metrics`: log CPU, memory and GPU use while it runs (unless system_metrics_on() says
        no).
        """
        exp_name = os.environ.get("DVC_EXP_NAME")
        label = run_label()
        name = " · ".join(part for part in (label, detail) if part)
        monitor = system_metrics and system_metrics_on()
        if run_id:
            try:
                found = self._call(lambda: self.client.get_run(run_id))
            except Exception:
                print(f"MLflow run {run_id} of the checkpoint is gone from {self.uri}: starting a new run")
            else:
                # the label it started under, unless a DVC experiment renames it below
                label = exp_name or found.info.run_name.split(" · ")[0]
                run = Run(self, run_id, label, stopped_note=stopped_note, system_metrics=monitor, resumed=True)
                earlier = found.data.tags.get("dvc.exp_name")
                if exp_name and earlier != exp_name:  # DVC names the rerun of a killed experiment afresh
                    run.rename(name, exp_name, earlier)
                # running again (a killed run had ended KILLED)
                self.attempt("the run's restart", lambda: self.client.update_run(run_id, status="RUNNING"))
                return run
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
            created = self._call(
                lambda: self.client.create_run(self.experiment_id, start_time=start_ms, tags=all_tags, run_name=name)
            )
            logged = [Param(k, str(v)) for k, v in params.items()]
            self._call(lambda: self.client.log_batch(created.info.run_id, params=logged, synchronous=True))
        except Exception as exc:
            raise UserError(f"cannot start an MLflow run at {self.uri}: {' '.join(str(exc).split())[:300]}") from None
        return Run(self, created.info.run_id, label, stopped_note=stopped_note, system_metrics=monitor)

    def run_of_model(self, model_sha256: str) -> Run | None:
        """The newest training run that produced the model with this hash (already ended: add to it, no `with`)."""
        runs = self.attempt(
            "a search for the run of this model",
            lambda: self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.model_sha256 = '{model_sha256}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            ),
        )
        return self.run(runs[0].info.run_id) if runs else None

    def run(self, run_id: str) -> Run:
        """An existing run, to add to (tags, artifacts) without ending it."""
        return Run(self, run_id, "")


class Run:
    """One MLflow run of a stage. As a context manager it ends the run FINISHED, KILLED (a KeyboardInterrupt:
    Ctrl-C, or SIGTERM through `errors.stage_main`) or FAILED (any other exception), with `stopped_note(status)`
    as the description of a run that did not finish, and logs system metrics while it is open if asked."""

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        label: str,
        *,
        stopped_note: Callable[[str], str] | None = None,
        system_metrics: bool = False,
        resumed: bool = False,
    ) -> None:
        self.tracker, self.id, self.label, self.resumed = tracker, run_id, label, resumed
        self.stopped_note = stopped_note
        self.end_ms: int | None = None  # when the run's work ended, if before it is closed (ms since the epoch)
        self._system_metrics = system_metrics
        self._monitor = None

    @property
    def url(self) -> str:
        """The run's page in MLflow's UI, in its training view."""
        return mlflow_ui.run_url(self.tracker.uri, self.tracker.experiment_id, self.id)

    def __enter__(self) -> Run:
        if self._system_metrics and not self.tracker.lost:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # MLflow announces each start and stop at INFO level: noise in every stage's output
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            self._monitor = SystemMetricsMonitor(
                self.id, SYSTEM_METRICS_SECONDS, resume_logging=self.resumed, tracking_uri=self.tracker.uri
            )
            self._monitor.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = ended_status(exc)
        if self._monitor:
            self._monitor.finish()  # its last samples are logged before the run ends
            self._monitor = None
        if status != "FINISHED" and self.stopped_note:
            self.set_note(self.stopped_note(status))
        self.finish(status)

    def rename(self, name: str, exp_name: str, earlier: str | None) -> None:
        """Name a resumed run after the DVC experiment that finished it, keeping the killed attempt's name."""
        tags = {"dvc.exp_name": exp_name} | ({"dvc.exp_name.resumed_from": earlier} if earlier else {})
        self.set_tags(tags)
        self.tracker.attempt("the run's new name", lambda: self.tracker.client.update_run(self.id, name=name))

    def set_note(self, markdown: str) -> None:
        """The run's description: what MLflow's UI shows atop the run's page."""
        self.set_tags({"mlflow.note.content": markdown})

    def log_metrics(self, step: int, values: Mapping[str, float], what: str | None = None) -> None:
        stamp = _now_ms()
        rows = [Metric(k, float(v), stamp, step) for k, v in values.items()]
        self.log_metric_rows(rows, what or f"the metrics of step {step}")

    def log_metric_rows(self, metrics: Iterable[Metric], what: str = "metrics") -> None:
        metrics = list(metrics)
        client = self.tracker.client
        for start in range(0, len(metrics), BATCH):
            chunk = metrics[start : start + BATCH]
            self.tracker.attempt(what, lambda chunk=chunk: client.log_batch(self.id, metrics=chunk, synchronous=True))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        rows = [RunTag(k, str(v)) for k, v in tags.items()]
        self.tracker.attempt(
            f"the tags {', '.join(tags)}", lambda: self.tracker.client.log_batch(self.id, tags=rows, synchronous=True)
        )

    def log_artifacts(self, paths: Iterable[Path], folder: str | None = None) -> None:
        client = self.tracker.client
        for path in paths:
            self.tracker.attempt(
                f"the artifact {path}", lambda path=path: client.log_artifact(self.id, str(path), folder)
            )

    def log_datasets(self, url: str, md5: str, splits: Mapping[str, tuple[int, int | None]]) -> None:
        """The run's inputs, as MLflow's Datasets column lists them: one per split, {context: (images, limit)}
        (limit: data.*_limit, None for all), from the archive at `url` with its md5 as the digest."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": all of them local
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(url)
        inputs = []
        for context, (images, limit) in splits.items():
            name = dataset_name(context, limit)
            profile = json.dumps({"images": images, "first_images_kept": limit})
            dataset = Dataset(name, md5, source._get_source_type(), source.to_json(), profile=profile)
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
        self.tracker.attempt("the datasets", lambda: self.tracker.client.log_inputs(self.id, datasets=inputs))

    def log_model(
        self, model: torch.nn.Module, name: str, example: np.ndarray, params: Mapping[str, Any]
    ) -> str | None:
        """`model` as the run's MLflow model `name` (models:/<model id>, or runs:/<run id>/<name>):
        `mlflow.pytorch.load_model` gives it back, `mlflow models predict` serves it. `example`: a few inputs, for
        its signature and input example; `params`: the model's own params in MLflow's Models view. Returns its
        model id (None if the store did not take it)."""
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        with torch.no_grad():
            signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
        requirements = [f"{p}=={importlib.metadata.version(p)}" for p in ("torch", "numpy", "mlflow")]

        def log() -> str:
            # mlflow.pytorch.log_model reads the store and experiment from MLflow's process-wide settings
            mlflow.set_tracking_uri(self.tracker.uri)
            mlflow.set_experiment(experiment_id=self.tracker.experiment_id)
            # pickle, not pt2: torch.export took 4.3 s of a 2-core CPU at width 4, in every run. The package's
            # code travels with the model (code_paths), so it loads wherever torch and mlflow are installed. MLflow
            # warns, rightly, that a pickle runs code when loaded: this one is the run's own model.
            logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
            return mlflow.pytorch.log_model(
                model, name=name, run_id=self.id, signature=signature, input_example=example,
                pip_requirements=requirements, code_paths=[str(Path(__file__).parent)],
                serialization_format="pickle", params={k: str(v) for k, v in params.items()},
            ).model_id  # fmt: skip

        return self.tracker.attempt("the MLflow model", log)

    def log_model_metrics(
        self, model_id: str | None, step: int, values: Mapping[str, float], dataset: str, digest: str
    ) -> None:
        """Metrics of the run linked to its logged model and to the dataset they were measured on, as MLflow 3's
        Models view and `mlflow.search_logged_models` read them (plain run metrics when no model was logged)."""
        if model_id is None:
            self.log_metrics(step, values)
            return
        client, stamp = self.tracker.client, _now_ms()
        for key, value in values.items():
            self.tracker.attempt(
                f"the metric {key}",
                lambda key=key, value=value: client.log_metric(
                    self.id, key, float(value), stamp, step, dataset_name=dataset, dataset_digest=digest,
                    model_id=model_id,
                ),
            )  # fmt: skip

    def finish(self, status: str = "FINISHED") -> None:
        end = self.end_ms
        self.tracker.attempt(
            f"the run's end ({status})", lambda: self.tracker.client.set_terminated(self.id, status, end_time=end)
        )

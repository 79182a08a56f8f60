"""What a user sees in `mlflow ui`, checked in a real browser: `make browser-check`.

Two quick runs of the real pipeline (`dvc exp run`, tiny model, a few epochs) in a temporary git repository,
then the real `mlflow ui` on 127.0.0.1 against its mlflow.db, then headless Chromium (Debian's `chromium`,
driven by playwright) on the pages the README sends a user to. It saves one screenshot per page and fails,
naming what it missed, when the runs view does not list the training runs with their metrics and datasets,
shows a range-test run, when a run's page lacks its datasets or logged model, when the Models tab does not list
each run's model under a name of its own, when a model's page lacks its test_acc and test dataset, or when the
charts hold a range-test curve.

    python -m scripts.browser_check --out docs/screenshots                 # params.yaml's data.url (internet)
    python -m scripts.browser_check --archive /path/cifar-10-binary.tar.gz --out /tmp/shots  # a local copy
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from onecycle.errors import UserError
from onecycle.mlflow_ui import VIEW_KEY
from onecycle.tracking import EXPERIMENT, MODEL_PREFIX, RANGE_EXPERIMENT
from scripts.experiments import tool_main
from scripts.pipeline_repo import ROOT, pipeline_repo

CHROMIUM = "/usr/bin/chromium"  # Debian's package; playwright's own browser download is not needed
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}  # pixels: a laptop's browser window
WIDE = {"width": 2400, "height": 1000}  # pixels: the runs table, wide enough for every column of its saved view
TALL = {"width": 1600, "height": 1400}  # pixels: the chart pages, two rows of charts
# The two runs: DVC experiment name and the params it sets (-S). Another seed reruns the range test too, so the
# range-test experiment holds two runs that must stay out of the training experiment's views.
RUNS = {"quick-seed0": {}, "quick-seed1": {"train.seed": 1}}
# Tiny, for a CPU: both runs took 609 s on a busy 2-core machine (load average 6 to 12), at 2,000 images.
QUICK = {"model.width": 8, "lr_finder.num_iter": 30, "lr_finder.start_lr": 1e-4, "lr_finder.end_lr": 1.0}
QUICK |= {"train.epochs": 4, "train.peak_epoch": 1, "train.batch_size": 128, "train.device": "cpu"}
CHART_METRICS = ("lr", "momentum", "test_acc", "train_acc", "test_loss", "train_loss")


@dataclass
class Seen:
    """What the browser showed: the check's result."""

    runs_view: str = ""  # the runs view's visible text
    charts_view: str = ""
    run_view: str = ""  # one training run's page
    models_view: str = ""  # the experiment's Models tab
    model_view: str = ""  # one logged model's page
    model_names: list[str] = field(default_factory=list)  # the training runs' logged models, in the store
    run_names: list[str] = field(default_factory=list)  # the training runs' names in the store
    range_names: list[str] = field(default_factory=list)  # the range-test runs' names in the store
    screenshots: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def sh(cwd: Path, *args: str) -> str:
    env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default: mlflow.db at the repository root
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml: this one
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"{' '.join(args)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def make_repo(work: Path, data: dict) -> Path:
    """A git repository with this pipeline, its params made quick, and `data` (url, md5, limits) set."""
    repo = pipeline_repo(work / "repo", QUICK | {f"data.{key}": value for key, value in data.items()})
    for name, changes in RUNS.items():
        sets = [arg for key, value in changes.items() for arg in ("-S", f"{key}={value}")]
        sh(repo, "dvc", "exp", "run", "-n", name, *sets)
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(repo: Path) -> Iterator[str]:
    """`mlflow ui` on 127.0.0.1 (a free port) against the repository's mlflow.db; yields its URL."""
    port = free_port()
    log = (repo / "mlflow-ui.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=repo, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log_text = (repo / "mlflow-ui.log").read_text()[-3000:]
                    raise UserError(f"mlflow ui did not start:\n{log_text}") from None
                time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()


def check(repo: Path, out: Path) -> Seen:
    """Open the pages a user opens, save their screenshots into `out`, and say what is wrong."""
    from playwright.sync_api import sync_playwright  # the `browser` extra: not needed by `make test`

    seen = Seen()
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    training = client.get_experiment_by_name(EXPERIMENT)
    ranges = client.get_experiment_by_name(RANGE_EXPERIMENT)
    runs = client.search_runs([training.experiment_id], order_by=["attributes.start_time ASC"])
    seen.run_names = [r.info.run_name for r in runs]
    seen.range_names = [r.info.run_name for r in client.search_runs([ranges.experiment_id])]
    models = client.search_logged_models([training.experiment_id], order_by=[{"field_name": "creation_timestamp"}])
    seen.model_names = [m.name for m in models]
    out.mkdir(parents=True, exist_ok=True)

    with mlflow_ui(repo) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        # MLflow's assistant panel opens itself on a first visit and covers a third of the page: closed, as a
        # user would close it (its state lives in the browser's localStorage).
        page.add_init_script(
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        )

        def shot(name: str) -> None:
            page.wait_for_timeout(3000)  # ms: charts draw after the data arrives (the page never goes idle: it polls)
            page.screenshot(path=str(out / name))
            seen.screenshots.append(name)

        experiment = f"{url}/#/experiments/{training.experiment_id}"
        # The README's link: the runs view with the shared view's columns. "Override saved view" keeps them for
        # this experiment in this browser, so the plain runs URL shows them from then on.
        page.goto(f"{experiment}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")
        page.get_by_text(seen.run_names[-1]).first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Override saved view").click()
        page.get_by_text("Your saved view was overridden").wait_for(state="hidden", timeout=30_000)
        page.set_viewport_size(WIDE)
        page.goto(f"{experiment}/runs?workflowType=machine_learning")
        page.get_by_text(seen.run_names[-1]).first.wait_for(timeout=60_000)
        shot("runs.png")
        seen.runs_view = page.inner_text("body")

        page.set_viewport_size(TALL)
        page.goto(f"{experiment}/runs?workflowType=machine_learning&compareRunsMode=CHART")
        page.get_by_text("test_acc").first.wait_for(timeout=60_000)
        page.locator(".js-plotly-plot").nth(len(CHART_METRICS)).wait_for(timeout=60_000)
        shot("charts.png")
        seen.charts_view = page.inner_text("body")
        page.set_viewport_size(VIEWPORT)

        last = runs[-1].info.run_id
        page.goto(f"{experiment}/runs/{last}?workflowType=machine_learning")
        page.get_by_text("Test accuracy").first.wait_for(timeout=60_000)
        page.get_by_text("cifar10-train").first.wait_for(timeout=60_000)  # the datasets load after the page
        shot("run.png")
        seen.run_view = page.inner_text("body")
        page.set_viewport_size(TALL)
        page.goto(f"{experiment}/runs/{last}/model-metrics?workflowType=machine_learning")
        page.locator(".js-plotly-plot").nth(len(CHART_METRICS) - 1).wait_for(timeout=60_000)
        shot("run-metrics.png")
        page.set_viewport_size(VIEWPORT)

        # MLflow 3's Models tab (wide: its linked metrics follow the attributes, test_acc first, under the test
        # dataset's name), and the last model's page: its test_acc and the test data it was measured on
        page.set_viewport_size(WIDE)
        page.goto(f"{experiment}/models?workflowType=machine_learning")
        page.get_by_text(seen.model_names[-1]).first.wait_for(timeout=60_000)
        page.get_by_text("test_acc").first.wait_for(timeout=60_000)
        shot("models.png")
        seen.models_view = page.inner_text("body")
        page.set_viewport_size(VIEWPORT)
        page.goto(f"{experiment}/models/{models[-1].model_id}?workflowType=machine_learning")
        page.get_by_text("test_acc").first.wait_for(timeout=60_000)
        page.get_by_text("cifar10-test").first.wait_for(timeout=60_000)
        shot("model.png")
        seen.model_view = page.inner_text("body")

        ids = json.dumps([r.info.run_id for r in runs])
        experiments = json.dumps([training.experiment_id])
        page.set_viewport_size(TALL)
        page.goto(f"{url}/#/compare-runs?runs={ids}&experiments={experiments}&workflowType=machine_learning")
        page.get_by_text("Run details").first.wait_for(timeout=60_000)
        shot("compare.png")
        browser.close()

    for name in seen.run_names:
        if name not in seen.runs_view:
            seen.problems.append(f"the runs view does not list the training run {name!r}")
    for name in seen.range_names:
        if name in seen.runs_view:
            seen.problems.append(f"the runs view lists the range-test run {name!r}")
    for metric in ("test_acc", "best_test_acc", "lr_max"):
        if metric not in seen.runs_view:
            seen.problems.append(f"the runs view has no {metric} column")
    if "cifar10-train" not in seen.runs_view:
        seen.problems.append("the runs view's Datasets column does not list cifar10-train")
    # its datasets (the first by name, "+1" for the other; -first-N ends a limited split's name) and its model
    if "cifar10-train" not in seen.run_view or seen.model_names[-1] not in seen.run_view:
        seen.problems.append(
            f"the run's page does not show its dataset cifar10-train or its model {seen.model_names[-1]}"
        )
    if len(set(seen.model_names)) != len(seen.run_names) or not all(
        n.startswith(MODEL_PREFIX) for n in seen.model_names
    ):
        seen.problems.append(f"the runs' logged models do not have names of their own: {seen.model_names}")
    for name in seen.model_names:
        if name not in seen.models_view:
            seen.problems.append(f"the Models tab does not list the model {name!r}")
    if "test_acc" not in seen.model_view or "cifar10-test" not in seen.model_view:
        seen.problems.append("the model's page does not show its test_acc or the dataset cifar10-test")
    for metric in CHART_METRICS:
        if metric not in seen.charts_view:
            seen.problems.append(f"the chart view has no {metric} chart")
    if "range/" in seen.charts_view or any(name in seen.charts_view for name in seen.range_names):
        seen.problems.append("the chart view holds a range-test chart or curve")
    if len(set(seen.run_names)) != len(seen.run_names):
        seen.problems.append(f"training runs share a name: {seen.run_names}")
    return seen


@tool_main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", help="CIFAR-10 binary archive (path or URL); default: params.yaml's data.url")
    parser.add_argument("--md5", help="the archive's md5 (default: computed from the local file)")
    parser.add_argument("--train-limit", type=int, default=2000, help="training images used (data.train_limit)")
    parser.add_argument("--test-limit", type=int, default=500, help="test images used (data.test_limit)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="folder for the PNGs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary repository and print its path")
    args = parser.parse_args()
    data = {"train_limit": args.train_limit, "test_limit": args.test_limit}
    if args.archive:
        archive = Path(args.archive).expanduser()
        if not args.md5 and not archive.is_file():
            raise UserError(f"--archive {args.archive}: no such file (a URL needs --md5)")
        md5 = args.md5 or hashlib.md5(archive.read_bytes()).hexdigest()
        data |= {"url": str(archive.resolve()) if archive.is_file() else args.archive, "md5": md5}
    if not Path(CHROMIUM).exists():
        raise UserError(
            f"no {CHROMIUM}: install Debian's chromium (`apt-get install chromium`), or run `make browser-check`"
        )

    work = Path(tempfile.mkdtemp(prefix="browser-check-"))
    started = time.time()
    try:
        repo = make_repo(work, data)
        print(f"two quick runs in {time.time() - started:.0f} s; opening mlflow ui")
        seen = check(repo, args.out)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"screenshots in {args.out}: {', '.join(seen.screenshots)}")
    print(f"training runs: {seen.run_names}; range-test runs (in {RANGE_EXPERIMENT}): {seen.range_names}")
    if seen.problems:
        print("error: " + "; ".join(seen.problems), file=sys.stderr)
        return 1
    print(f"browser check passed in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    main()

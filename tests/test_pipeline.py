"""The real `dvc repro` end to end in a temporary git repository, with the real MLflow SQLite store.

The tests of this module run in order on one repository: repro all, repro nothing, change a param,
run an experiment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PLOTS, tiny_repo
from mlflow.tracking import MlflowClient

from onecycle import lr_finder
from onecycle.model import CustomResNet
from onecycle.tracking import EXPERIMENT, RANGE_EXPERIMENT
from onecycle.training import HISTORY_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download_cifar", "lr_range_test", "train_one_cycle", "plot_reports")


def sh(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default: mlflow.db at the repository root
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml: this one
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def ran(result: subprocess.CompletedProcess) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in result.stdout]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, small_archive) -> Path:
    return tiny_repo(tmp_path_factory.mktemp("repo"), small_archive, width=4)


def mlflow_runs(repo: Path, stage: str):
    """The runs of a stage, from the experiment it logs to: training runs alone in "cifar10-one-cycle"."""
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(RANGE_EXPERIMENT if stage == "lr_range_test" else EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    assert {r.data.tags["stage"] for r in runs} <= {stage}, "one stage's runs per experiment"
    return client, runs


def test_repro_runs_the_four_stages_and_writes_every_output(repo):
    result = sh(repo, "dvc", "repro")
    assert ran(result) == list(STAGES)

    meta = json.loads((repo / "data/cifar10/meta.json").read_text())
    assert (meta["train_images"], meta["test_images"]) == (600, 200)
    found = json.loads((repo / "reports/lr_range.json").read_text())
    assert 0 < found["lr_min"] < found["lr_max"] and found["lr_max"] / found["lr_min"] == pytest.approx(10)
    curve = (repo / "reports/lr_range.csv").read_text().splitlines()
    assert curve[0] == "iteration,lr,loss,smoothed_loss,accuracy,smoothed_accuracy"
    assert len(curve) - 1 == found["iterations"]

    history = (repo / "reports/history.csv").read_text().splitlines()
    assert history[0] == ",".join(HISTORY_COLUMNS) and len(history) == 3
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert {"test_acc", "best_test_acc", "epochs", "train_seconds"} <= metrics.keys()
    assert metrics["epochs"] == 2 and 0 <= metrics["test_acc"] <= 100
    model = CustomResNet(width=4)
    model.load_state_dict(torch.load(repo / "models/model.pt", weights_only=True))
    plots = {p.name for p in (repo / "reports/plots").iterdir()}
    assert plots == PLOTS
    assert all((repo / "reports/plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_the_training_run_is_in_the_mlflow_store(repo):
    client, runs = mlflow_runs(repo, "train_one_cycle")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    head = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["data.md5"] == yaml.safe_load((repo / "params.yaml").read_text())["data"]["md5"]
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.width"] == "4"
    assert run.data.params["train.momentum"] == "[0.95, 0.85]"  # as params.yaml writes the list
    found = json.loads((repo / "reports/lr_range.json").read_text())
    assert float(run.data.params["lr_max"]) == found["lr_max"]
    for metric in ("lr", "momentum", "train_loss", "train_acc", "test_loss", "test_acc"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == [1, 2], metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "metrics.json", "params.yaml", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {f"plots/{p}" for p in PLOTS}
    # what MLflow's UI shows: a name that says what it is, a description with the headline, Source, Created by
    assert run.info.run_name.startswith("repro 20")
    assert run.info.run_name.endswith(f" · w4 · seed 0 · 2 ep · LRMAX {found['lr_max']:.4g}")
    assert run.data.tags["mlflow.source.name"] == "stages/train_one_cycle.py" and run.data.tags["mlflow.user"]
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"**Test accuracy {metrics['test_acc']:.2f}%** after 2 epochs"), note
    assert f"LR range {found['lr_min']:.4g} - {found['lr_max']:.4g}" in note and "DVC experiment: none" in note

    # the range test's run: in its own experiment, under keys of its own
    _, range_runs = mlflow_runs(repo, "lr_range_test")
    assert len(range_runs) == 1
    [range_run] = range_runs
    assert len(client.get_metric_history(range_run.info.run_id, "range/smoothed_loss")) == found["iterations"]
    assert all(key.startswith("range/") for key in range_run.data.metrics)
    assert not any(key.startswith("range/") for key in run.data.metrics)
    assert " · range test · w4 · " in range_run.info.run_name
    assert range_run.data.tags["mlflow.source.name"] == "stages/find_lr_range.py"
    assert range_run.data.tags["mlflow.note.content"].startswith(f"**LR range {found['lr_min']:.4g} - ")


def test_a_second_repro_does_nothing(repo):
    result = sh(repo, "dvc", "repro")
    assert ran(result) == []
    assert "Data and pipelines are up to date" in result.stdout


def test_a_misspelt_section_stops_repro_with_its_name_and_costs_no_result(repo):
    original = (repo / "params.yaml").read_text()
    kept = ("models/model.pt", "reports/metrics.json", "reports/lr_range.json", "reports/plots/accuracy.png")
    before = {name: (repo / name).read_bytes() for name in kept}
    (repo / "params.yaml").write_text(original + "trian:\n  epochs: 5\n")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    failed = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    (repo / "params.yaml").write_text(original)
    assert failed.returncode != 0
    assert "unknown section 'trian' (did you mean 'train'?)" in failed.stdout + failed.stderr
    assert ran(failed) == ["plot_reports"]  # the one stage that tracks the whole file; nothing was retrained
    # DVC removed the failed stage's plots before running it; the next repro brings back the same ones
    sh(repo, "dvc", "repro")
    assert {name: (repo / name).read_bytes() for name in kept} == before


def test_changing_epochs_reruns_training_and_reports_only(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = sh(repo, "dvc", "repro")
    assert ran(result) == ["train_one_cycle", "plot_reports"]
    assert len((repo / "reports/history.csv").read_text().splitlines()) == 4
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "three epochs")


def test_every_train_key_the_sweep_runs_with_reruns_the_range_test(repo):
    """A range found under other settings is never reused: dvc.yaml lists what find_range reads."""
    before = (repo / "params.yaml").read_text()
    params = yaml.safe_load(before)
    for key in lr_finder.SWEEP_TRAIN_KEYS:  # every one at once: `dvc status` lists each changed value
        params["train"][key.removeprefix("train.")] = "changed"  # DVC compares values; it does not check them
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh(repo, "dvc", "status", "lr_range_test").stdout
    (repo / "params.yaml").write_text(before)
    assert "modified" in status and all(key in status for key in lr_finder.SWEEP_TRAIN_KEYS), status
    assert "lr_range_test" not in sh(repo, "dvc", "status", "lr_range_test").stdout


def test_a_change_to_the_training_code_reruns_every_stage_that_runs_it(repo):
    """plot_reports evaluates the model with training.evaluate: a change there redraws the plots."""
    code = repo / "src" / "onecycle" / "training.py"
    before = code.read_text()
    code.write_text(before + "\n# a change\n")
    status = sh(repo, "dvc", "status").stdout
    code.write_text(before)
    assert [s for s in STAGES if f"{s}:" in status] == ["lr_range_test", "train_one_cycle", "plot_reports"], status
    assert "modified:           src/onecycle/training.py" in status or "src/onecycle/training.py" in status
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status").stdout


def test_an_experiment_is_a_new_mlflow_run_tagged_with_its_name(repo):
    # 4 epochs: a param set not run before (DVC's run cache would restore a known one without running it)
    result = sh(repo, "dvc", "exp", "run", "-S", "train.epochs=4", "-n", "four-epochs")
    assert ran(result) == ["train_one_cycle", "plot_reports"]
    _, runs = mlflow_runs(repo, "train_one_cycle")
    tagged = [r for r in runs if r.data.tags.get("dvc.exp_name") == "four-epochs"]
    assert len(tagged) == 1
    assert tagged[0].data.params["train.epochs"] == "4" and tagged[0].info.run_name.startswith("four-epochs · w4 ")
    assert "DVC experiment: `four-epochs`" in tagged[0].data.tags["mlflow.note.content"]
    assert len({r.info.run_name for r in runs}) == len(runs), "every training run has a name of its own"
    assert "four-epochs" in sh(repo, "dvc", "exp", "list").stdout


def test_reports_killed_midway_then_a_repro_ends_well(repo):
    env = os.environ.copy()
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.Popen(
        ["dvc", "repro", "-f", "plot_reports"], cwd=repo, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list((repo / "reports").glob(".plots.tmp-*/*.png")) and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "caught plot_reports while it draws"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    result = sh(repo, "dvc", "repro")
    assert ran(result) == ["plot_reports"]
    assert {p.name for p in (repo / "reports/plots").iterdir()} == PLOTS
    assert not list((repo / "reports").glob(".plots.tmp-*")), "the killed run's leftovers are gone"


def test_push_then_a_fresh_clone_pulls_the_results_without_training(repo, tmp_path):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results")
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    sh(repo, "dvc", "push")
    sh(repo, "git", "commit", "-qam", "remote")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    for output in ("models/model.pt", "reports/metrics.json", "reports/history.csv", "reports/plots/accuracy.png"):
        assert (clone / output).read_bytes() == (repo / output).read_bytes(), output
    assert ran(sh(clone, "dvc", "repro")) == []


def test_queued_experiments_run_two_at_a_time_and_all_reach_mlflow(repo):
    """`dvc exp run --queue` then `--run-all -j 2`: both run at once in DVC's temporary workspaces, and both
    log to the one mlflow.db at the repository root without a 'database is locked' loss."""
    names = ("queued-five", "queued-six")
    for name, epochs in zip(names, (5, 6), strict=True):
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"train.epochs={epochs}", "-n", name)
    result = sh(repo, "dvc", "exp", "run", "--run-all", "-j", "2")
    assert "database is locked" not in result.stdout + result.stderr
    listed = sh(repo, "dvc", "exp", "list").stdout
    assert all(name in listed for name in names)
    client, runs = mlflow_runs(repo, "train_one_cycle")
    for name, epochs in zip(names, (5, 6), strict=True):
        [run] = [r for r in runs if r.data.tags.get("dvc.exp_name") == name]
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")]
        assert steps == list(range(1, epochs + 1)), name
        assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")}, "plot_reports found the run"
        assert run.info.run_name.startswith(f"{name} · ") and f"{epochs} ep" in run.info.run_name
    assert len({r.info.run_name for r in runs}) == len(runs), "every training run has a name of its own"

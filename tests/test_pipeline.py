"""The real `dvc repro` end to end in a temporary git repository, with the real MLflow SQLite store.

The tests of this module run in order on one repository: repro all, repro nothing, change a param,
run an experiment.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from conftest import PLOTS, tiny_repo
from mlflow.tracking import MlflowClient

from onecycle import lr_finder
from onecycle.model import CustomResNet
from onecycle.tracking import EXPERIMENT, RANGE_EXPERIMENT, model_name
from onecycle.training import HISTORY_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download_cifar", "lr_range_test", "train_one_cycle", "plot_reports")


def sh_env() -> dict:
    env = os.environ.copy()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default: mlflow.db at the repository root
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml: this one
    # a tiny training ends within MLflow's 10 s between system-metrics samples: sample every second here
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    return env


def sh(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=repo, env=sh_env() | (env or {}), capture_output=True, text=True)
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
    # a threshold of 0 minutes: the estimates a long CPU run prints, at this tiny size
    result = sh(repo, "dvc", "repro", env={"ONECYCLE_WARN_MINUTES": "0"})
    assert ran(result) == list(STAGES)
    assert re.search(
        r"note: at [0-9.e-]+ s a step on cpu \(model.width 4, batch 64\), the range test and 2 epochs "
        r"will take about [0-9]+ (s|min)\. Faster: a GPU .*`make quick`",
        result.stdout,
    ), result.stdout
    assert re.search(r"note: epoch 1 took [0-9]+ s: the 1 epoch left will take about", result.stdout)
    # the training run's own page, in MLflow's training view (not its GenAI one)
    assert re.search(
        r"MLflow run: http://127\.0\.0\.1:5000/#/experiments/1/runs/[0-9a-f]{32}\?workflowType=machine_learning",
        result.stdout,
    )

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

    # the datasets, as MLflow's Datasets column lists them: the archive's md5 as the digest, with the sizes
    md5 = yaml.safe_load((repo / "params.yaml").read_text())["data"]["md5"]
    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(datasets) == {"cifar10-train", "cifar10-test"}
    assert {d.dataset.digest for d in datasets.values()} == {md5}
    assert json.loads(datasets["cifar10-train"].dataset.profile)["images"] == 600
    assert [t.value for t in datasets["cifar10-test"].tags] == ["test"]  # mlflow.data.context
    # system metrics (CPU, memory) sampled while it trained
    assert "system/cpu_utilization_percentage" in run.data.metrics

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


def test_the_logged_model_carries_its_accuracy_on_the_test_data_and_its_params(repo):
    """MLflow 3's Models view: search_logged_models finds the model with the stage's final test_acc and test_loss,
    linked to the test dataset (the archive's md5), and its params; the run's history keeps one point an epoch."""
    client, [run] = mlflow_runs(repo, "train_one_cycle")
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    found = json.loads((repo / "reports/lr_range.json").read_text())
    md5 = yaml.safe_load((repo / "params.yaml").read_text())["data"]["md5"]
    order = [{"field_name": "metrics.test_acc", "ascending": False}]
    [model] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], order_by=order, output_format="list")
    assert model.source_run_id == run.info.run_id
    linked = {m.key: m for m in model.metrics}
    assert {"test_acc", "test_loss", "best_test_acc"} <= set(linked)
    assert linked["test_acc"].value == pytest.approx(metrics["test_acc"])
    assert linked["test_loss"].value == pytest.approx(metrics["test_loss"])
    ours = ("test_acc", "test_loss", "best_test_acc")
    assert {(linked[k].dataset_name, linked[k].dataset_digest) for k in ours} == {("cifar10-test", md5)}
    assert model.params["model.width"] == "4" and model.params["train.epochs"] == "2"
    assert float(model.params["lr_max"]) == found["lr_max"] and model.params["lr_finder.pick"] == "budget"
    assert model.params["git_commit"] == run.data.tags["mlflow.source.git.commit"]
    for key in ("test_acc", "test_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key


def test_the_logged_model_classifies_as_the_stage_measured_and_registers_in_one_command(repo):
    """`mlflow.pytorch.load_model` on the URI the stage prints (models:/<model id>), or on runs:/<id>/<model name>,
    gives a network that takes the test images as data/cifar10 holds them (uint8 NHWC) and scores the stage's
    test accuracy; `make register` makes it a registry version."""
    _, [run] = mlflow_runs(repo, "train_one_cycle")
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    [logged] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert logged.name == model_name(4, run.info.run_name.split(" · ")[0]) == f"resnet-w4-{logged.name[10:]}"
    images = np.load(repo / "data/cifar10/test_images.npy")
    labels = np.load(repo / "data/cifar10/test_labels.npy")
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    model = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    assert 100 * (predicted == labels).mean() == pytest.approx(metrics["test_acc"])
    again = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/{logged.name}")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))

    registered = sh(repo, sys.executable, str(ROOT / "scripts" / "register_model.py"))  # what `make register` runs
    assert f"registered cifar10-custom-resnet version 1 (run {run.info.run_id})" in registered.stdout
    assert "WARNING" not in registered.stderr and "no artifacts at artifact path" not in registered.stderr
    version = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_model_version("cifar10-custom-resnet", "1")
    assert version.run_id == run.info.run_id
    served = mlflow.pyfunc.load_model("models:/cifar10-custom-resnet/1")  # as `mlflow models serve` loads it
    assert (served.predict(images[:8]).argmax(1) == predicted[:8]).all()


def test_a_second_repro_does_nothing(repo):
    result = sh(repo, "dvc", "repro")
    assert ran(result) == []
    assert "Data and pipelines are up to date" in result.stdout


def test_an_epochs_only_experiment_re_picks_from_the_saved_sweep_what_a_new_sweep_would(repo):
    """`dvc exp run -S train.epochs=N` reruns lr_range_test (the pick reads the training's length) but sweeps
    nothing: the curve saved under the sweep's inputs is re-picked, to the bytes a new sweep gives, and training
    reruns from that range."""
    kept = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    before = json.loads((repo / "reports/lr_range.json").read_text())
    [saved] = (repo / ".lr_sweeps").iterdir()  # the first repro's sweep
    stamp = saved.stat().st_mtime_ns
    # params no other test runs (a run-cache entry would restore its outputs instead of running the stages)
    result = sh(repo, "dvc", "exp", "run", "-S", "train.epochs=4", "-S", "train.peak_epoch=2", "-n", "four-epochs")
    assert ran(result) == ["lr_range_test", "train_one_cycle", "plot_reports"]
    assert f"LR range test: no new sweep: {saved} holds the curve of a sweep with the same inputs" in result.stdout
    assert [p.name for p in (repo / ".lr_sweeps").iterdir()] == [saved.name] and saved.stat().st_mtime_ns == stamp
    repicked = {name: (repo / name).read_bytes() for name in ("reports/lr_range.json", "reports/lr_range.csv")}
    found = json.loads(repicked["reports/lr_range.json"])
    assert found["lr_max"] != before["lr_max"], "budget reads the training's length"
    assert len((repo / "reports/history.csv").read_text().splitlines()) == 1 + 4, "retrained for 4 epochs"
    _, runs = mlflow_runs(repo, "train_one_cycle")
    assert float(runs[-1].data.params["lr_max"]) == found["lr_max"], "from the re-picked range"
    _, range_runs = mlflow_runs(repo, "lr_range_test")
    assert "re-picked from the saved sweep" in range_runs[-1].data.tags["mlflow.note.content"]

    saved.unlink()  # a new sweep, with the same params: the same bytes
    sh(repo, "dvc", "repro", "-f", "-s", "lr_range_test")
    assert {name: (repo / name).read_bytes() for name in repicked} == repicked
    assert (repo / "reports/lr_range_fine.csv").read_text().count("\n") == 1, "budget reads no fine sweep: a header"

    # the `fine` rule: no new sweep, but the fine sweeps around its lowest loss, kept beside it and plotted
    result = sh(repo, "dvc", "exp", "run", "-S", "lr_finder.pick=fine", "-n", "fine-rule")
    assert ran(result) == ["lr_range_test", "train_one_cycle", "plot_reports"]
    assert "no new sweep" in result.stdout and "the fine sweeps around its lowest loss (2 x 48 steps)" in result.stdout
    with open(repo / "reports/lr_range_fine.csv", newline="") as f:
        fine_rows = list(csv.DictReader(f))
    rounds = [[row for row in fine_rows if row["round"] == str(i)] for i in (1, 2)]
    assert all(10 < len(r) <= 48 for r in rounds) and len(fine_rows) == sum(map(len, rounds))
    found = json.loads((repo / "reports/lr_range.json").read_text())
    assert found["pick"] == "fine" and [r["iterations"] for r in found["fine_sweeps"]] == list(map(len, rounds))
    lrs = [float(row["lr"]) for row in fine_rows]
    assert min(lrs) <= found["lr_max"] <= max(lrs)
    saved_fine = json.loads(saved.read_text())["curve"]["fine"]
    assert saved_fine["lr"] and saved_fine["fine"]["lr"], "saved with the sweep: a re-pick reads them"
    for name, content in kept.items():
        (repo / name).write_bytes(content)
    sh(repo, "dvc", "checkout")


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


def stage_process(session: int, script: str) -> int | None:
    """The pid of the python process running `script` in the process session `session` (DVC's child)."""
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if entry.name.isdigit() and args[1:2] == [script.encode()] and os.getsid(int(entry.name)) == session:
                return int(entry.name)
        except (OSError, IndexError):
            continue
    return None


def without(path: Path, key: str) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k != key}


def history_rows(path: Path) -> list[list[str]]:
    return [row.split(",")[:-1] for row in path.read_text().splitlines()]  # all but `seconds`


def test_sigterm_mid_epoch_ends_the_run_killed_and_the_next_repro_resumes_to_the_same_bytes(repo):
    """A batch scheduler or `kill` stops train_one_cycle with SIGTERM: the stage says so, its MLflow run ends KILLED,
    the checkpoint stays, and `dvc repro` resumes it to the bytes of a run never interrupted."""
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "two epochs")  # the state this test comes back to
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"] |= {"epochs": 3, "peak_epoch": 2}  # params no run has used (no run-cache entry)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    checkpoint = repo / ".checkpoints/train_one_cycle.pt"
    proc = subprocess.Popen(
        ["dvc", "repro", "train_one_cycle"], cwd=repo, env=sh_env(), start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    stage = stage_process(proc.pid, "stages/train_one_cycle.py")
    assert stage and proc.poll() is None, "caught train_one_cycle after its first epoch"
    os.kill(stage, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted: nothing half-written was kept; rerun the stage to continue" in output
    assert "Traceback" not in output
    done = len(torch.load(checkpoint, weights_only=True)["history"])
    assert 1 <= done < 3, "stopped mid-run, the checkpoint kept"
    client, runs = mlflow_runs(repo, "train_one_cycle")
    killed = runs[-1]
    assert killed.info.status == "KILLED" and killed.data.params["train.peak_epoch"] == "2"
    assert killed.data.tags["mlflow.note.content"].startswith("**KILLED before the end**")

    resumed = sh(repo, "dvc", "repro", "train_one_cycle")
    assert f"resuming after epoch {done} of 3" in resumed.stdout
    assert client.get_run(killed.info.run_id).info.status == "FINISHED", "the same run, finished"
    after = {name: (repo / name).read_bytes() for name in ("models/model.pt",)}
    history, metrics = (
        history_rows(repo / "reports/history.csv"),
        without(repo / "reports/metrics.json", "train_seconds"),
    )

    sh(repo, "dvc", "repro", "-f", "-s", "train_one_cycle")  # the same params, never interrupted
    assert (repo / "models/model.pt").read_bytes() == after["models/model.pt"]
    assert history_rows(repo / "reports/history.csv") == history
    assert without(repo / "reports/metrics.json", "train_seconds") == metrics
    sh(repo, "git", "checkout", "params.yaml", "dvc.lock")
    sh(repo, "dvc", "checkout")


def test_every_train_key_the_sweep_runs_with_reruns_the_range_test(repo):
    """A range found under other settings is never reused: dvc.yaml lists what the sweep and the pick read."""
    before = (repo / "params.yaml").read_text()
    params = yaml.safe_load(before)
    keys = lr_finder.SWEEP_TRAIN_KEYS + lr_finder.PICK_TRAIN_KEYS
    for key in keys:  # every one at once: `dvc status` lists each changed value
        params["train"][key.removeprefix("train.")] = "changed"  # DVC compares values; it does not check them
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh(repo, "dvc", "status", "lr_range_test").stdout
    (repo / "params.yaml").write_text(before)
    assert "modified" in status and all(key in status for key in keys), status
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


def test_a_failed_exp_run_says_how_to_restore_the_params_it_wrote(repo):
    before = (repo / "params.yaml").read_text()  # the last experiment's, applied to the workspace
    failed = subprocess.run(
        ["dvc", "exp", "run", "-S", "train.peak_epoch=5"], cwd=repo, env=sh_env(), capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "train.peak_epoch = 5 is not allowed" in failed.stderr
    assert "`git checkout params.yaml` restores the file" in failed.stderr
    assert "peak_epoch: 5" in (repo / "params.yaml").read_text(), "DVC left its value in the workspace"
    (repo / "params.yaml").write_text(before)


def test_reports_killed_midway_then_a_repro_ends_well(repo, tmp_path):
    log = tmp_path / "repro.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["dvc", "repro", "-f", "plot_reports"], cwd=repo, env=sh_env(), start_new_session=True,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.time() + 120
    while not list((repo / "reports").glob(".plots.tmp-*/*.png")) and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"caught plot_reports while it draws:\n{log.read_text()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    result = sh(repo, "dvc", "repro")
    assert ran(result) == ["plot_reports"]
    assert {p.name for p in (repo / "reports/plots").iterdir()} == PLOTS
    assert not list((repo / "reports").glob(".plots.tmp-*")), "the killed run's leftovers are gone"


def test_push_then_a_fresh_clone_pulls_the_results_without_training(repo, tmp_path):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results", "--allow-empty")
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    sh(repo, "dvc", "push")
    sh(repo, "git", "commit", "-qam", "remote")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    for output in ("models/model.pt", "reports/metrics.json", "reports/history.csv", "reports/plots/accuracy.png"):
        assert (clone / output).read_bytes() == (repo / output).read_bytes(), output
    assert ran(sh(clone, "dvc", "repro")) == []


def test_experiments_are_new_mlflow_runs_tagged_with_their_names_also_two_at_a_time(repo):
    """`dvc exp run --queue` then `--run-all -j 2`: both run at once in DVC's temporary workspaces, and both
    log to the one mlflow.db at the repository root without a 'database is locked' loss, each a new MLflow run
    named and tagged after its experiment."""
    names = ("queued-five", "queued-six")
    for name, epochs in zip(names, (5, 6), strict=True):  # param sets not run before (no run-cache entry)
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"train.epochs={epochs}", "-n", name)
    result = sh(repo, "dvc", "exp", "run", "--run-all", "-j", "2")
    assert "database is locked" not in result.stdout + result.stderr
    listed = sh(repo, "dvc", "exp", "list").stdout
    assert all(name in listed for name in names)
    client, runs = mlflow_runs(repo, "train_one_cycle")
    for name, epochs in zip(names, (5, 6), strict=True):
        [run] = [r for r in runs if r.data.tags.get("dvc.exp_name") == name]
        assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == str(epochs)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")]
        assert steps == list(range(1, epochs + 1)), name
        assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")}, "plot_reports found the run"
        assert run.info.run_name.startswith(f"{name} · w4 ") and f"{epochs} ep" in run.info.run_name
        assert f"DVC experiment: `{name}`" in run.data.tags["mlflow.note.content"]
    # the pick (budget) reads train.epochs: each experiment re-picked its own range, from the sweep that the
    # repository root keeps (DVC_ROOT: queued experiments share it), with no new sweep
    _, range_runs = mlflow_runs(repo, "lr_range_test")
    queued = [r for r in range_runs if r.data.tags.get("dvc.exp_name") in names]
    assert len(queued) == 2
    assert all("re-picked from the saved sweep" in r.data.tags["mlflow.note.content"] for r in queued)
    assert len({r.info.run_name for r in runs}) == len(runs), "every training run has a name of its own"
    # MLflow 3's Models view ranks the experiment's models by their linked test_acc; `make register BEST=1`
    # registers the first of them
    order = [{"field_name": "metrics.test_acc", "ascending": False}]
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = [runs[0].info.experiment_id]
    ranked = mlflow.search_logged_models(experiment_ids=experiment, order_by=order, output_format="list")
    accs = [next(m.value for m in model.metrics if m.key == "test_acc") for model in ranked]
    assert len(ranked) >= 3 and accs == sorted(accs, reverse=True)
    # the Models tab lists them by name: each experiment's model is named after it
    assert {f"resnet-w4-{name}" for name in names} <= {model.name for model in ranked}
    assert len({model.name for model in ranked}) == len(ranked)
    best = sh(repo, sys.executable, str(ROOT / "scripts" / "register_model.py"), "--best", "--name", "best-resnet")
    assert f"the best logged model: {ranked[0].model_id} of run {ranked[0].source_run_id}" in best.stdout
    assert "registered best-resnet version 1" in best.stdout


def test_dvc_queue_kill_ends_a_queued_experiment_s_run_killed(repo):
    sh(repo, "dvc", "exp", "run", "--queue", "-S", "train.epochs=40", "-n", "queued-killed")
    proc = subprocess.Popen(
        ["dvc", "exp", "run", "--run-all"], cwd=repo, env=sh_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id

    def the_run():
        found = client.search_runs([experiment], "tags.`dvc.exp_name` = 'queued-killed'")
        return found[0] if found else None

    deadline = time.time() + 300
    while not ((run := the_run()) and "test_acc" in run.data.metrics) and time.time() < deadline:
        time.sleep(0.5)
    assert run and proc.poll() is None, "the experiment is training"
    sh(repo, "dvc", "queue", "kill", "queued-killed")
    proc.wait(timeout=120)
    while the_run().info.status == "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
    assert the_run().info.status == "KILLED"
    assert "interrupted: nothing half-written was kept" in sh(repo, "dvc", "queue", "logs", "queued-killed").stdout

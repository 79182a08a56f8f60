"""device/: the one device call that runs the real `dvc repro` and times it (device/pipeline.py), tried at tiny size
on the CPU with this environment's own DVC, MLflow and albumentations (no wheels); its wheel list, session and grids."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from device import pipeline
from research import study

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["download_cifar", "lr_range_test", "train_one_cycle", "plot_reports"]


def test_run_times_each_stage_of_the_real_pipeline(small_archive, tmp_path):
    archive, md5 = small_archive
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "WHEELS": str(tmp_path / "no-wheels"),  # none: this interpreter's own packages, as `make test` has them
        "ARCHIVE": str(archive),
        "WIDTH": "2",
        "EPOCHS": "2",
        "BATCH": "64",
        "SET": "lr_finder.num_iter=10 lr_finder.start_lr=1e-3 train.peak_epoch=1 train.device=cpu",
        "REPEAT": "0",
        "BENCH": "0",  # make bench has its own tests
    }
    pipeline = [sys.executable, "-m", "device.pipeline"]
    done = subprocess.run(pipeline, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "h200-pipeline.json").read_text())

    # the contract's keys (docs/results/h200-pipeline.json), from one real `dvc repro` of the four stages
    assert list(record["stage_seconds"]) == STAGES and all(s > 0 for s in record["stage_seconds"].values())
    assert sum(record["stage_seconds"].values()) < record["repro_seconds"]  # DVC's own share on top
    download = record["stage_seconds"]["download_cifar"]
    assert record["after_download_seconds"] <= record["repro_seconds"] - download
    assert 0 < record["fit_seconds"] < record["stage_seconds"]["train_one_cycle"]
    assert 0 <= record["test_acc"] <= 100
    assert record["mfu"] > 0 and record["peak_tflops"]["datasheet"] == 989.0
    assert record["device"].startswith("cpu") and re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    assert record["command"].endswith("python3 -m device.pipeline") and "WIDTH=2" in record["command"]
    assert record["params"]["model.width"] == 2 and record["train_images"] == 600
    assert len(record["runs"]) == 1 and record["runs"][0]["exit_status"] == 0

    # the stages logged to MLflow's SQLite store at the checkout's root (MLFLOW_TRACKING_URI unset)
    assert "cifar10-one-cycle" in record["mlflow"]["experiments"] and record["mlflow"]["runs"] >= 2
    assert record["mlflow"]["store"] == str(tmp_path / "work" / "repo" / "mlflow.db")
    # a clean checkout with params.yaml pointed at the archive, and every stage's log kept
    params = yaml.safe_load((tmp_path / "work" / "repo" / "params.yaml").read_text())
    assert params["data"] == params["data"] | {"url": str(archive), "md5": md5}
    assert params["lr_finder"]["start_lr"] == 1e-3 and params["model"]["width"] == 2  # numbers, as DVC reads them
    log = (tmp_path / "out" / "pipeline.log").read_text()
    assert all(f"Running stage '{name}'" in log for name in STAGES)


def test_wheel_list_pins_one_version_each_as_pyproject_does():
    pins = {}
    for line in (ROOT / "device" / "wheels.txt").read_text().splitlines():
        pin = line.partition("#")[0].strip()
        if pin:
            name, _, version = pin.partition("==")
            key = re.sub(r"[-_.]+", "-", name.lower())
            assert version and key not in pins, f"{pin}: one pinned version each"
            pins[key] = version
    wanted = dict(re.findall(r'"([\w.-]+)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    assert pins["dvc"] == wanted["dvc"] and pins["albumentations"] == wanted["albumentations"]
    assert pins["mlflow-skinny"] == wanted["mlflow"]  # MLflow's Python package without the UI's JavaScript
    assert "torch" not in pins and "numpy" not in pins  # the device's own


def test_it_needs_the_results_folder_and_reads_set_as_dvc_exp_run_does(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    pipeline = [sys.executable, "-m", "device.pipeline"]
    no_out = subprocess.run(pipeline, cwd=ROOT, capture_output=True, text=True, env=env)
    assert no_out.returncode == 2 and "error: set OUT to the folder for the results" in no_out.stderr
    # SET is read as `dvc exp run -S` reads it (YAML 1.2: 1e-4 is a number), and checked before any work
    env |= {"OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "WHEELS": str(tmp_path / "none")}
    bad = subprocess.run(pipeline, cwd=ROOT, capture_output=True, text=True, env=env | {"SET": "train.seed"})
    assert bad.returncode == 2 and "override 'train.seed' is not KEY=VALUE" in bad.stderr
    assert not (tmp_path / "out").exists()


def test_set_is_read_as_dvc_exp_run_reads_it(monkeypatch):
    """YAML 1.2, as `dvc exp run -S`: 1e-4 is a number (yaml.safe_load, YAML 1.1, reads the string '1e-4')."""
    monkeypatch.setenv("WIDTH", "2")
    monkeypatch.setenv("SET", "lr_finder.start_lr=1e-4 'train.momentum=[0.9, 0.8]' train.device=cpu")
    assert pipeline.settings() == {
        "model.width": 2, "train.epochs": 24, "train.batch_size": 512,
        "lr_finder.start_lr": 1e-4, "train.momentum": [0.9, 0.8], "train.device": "cpu",
    }  # fmt: skip


def test_the_device_session_says_how_to_call_it_and_needs_the_results_folder():
    """device/session.sh (the shared device call of the accuracy and pipeline issues): its two steps are
    named, and `run` stops before any work without the results folder the device sets."""
    session = str(ROOT / "device" / "session.sh")
    usage = subprocess.run(["bash", session], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: bash device/session.sh prepare|run" in usage.stderr
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    no_out = subprocess.run(["bash", session, "run"], capture_output=True, text=True, env=env)
    assert no_out.returncode != 0 and "set OUT to the folder for the results" in no_out.stderr


def test_every_setting_of_the_device_accuracy_grid_is_valid_before_the_call():
    """A typo in the grid would cost a device call: every run it plans parses as params.yaml does."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    planned = {}
    for name in ("accuracy_seeds.yaml", "accuracy_grid.yaml"):
        shared, seeds, settings = study.read_grid(ROOT / "device" / name)
        planned[name] = study.plan_runs(base, shared, settings, seeds)
    # the comparison of the issue, 5 seeds each, runs first, so that a deadline cuts the grid and not it
    first = [r.setting.name for r in planned["accuracy_seeds.yaml"]]
    assert sorted(set(first)) == ["budget", "defaults"] and first.count("defaults") == first.count("budget") == 5

"""`make seeds` (python -m scripts.seeds) for real: DVC experiments in a temporary git repository, the real MLflow
SQLite store, at tiny size on the CPU."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_repo
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def sh(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default: mlflow.db at the repository root
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml: this one
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert not check or result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def seeds(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "scripts.seeds", *args, check=check)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, small_archive) -> Path:
    """The pipeline at the pipeline tests' tiny size, but width 8: the seeds below override it to 4."""
    return tiny_repo(tmp_path_factory.mktemp("seeds-repo"), small_archive, width=8)


@pytest.fixture(scope="module")
def two_seeds(repo) -> tuple[subprocess.CompletedProcess, bytes]:
    params_before = (repo / "params.yaml").read_bytes()
    return seeds(repo, "-n", "2", "-S", "model.width=4", "--group", "tiny"), params_before


def test_make_seeds_trains_each_seed_through_the_pipeline_and_writes_seeds_json(repo, two_seeds):
    done, params_before = two_seeds
    report = json.loads((repo / "reports/seeds.json").read_text())
    assert {"n", "median", "mean", "min", "max", "std", "device", "width", "runs"} <= report.keys()
    assert (report["n"], report["width"], report["group"], report["failed"]) == (2, 4, "tiny", [])
    assert report["device"].startswith("cpu") and report["overrides"] == {"model.width": 4}
    runs = report["runs"]
    assert [(r["seed"], r["exp_name"]) for r in runs] == [(0, "tiny-s0"), (1, "tiny-s1")]
    accs = [r["test_acc"] for r in runs]
    assert report["median"] == statistics.median(accs) and report["mean"] == pytest.approx(statistics.mean(accs))
    assert (report["min"], report["max"]) == (min(accs), max(accs))
    assert report["std"] == pytest.approx(statistics.stdev(accs))
    for r in runs:  # each seed ran its own range test
        assert 0 < r["lr_min"] < r["lr_max"] and r["lr_max"] / r["lr_min"] == pytest.approx(10)
    # the table
    for r in runs:
        assert f"{r['exp_name']}" in done.stdout and f"{r['test_acc']:.2f}%" in done.stdout
    assert "test_acc over 2 seeds: median" in done.stdout
    # DVC experiments, and the workspace left as it was
    listed = sh(repo, sys.executable, "-m", "dvc", "exp", "list").stdout
    assert "tiny-s0" in listed and "tiny-s1" in listed
    assert (repo / "params.yaml").read_bytes() == params_before


def test_the_seeds_training_runs_are_tagged_as_one_group_in_mlflow(repo, two_seeds):
    report = json.loads((repo / "reports/seeds.json").read_text())
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar10-one-cycle")
    group = client.search_runs([experiment.experiment_id], "tags.`seeds.group` = 'tiny'", order_by=["start_time ASC"])
    assert [r.info.run_id for r in group] == [r["mlflow_run_id"] for r in report["runs"]]
    for run, entry in zip(group, report["runs"], strict=True):
        assert run.data.tags["stage"] == "train_one_cycle" and run.data.tags["dvc.exp_name"] == entry["exp_name"]
        assert (run.data.tags["seeds.seed"], run.data.tags["seeds.n"]) == (str(entry["seed"]), "2")
        assert run.data.params["train.seed"] == str(entry["seed"]) and run.data.params["model.width"] == "4"
        assert run.data.metrics["test_acc"] == entry["test_acc"] and float(run.data.params["lr_max"]) == entry["lr_max"]


def test_the_study_tool_gives_the_pipelines_numbers(repo, two_seeds, tmp_path):
    """research/study.py makes the stages' library calls: seed 0 in its warm process equals the pipeline's run."""
    report = json.loads((repo / "reports/seeds.json").read_text())
    out = tmp_path / "study.json"
    sh(repo, sys.executable, "-m", "research.study", "--out", str(out), "-S", "model.width=4")
    [run] = json.loads(out.read_text())["runs"]
    pipeline = report["runs"][0]
    assert run["seed"] == 0 and (run["lr_min"], run["lr_max"]) == (pipeline["lr_min"], pipeline["lr_max"])
    assert (run["test_acc"], run["best_test_acc"]) == (pipeline["test_acc"], pipeline["best_test_acc"])


def test_a_failed_seed_exits_non_zero_after_writing_what_finished_and_bad_overrides_stop_first(repo):
    for override, message in (
        ("train.weight_decy=1", "unknown key train.weight_decy (did you mean 'weight_decay'?)"),
        ("data.train_limit=100", "-S data.train_limit: make seeds sets train.seed itself and trains on"),
    ):
        bad = seeds(repo, "-n", "1", "-S", override, check=False)
        assert bad.returncode == 2 and message in bad.stderr
        assert "dvc exp run" not in bad.stdout
    # an LR sweep from 10 to 20 passes the params check, and finds no range: the range-test stage fails
    sweep = ["-S", "lr_finder.start_lr=10", "-S", "lr_finder.end_lr=20", "-S", "model.width=4"]
    failed = seeds(repo, "-n", "1", *sweep, "--group", "bad", check=False)
    assert failed.returncode == 1
    report = json.loads((repo / "reports/seeds.json").read_text())
    assert report["n"] == 0 and report["runs"] == []
    [failure] = report["failed"]
    assert (failure["seed"], failure["exp_name"]) == (0, "bad-s0")
    assert failure["error"].startswith("dvc exp run exited with ")  # DVC's own status: 255
    assert "bad-s0" in failed.stdout and "FAILED" in failed.stdout


def test_make_lr_check_trains_the_found_range_times_each_factor_and_marks_the_pick(repo):
    params_before = (repo / "params.yaml").read_bytes()
    done = sh(repo, sys.executable, "-m", "scripts.lr_check", "--factors", "1,0.5", "--group", "lrc")
    found = json.loads((repo / "reports/lr_range.json").read_text())
    report = json.loads((repo / "reports/lr_check.json").read_text())
    assert report["found"]["lr_max"] == found["lr_max"] and report["failed"] == []
    assert [r["factor"] for r in report["runs"]] == [0.5, 1.0]  # in order of LRMAX
    for r in report["runs"]:
        assert r["lr_max"] == pytest.approx(found["lr_max"] * r["factor"])
        assert f"{r['test_acc']:6.2f}%" in done.stdout
    assert "<- found" in done.stdout and (repo / "reports/lr_check.png").stat().st_size > 10_000
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar10-one-cycle")
    runs = client.search_runs([experiment.experiment_id], "tags.`lr_check.group` = 'lrc'", order_by=["start_time ASC"])
    assert [r.info.run_id for r in runs] == [r["mlflow_run_id"] for r in report["runs"]]
    for run, entry in zip(runs, report["runs"], strict=True):
        assert float(run.data.params["train.lr_scale"]) == entry["factor"] == float(run.data.tags["lr_check.factor"])
        assert float(run.data.params["lr_max"]) == pytest.approx(entry["lr_max"])
    assert (repo / "params.yaml").read_bytes() == params_before
    bad = sh(repo, sys.executable, "-m", "scripts.lr_check", "--factors", "0,1", check=False)
    assert bad.returncode == 2 and "--factors '0,1': give distinct positive numbers" in bad.stderr

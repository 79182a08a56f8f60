"""The device checks behind the README's H200 figures still run: scripts/gpu_run.py, scripts/gpu_fresh.py and
scripts/bench.py at tiny sizes on the CPU, as they were tested before a GPU was lent. A device session gets
minutes, not the time to debug a script that rotted since."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_gpu_run_writes_every_phase(tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    out = tmp_path / "gpu_run.json"
    done = script(
        "gpu_run.py", "--archive", str(archive), "--md5", md5, "--out", str(out), "--width", "2", "--epochs", "3",
        "--batch-size", "32",
        "--workers", "1", "--variant", "short:num_iter=20", "--variant", "never:start_lr=10,end_lr=20",
        "--lr-max", "0.3", "--profile",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    sweeps = results["range_test"]
    assert sweeps["default"]["iterations"] == len(sweeps["default"]["curve"]) > 2
    assert sweeps["short"]["lr_finder"]["lr_finder.num_iter"] == 20 and len(sweeps["short"]["curve"]) <= 20
    assert "no range found" in sweeps["never"]["error"] or "never fell" in sweeps["never"]["error"]
    fast = results["fast"]
    assert [r["epoch"] for r in fast["history"]] == [1, 2, 3] and 0 <= fast["test_acc"] <= 100
    assert fast["seconds"] > 0 and fast["achieved_tflops"] > 0
    assert set(results["baseline"]) == {"workers_0", "workers_1"}
    assert results["fast_more"]["lr_max_0.3"]["lr_max"] == 0.3
    assert "steps of 32" in (tmp_path / "profile.txt").read_text()  # --batch-size


def test_gpu_fresh_trains_each_setting_in_its_own_process(tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    out = tmp_path / "fresh.json"
    common = [
        "--archive",
        str(archive),
        "--md5",
        md5,
        "--lr-max",
        "0.1",
        "--width",
        "2",
        "--epochs",
        "3",
        "--batch-size",
        "32",
    ]
    b = "b:channels_last=false,lr_max=2e-1,momentum=[0.9, 0.8],augment.backend=tensor"
    done = script("gpu_fresh.py", *common, "--out", str(out), "--setting", "a:", "--setting", b)
    assert done.returncode == 0, done.stderr[-2000:]
    settings = json.loads(out.read_text())["settings"]
    assert settings["b"]["train"]["channels_last"] is False and settings["b"]["train"]["momentum"] == [0.9, 0.8]
    assert settings["b"]["augment"] == {"backend": "tensor"} and "augment" not in settings["a"]
    assert (settings["a"]["lr_max"], settings["b"]["lr_max"]) == (0.1, 0.2)  # a setting's own LR range wins
    for result in settings.values():
        assert len(result["test_acc_by_epoch"]) == 3 and result["process_seconds"] > result["fit_seconds"] > 0
        assert 0 <= result["train_acc"] <= 100
        assert len(result["epoch_seconds"]) == 3 and sum(result["epoch_seconds"]) <= result["fit_seconds"]

    # a wrong setting stops before any training, naming the key
    bad = script("gpu_fresh.py", *common, "--setting", "x:cudnn_benchmark=maybe")
    assert bad.returncode != 0 and "train.cudnn_benchmark = 'maybe' is not allowed" in bad.stderr
    for value in ("-0.1", "fast"):
        bad = script("gpu_fresh.py", *common, "--setting", f"y:lr_max={value}")
        assert bad.returncode != 0 and "--setting y: lr_max must be a positive number, got" in bad.stderr


def test_gpu_fresh_keeps_the_other_settings_when_one_fails(tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    out = tmp_path / "fresh.json"
    # train.device: cuda passes the params check but fails in its process on a machine without CUDA
    failing = "cpu:" if torch.cuda.is_available() else "cuda:device=cuda"
    done = script(
        "gpu_fresh.py", "--archive", str(archive), "--md5", md5, "--lr-max", "0.1", "--width", "2", "--epochs", "3",
        "--batch-size", "32",
        "--out", str(out), "--setting", failing, "--setting", "after:",
    )  # fmt: skip
    settings = json.loads(out.read_text())["settings"]
    assert len(settings["after"]["test_acc_by_epoch"]) == 3  # the setting after the failure still ran
    if not torch.cuda.is_available():
        assert done.returncode != 0 and "these settings failed: cuda" in done.stderr
        assert "CUDA" in settings["cuda"]["error"]


def test_bench_runs_without_the_repro_timing(tmp_path):
    # as on a lent GPU machine, which has no DVC: every other figure is measured and written
    out = tmp_path / "bench.json"
    done = script("bench.py", "--out", str(out), "--width", "2", "--batch-size", "16", "--steps", "1", "--repeat", "1",
                  "--no-repro")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["noop_repro_seconds"] is None and "not measured" in done.stdout
    assert results["train_step"]["baseline_images_per_s"] > 0 and results["train_step"]["project_ratio"] > 0
    assert results["augmentation"]["batched_ratio"] > 0 and results["range_test"]["planned_images"] == 96 * 512


def test_device_check_says_how_to_call_it():
    """scripts/device_check.sh: its two steps are named, and `run` needs the results folder before any work."""
    script_path = str(ROOT / "scripts" / "device_check.sh")
    usage = subprocess.run(["bash", script_path], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: bash scripts/device_check.sh prepare|run" in usage.stderr
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    no_out = subprocess.run(["bash", script_path, "run"], capture_output=True, text=True, env=env)
    assert no_out.returncode != 0 and "set OUT to the folder for the results" in no_out.stderr

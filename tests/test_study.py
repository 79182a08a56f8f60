"""research/study.py (settings through the stages' library calls, one JSON), research/airbench_standin.py's
export and scripts/bench.py, at tiny sizes on the CPU: the device checks run these, and a device session gets minutes,
not the time to debug a script that rotted since."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from onecycle import data
from onecycle.config import parse_params
from onecycle.errors import UserError
from research import study

ROOT = Path(__file__).resolve().parents[1]


def script(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def params_file(tmp_path_factory, small_archive) -> Path:
    """params.yaml as shipped, at the tiny size of the pipeline tests (600 training images, width 4)."""
    archive, md5 = small_archive
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(url=str(archive), md5=md5)
    raw["model"]["width"] = 4
    raw["lr_finder"].update(num_iter=15, start_lr=1e-3, end_lr=1.0)
    raw["train"].update(epochs=2, peak_epoch=1, batch_size=64, device="cpu")
    path = tmp_path_factory.mktemp("study") / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def warm(params_file) -> tuple[dict, Path]:
    folder = params_file.parent
    done = script(
        "research.study", "--out", str(folder / "warm.json"), "--params", str(params_file),
        "--setting", "found: seeds=2",
        "--setting", "given: lr_max=0.05 lr_finder.min_div=5 'train.momentum=[0.9, 0.8]'",
        "--peak", "--profile", str(folder / "profile.txt"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "warm.json").read_text()), folder


def test_a_warm_study_runs_every_setting_and_seed_and_summarises_them(warm):
    results, folder = warm
    runs = results["runs"]
    # seed by seed through the settings: a deadline cut leaves every setting some seeds
    assert [(r["setting"], r["seed"]) for r in runs] == [("found", 0), ("given", 0), ("found", 1)]
    assert all(r["status"] == "ok" for r in runs)
    for r in runs:
        assert [e["epoch"] for e in r["history"]] == [1, 2]
        assert r["test_acc"] == r["history"][-1]["test_acc"] and r["train_acc"] == r["history"][-1]["train_acc"]
        assert r["best_test_acc"] == max(e["test_acc"] for e in r["history"])
        assert r["fit_seconds"] >= sum(e["seconds"] for e in r["history"]) > 0
        assert r["device"] == results["device"] and r["torch"] == torch.__version__ and r["commit"]
        assert r["achieved_tflops"] > 0 and r["flop_utilisation"]["measured_matmul"] > 0  # --peak

    found = [r for r in runs if r["setting"] == "found"]
    assert {r["seed"] for r in found} == {0, 1}
    for r in found:  # the range test ran first, and training used the range it found
        assert r["lr_found"] is True and r["lr_max"] == r["range_test"]["found"]["lr_max"]
        assert r["lr_max"] / r["lr_min"] == pytest.approx(10)  # lr_finder.min_div of params.yaml
        assert len(r["range_test"]["curve"]["loss"]) == r["range_test"]["found"]["iterations"] > 2

    given = runs[1]  # lr_max and the overrides reached training: it ends at LRMIN = 0.05 / 5 and momentum 0.9
    assert given["lr_found"] is False and "range_test" not in given
    assert given["overrides"] == {"lr_finder.min_div": 5, "train.momentum": [0.9, 0.8], "lr_max": 0.05}
    assert (given["lr_min"], given["lr_max"]) == (pytest.approx(0.01), 0.05)
    assert given["history"][-1]["lr"] == pytest.approx(0.01) and given["history"][-1]["momentum"] == 0.9

    accs = [r["test_acc"] for r in found]
    summary = results["summary"]["found"]
    assert (summary["n"], summary["skipped"], summary["failed"]) == (2, 0, 0)
    # in the format of reports/seeds.json (make seeds), as the studies under docs/ quote it
    assert (summary["device"], summary["width"]) == (results["device"], 4)
    assert [(e["seed"], e["test_acc"], e["lr_max"]) for e in summary["runs"]] == [
        (r["seed"], r["test_acc"], r["lr_max"]) for r in found
    ]
    assert summary["median"] == statistics.median(accs) and summary["mean"] == pytest.approx(statistics.mean(accs))
    assert (summary["min"], summary["max"]) == (min(accs), max(accs))
    assert summary["std"] == pytest.approx(statistics.stdev(accs))
    assert results["summary"]["given"]["n"] == 1 and results["summary"]["given"]["std"] is None

    assert results["mode"] == "warm" and results["peak_tflops"]["measured_matmul"] > 0
    assert "2 epochs of training.fit" in (folder / "profile.txt").read_text()
    assert results["profile"] == {"setting": "found", "seed": 0, "table": str(folder / "profile.txt")}


def test_fresh_processes_from_a_grid_file_give_the_warm_results_and_keep_going_past_a_failure(warm, params_file):
    warm_results, folder = warm
    grid = folder / "grid.yaml"
    grid.write_text(
        "set:\n  train.epochs: 2\n"  # as --params has it: a shared override, applied to every setting
        "settings:\n"
        # passes the params check, fails in its process on a machine without CUDA (and runs on one with it)
        "  - name: cuda\n    set: {train.device: cuda}\n"
        "  - name: given\n    set: {lr_max: 0.05, lr_finder.min_div: 5, train.momentum: [0.9, 0.8]}\n"
    )
    out = folder / "fresh.json"
    done = script("research.study", "--out", str(out), "--params", str(params_file), "--grid", str(grid), "--fresh")
    results = json.loads(out.read_text())
    runs = {r["setting"]: r for r in results["runs"]}
    assert results["mode"] == "fresh" and list(runs) == ["cuda", "given"]
    # a fresh process, the same library calls: the same numbers as the warm process, to the image
    fresh, same = runs["given"], warm_results["runs"][1]
    assert (fresh["seed"], fresh["lr_min"], fresh["lr_max"]) == (same["seed"], same["lr_min"], same["lr_max"])
    assert [e["test_acc"] for e in fresh["history"]] == [e["test_acc"] for e in same["history"]]
    assert fresh["process_seconds"] > fresh["setup"]["setup_seconds"] > fresh["setup"]["imports_seconds"] > 0
    assert fresh["process_seconds"] > fresh["fit_seconds"] and fresh["setup"]["data_load_seconds"] > 0
    if torch.cuda.is_available():
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode == 1 and runs["cuda"]["status"] == "failed"
        assert "train.device = 'cuda' but this machine has no CUDA device" in runs["cuda"]["error"]
        assert results["summary"]["cuda"]["failed"] == 1 and results["summary"]["given"]["n"] == 1


def test_a_wrong_setting_stops_the_study_before_any_work_naming_the_key(params_file, tmp_path):
    out = tmp_path / "never.json"
    bad = script(
        "research.study", "--out", str(out), "--params", str(params_file),
        "--setting", "ok: lr_max=0.1", "--setting", "typo: train.weight_decy=1e-3",
    )  # fmt: skip
    assert bad.returncode == 2 and not out.exists()
    assert "setting 'typo': params.yaml: unknown key train.weight_decy (did you mean 'weight_decay'?)" in bad.stderr

    base = yaml.safe_load(params_file.read_text())

    def plan(*texts: str, shared: dict | None = None, seeds=None) -> list:
        return study.plan_runs(base, shared or {}, [study.setting_from_text(t) for t in texts], seeds)

    with pytest.raises(UserError, match=r"setting 'w': params.yaml: train.weight_decay = 'x' is not allowed"):
        plan("w: train.weight_decay=x")
    with pytest.raises(UserError, match=r"setting 'p': params.yaml: train.peak_epoch = 2 is not allowed"):
        plan("p: seeds=3 train.peak_epoch=2")  # checked for every seed's params
    with pytest.raises(UserError, match=r"setting 'l': lr_max = -0.1 is not allowed: use a positive number"):
        plan("l: lr_max=-0.1")
    with pytest.raises(UserError, match=r"setting 's': seeds = \[1, 1\] is not allowed"):
        plan("s: seeds=[1,1]")
    with pytest.raises(UserError, match=r"setting 'b': give train.seed or seeds, not both"):
        plan("b: seeds=2 train.seed=4")
    with pytest.raises(UserError, match=r"two settings are named 'a'"):
        plan("a:", "a: lr_max=0.1")
    with pytest.raises(UserError, match=r"override train.epochs.x: train.epochs is a value \(2\), not a section"):
        plan("n: train.epochs.x=1")
    with pytest.raises(UserError, match=r"--setting 'no colon': write NAME: KEY=VALUE"):
        study.setting_from_text("no colon")
    grid = tmp_path / "grid.yaml"
    grid.write_text("settings:\n  - name: a\n    sets: {}\n")
    with pytest.raises(UserError, match=r"settings\[0\] must be a mapping of name, seeds \(optional\), set"):
        study.read_grid(grid)

    # values are read as `dvc exp run -S` reads them; seeds: a count or a list; train.seed alone runs once
    runs = plan("a: train.weight_decay=1e-3 'train.momentum=[0.9, 0.8]'", "b: train.seed=7", seeds=(0, 1))
    assert [(r.setting.name, r.seed) for r in runs] == [("a", 0), ("b", 7), ("a", 1)]
    assert runs[0].params == parse_params(
        base | {"train": base["train"] | {"weight_decay": 1e-3, "momentum": [0.9, 0.8], "seed": 0}}
    )
    assert [r.seed for r in plan("c: seeds=3")] == [0, 1, 2]


def test_past_the_deadline_every_run_is_skipped_and_recorded(params_file, tmp_path):
    out = tmp_path / "late.json"
    done = script(
        "research.study", "--out", str(out), "--params", str(params_file), "--seeds", "0,1", "--deadline", "0"
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(r["status"], r["seed"]) for r in results["runs"]] == [("skipped", 0), ("skipped", 1)]
    assert all("s left" in r["reason"] for r in results["runs"])
    assert results["summary"]["params"] == {
        "n": 0, "median": None, "mean": None, "min": None, "max": None, "std": None,
        "device": results["device"], "width": 4, "runs": [], "skipped": 2, "failed": 0,
    }  # fmt: skip


def test_airbench_export_is_what_its_loader_reads_and_no_cuda_skips_its_runs(params_file, tmp_path):
    folder = tmp_path / "export"
    done = script("research.airbench_standin", "--export", str(folder), "--params", str(params_file))
    assert done.returncode == 0, done.stderr[-3000:]
    dataset = data.prepare(parse_params(yaml.safe_load(params_file.read_text())).data, tmp_path / "d", progress=False)
    for name, split in (("train.pt", dataset.train), ("test.pt", dataset.test)):
        # as airbench's CifarLoader reads it (torch.load, weights only by default), before its permute to NCHW
        saved = torch.load(folder / "cifar10" / name, map_location="cpu")
        assert saved["images"].dtype == torch.uint8 and saved["images"].shape == (len(split.labels), 32, 32, 3)
        assert np.array_equal(saved["images"].numpy(), split.images)
        assert saved["labels"].dtype == torch.int64 and np.array_equal(saved["labels"].numpy(), split.labels)
        assert saved["classes"] == list(dataset.classes)

    if torch.cuda.is_available():
        pytest.skip("the airbench runs themselves are for the device call")
    out = tmp_path / "airbench.json"
    done = script("research.airbench_standin", "--out", str(out), "--params", str(params_file), "--seeds", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "airbench94 needs CUDA" in done.stdout
    results = json.loads(out.read_text())
    assert [(r["setting"], r["seed"], r["status"]) for r in results["runs"]] == [
        ("airbench94", 0, "skipped"),
        ("airbench94", 1, "skipped"),
    ]
    assert results["summary"]["airbench94"]["skipped"] == 2 and results["summary"]["airbench94"]["tta"]["n"] == 0


def test_bench_runs_without_the_repro_timing_and_times_the_decode_of_an_archive(tmp_path, small_archive):
    # as on a lent GPU machine, which has no DVC: every other figure is measured and written
    out = tmp_path / "bench.json"
    sizes = ["--width", "2", "--batch-size", "16", "--steps", "1", "--repeat", "1"]
    done = script("scripts.bench", "--out", str(out), *sizes, "--no-repro", "--decode", str(small_archive[0]))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["noop_repro_seconds"] is None and "not measured" in done.stdout
    assert results["train_step"]["baseline_images_per_s"] > 0 and results["train_step"]["project_ratio"] > 0
    # on the CPU, each step against a matrix product of its precision
    assert results["train_step"]["project_matmul_gflops"] > 0 and results["train_step"]["project_bf16_gflops"] > 0
    assert "its GFLOP/s against a 2048^3 float32 matrix product" in done.stdout
    assert results["augmentation"]["batched_ratio"] > 0 and results["range_test"]["planned_images"] == 96 * 512
    decoded = results["decode"]  # the download stage's work on the 600 + 200 images, best of 3
    assert decoded["images"] == 800 and decoded["repeat"] == 3 and "download_cifar's work on 800 images" in done.stdout
    parts = decoded["md5_seconds"] + decoded["decode_seconds"] + decoded["write_seconds"]
    assert decoded["seconds"] == pytest.approx(parts) and min(decoded["md5_seconds"], decoded["write_seconds"]) > 0


def test_make_profile_quick_splits_a_quick_run_into_its_phases_and_dvc_s_own_share(tmp_path, small_archive):
    """`make profile-quick`: make quick's `dvc exp run` in a new repository, each stage split into phases; the
    phases and DVC's share add up to the whole, and the steps are what the sweep and the training ran."""
    out = tmp_path / "profile.json"
    tiny = ["data.train_limit=null", "data.test_limit=null", "model.width=2", "train.batch_size=64"]
    tiny += ["train.epochs=2", "train.peak_epoch=1", "lr_finder.num_iter=10", "lr_finder.start_lr=0.001"]
    done = script("scripts.quick_profile", "--archive", str(small_archive[0]), "--out", str(out),
                  *(a for kv in tiny for a in ("-S", kv)))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["stages"]) == ["download_cifar", "lr_range_test", "train_one_cycle", "plot_reports"]
    for name, stage in result["stages"].items():
        assert stage["exit_status"] == 0 and stage["phases"]["imports"] > 0, name
        assert sum(stage["phases"].values()) <= stage["seconds"] * 1.01, name
    phases = {name: stage["phases"] for name, stage in result["stages"].items()}
    assert phases["lr_range_test"]["sweep steps"] > 0 and phases["train_one_cycle"]["training steps"] > 0
    assert phases["plot_reports"]["plots"] > 0 and phases["download_cifar"]["archive: md5, decode, write"] > 0
    in_stages = sum(stage["seconds"] for stage in result["stages"].values())
    assert result["dvc_seconds"] == pytest.approx(result["seconds"] - in_stages)
    assert result["ratio_to_steps"] == pytest.approx(result["seconds"] / result["steps_seconds"])
    assert "| imports |" in done.stdout and "DVC's own" in done.stdout and "x its steps" in done.stdout


def test_a_final_test_only_study_trains_the_same_and_tests_the_last_epoch_alone(warm, params_file, tmp_path):
    warm_results, _ = warm
    out = tmp_path / "final.json"
    done = script(
        "research.study", "--out", str(out), "--params", str(params_file), "--final-test-only",
        "--setting", "given: lr_max=0.05 lr_finder.min_div=5 'train.momentum=[0.9, 0.8]'",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = json.loads(out.read_text())["runs"]
    same = warm_results["runs"][1]  # the same setting and seed, tested after every epoch
    assert (run["test_acc"], run["train_acc"]) == (same["test_acc"], same["train_acc"])
    assert "history" not in run and run["test_images"] == 200

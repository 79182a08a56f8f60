"""The LR-finder benchmark (python -m research.lr_bench) at tiny size: its jobs, its resume, its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from onecycle import lr_finder, picks
from onecycle.config import LRFinderParams
from research import lr_bench, lr_report

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
set: {augment.backend: tensor}
seeds: [0]
fine: plain
fine2: true
settings:
  - name: tiny
    set: {data.train_limit: 256, model.width: 4, train.batch_size: 64, train.epochs: 2, train.peak_epoch: 1,
          lr_finder.num_iter: 12}
    grid: [0.05, 0.1]
"""


def bench(*args: str, module: str = "research.lr_bench") -> subprocess.CompletedProcess:
    env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def curve_of(result: dict) -> lr_finder.Curve:
    lr, loss, accuracy = (result["curve"][k] for k in ("lr", "loss", "accuracy"))
    smoothed = [lr_finder.smooth(v, LRFinderParams().smooth_beta) for v in (loss, accuracy)]
    return lr_finder.Curve(lr, loss, smoothed[0], accuracy, smoothed[1], result["stop_reason"], result["images_seen"])


def test_the_benchmark_runs_each_job_once_resumes_and_reports_every_rule(tmp_path, small_archive):
    config, out, cache = tmp_path / "bench.yaml", tmp_path / "out", tmp_path / "cache"
    config.write_text(CONFIG)
    common = ["--out", str(out), "--config", str(config)]
    first = bench("run", "--archive", str(small_archive[0]), "--cache", str(cache), *common)
    names = sorted(p.name for p in (out / "tiny").glob("*.json"))
    # the sweep, the grid, and the grid grown past whichever edge held the best
    assert "sweep-s0.json" in names and {"train-0.05-s0.json", "train-0.1-s0.json"} <= set(names)
    assert len(names) >= 4 and first.stdout.count(" start ") == len(names)  # each job ran once
    trained = [json.loads((out / "tiny" / n).read_text()) for n in names if n.startswith("train")]
    assert all(r["test_images"] == 200 and 0 <= r["test_acc"] <= 100 and r["threads"] == 1 for r in trained)
    sweep = json.loads((out / "tiny" / "sweep-s0.json").read_text())
    assert len(sweep["curve"]["lr"]) == len(sweep["curve"]["loss"]) > 2
    # the fine sweep around the sweep's lowest loss, and the second one around the fine one's, as the library sets them
    fine, fine2 = (json.loads((out / "tiny" / f"{kind}-s0.json").read_text()) for kind in ("fine", "fine2"))
    for around, inner in ((sweep, fine), (fine, fine2)):
        design = lr_finder.fine_params(LRFinderParams(), lr_finder.fine_anchor(curve_of(around), LRFinderParams()))
        assert inner["lr_finder"]["start_lr"] == design.start_lr and len(inner["curve"]["lr"]) == lr_finder.FINE_STEPS

    shares = bench("shares", "--out", str(out)).stdout  # the trained jobs' time in training.fit, from their set-up
    assert "trained jobs: training.fit is" in shares and "of a job's process" in shares

    # a rerun does nothing; a lost result is the one job it runs again
    assert " start " not in bench("run", "--archive", str(small_archive[0]), "--cache", str(cache), *common).stdout
    (out / "tiny" / "train-0.1-s0.json").unlink()
    again = bench("run", "--archive", str(small_archive[0]), "--cache", str(cache), *common).stdout
    assert again.count(" start ") == 1 and "start tiny/train-0.1-s0" in again

    table = bench("report", *common, module="research.lr_report").stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"w64_full", "tiny"}  # the H200's record beside the benchmark's settings
    assert "| budget |" in table and "| fastai_valley |" in table and "| lightning |" in table
    assert summary["w64_full"]["best"]["lr_max"] == 0.025
    assert (out / "tiny.png").stat().st_size > 10_000 and (out / "w64_full.png").stat().st_size > 10_000


def test_budget_s_committed_constants_are_what_the_fit_gives_on_the_committed_results(tmp_path):
    """No constant of the default rule is typed in by hand: `python -m research.lr_report fit` wrote them from the
    results under docs/results/lr_bench, and refitting those results gives them again."""
    settings = lr_report.all_settings(ROOT / "docs/results/lr_bench", lr_bench.CONFIG)
    group = lr_report.fitted(settings)
    assert len(group) >= 3 and "w64_full" in {s.name for s in group}
    power, reference = lr_report.fit_budget(group)
    assert (round(power, 4), round(reference, 1)) == (picks.BUDGET_POWER, picks.BUDGET_REFERENCE_STEPS)
    with_fine = [s for s in group if lr_report.fine_sweeps(s)]
    assert len(with_fine) >= 3 and round(lr_report.fit_fine(with_fine), 4) == picks.FINE_SCALE
    copy = tmp_path / "picks.py"
    copy.write_text(lr_report.PICKS.read_text())
    lr_report.write_fit(settings, copy)
    assert copy.read_text() == lr_report.PICKS.read_text(), "fit rewrites the lines between its marks alone"


def test_a_noisy_best_point_gets_the_first_later_seed_it_lacks_also_after_the_best_moved():
    """Seed 2 came while 0.0125 was the best; 0.025 is the best now, with seeds 0, 1 and 3: seed 2 trains there
    and beside it (a count of the best point's seeds would have skipped it)."""
    bench = lr_bench.Bench({}, (0, 1), (lr_bench.Setting("s", {}, (0.0125, 0.025, 0.05)),), ())
    accs = {(0.0125, 0): 50.0, (0.0125, 1): 52.0, (0.0125, 2): 49.0, (0.0125, 3): 50.0,
            (0.025, 0): 50.0, (0.025, 1): 56.0, (0.025, 3): 54.0, (0.05, 0): 48.0, (0.05, 1): 50.0}  # fmt: skip
    done = {f"train-{lr}-s{seed}": {"kind": "train", "lr_max": lr, "seed": seed, "test_acc": acc}
            for (lr, seed), acc in accs.items()}  # fmt: skip
    jobs = lr_bench.noise_seeds(bench, bench.settings[0], done, [0.0125, 0.025, 0.05])
    assert {(j.kind, j.seed, j.lr_max) for j in jobs} == {
        ("sweep", 2, None),
        ("train", 2, 0.0125),
        ("train", 2, 0.025),
        ("train", 2, 0.05),
    }
    done["train-0.025-s2"] = {"kind": "train", "lr_max": 0.025, "seed": 2, "test_acc": 55.0}
    still = lr_bench.noise_seeds(bench, bench.settings[0], done, [0.0125, 0.025, 0.05])
    assert ("sweep", 4) in {(j.kind, j.seed) for j in still}, "a standard error of 1.3: seed 4 next"
    for seed in range(4, lr_bench.MAX_SEEDS):  # seeds that keep it noisy, up to the cap
        done[f"train-0.025-s{seed}"] = {"kind": "train", "lr_max": 0.025, "seed": seed, "test_acc": 50.0 + seed % 2 * 6}
    assert lr_bench.noise_seeds(bench, bench.settings[0], done, [0.0125, 0.025, 0.05]) == [], "MAX_SEEDS: the cap"


def test_the_dropped_settings_table_gives_the_seeds_their_spread_would_need(tmp_path):
    """A setting dropped for noise stays on the page with its best point's spread and the seeds it would need."""
    accs = {(0.05, 0): 56.0, (0.05, 1): 44.0, (0.05, 2): 59.0, (0.025, 0): 50.0, (0.025, 1): 42.0, (0.025, 2): 52.0}
    (tmp_path / "w8").mkdir()
    for (lr, seed), acc in accs.items():
        record = {"kind": "train", "lr_max": lr, "seed": seed, "test_acc": acc}
        (tmp_path / "w8" / f"train-{lr}-s{seed}.json").write_text(json.dumps(record))
    row = lr_report.dropped_table(tmp_path).splitlines()[2]
    # the best mean is 0.05's 53.0; its seeds' standard deviation 7.94, error 4.58: (7.94 / 0.5) ** 2 = 252 seeds
    assert row == "| w8 | 0.05 | 53.00 | 3 | 7.94 | 4.58 | 253 |"

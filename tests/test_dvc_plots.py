"""The real `dvc plots show` on dvc.yaml's `plots:` and the templates in .dvc/plots/, with small outputs made here.

No pipeline run: the CSVs and PNGs are written in the layout the stages write, so this takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PLOTS
from matplotlib.figure import Figure

from onecycle import outputs, plots
from onecycle.lr_finder import CSV_COLUMNS
from onecycle.training import HISTORY_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this venv's dvc
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("plots_repo")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    reports = repo / "reports"
    history = [[e, 0.01 * e, 0.9, 2.0 / e, 30.0 + e, 2.1 / e, 28.0 + e, 1.0] for e in range(1, 9)]
    outputs.write_csv(reports / "history.csv", HISTORY_COLUMNS, history)
    # an exponential sweep from 1e-4 to 1, as lr_finder.step_mode exp writes it
    curve = [[i, 1e-4 * 10 ** (4 * i / 29), 2.3, 2.3 - i / 100, 10.0, 10.0] for i in range(30)]
    outputs.write_csv(reports / "lr_range.csv", CSV_COLUMNS, curve)
    for name in PLOTS:
        plots.save(Figure(figsize=(1, 1)), reports / "plots" / name)
    return repo


@pytest.fixture(scope="module")
def shown(repo) -> dict:
    return json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]


def _vega(shown: dict, plot_id: str) -> dict:
    (entry,) = shown[plot_id]
    assert entry["type"] == "vega"
    return entry["content"]


@pytest.mark.parametrize(
    ("plot_id", "x_title", "y_title"),
    [
        ("accuracy", "epoch", "accuracy (%)"),
        ("loss", "epoch", "loss (cross-entropy per image)"),
        ("lr", "epoch", "LR"),
        ("lr_range", "LR (log scale)", "loss (cross-entropy per image, smoothed)"),
    ],
)
def test_every_chart_has_axis_titles_with_units(shown, plot_id, x_title, y_title):
    encoding = _vega(shown, plot_id)["encoding"]
    assert (encoding["x"]["title"], encoding["y"]["title"]) == (x_title, y_title)


def test_train_and_test_curves_share_a_chart_and_epochs_tick_in_whole_numbers(shown):
    content = _vega(shown, "accuracy")
    assert {"train_acc", "test_acc"} <= {row["field"] for row in content["data"]["values"]}
    assert content["encoding"]["x"]["axis"]["tickMinStep"] == 1


def test_the_range_test_chart_has_a_log_lr_axis_over_the_whole_sweep(shown):
    content = _vega(shown, "lr_range")
    assert content["encoding"]["x"]["scale"]["type"] == "log"
    lrs = [float(row["lr"]) for row in content["data"]["values"]]
    # four decades: on a linear axis everything below LR 0.1 would sit in the first tenth of the width
    assert math.isclose(min(lrs), 1e-4) and math.isclose(max(lrs), 1.0)


def test_each_png_is_shown_once_under_a_title_that_says_what_it_is(shown):
    images = {plot_id: entries for plot_id, entries in shown.items() if entries[0]["type"] == "image"}
    by_file = {}
    for plot_id, (entry,) in images.items():
        assert entry["revisions"] == ["workspace"]
        by_file[Path(entry["url"]).name.removeprefix("workspace_reports_plots_")] = plot_id
    assert sorted(by_file) == sorted(PLOTS)
    for name, title in by_file.items():
        # DVC shows the plot id above the image: a sentence, then the file it came from
        assert title.endswith(f", {name}") and not title.startswith("reports/")
        assert len(title) > len(name) + 15


def test_dvc_yaml_names_every_png_the_plot_stage_writes():
    # dvc.yaml lists the PNGs one by one (for their titles): a new picture needs its own entry there
    written = set(re.findall(r'"(\w+\.png)"', (ROOT / "stages" / "plot_reports.py").read_text()))
    assert written == set(PLOTS)


def test_the_html_goes_to_dvc_plots_which_git_ignores(repo):
    dvc(repo, "plots", "show")
    assert (repo / "dvc_plots" / "index.html").is_file()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    assert "dvc_plots" not in status.stdout

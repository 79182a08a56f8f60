"""What a user sees in `mlflow ui`, in headless Chromium: `make browser-check` runs this (marker `browser`,
left out of `make test`: it needs Debian's chromium and the `browser` extra)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import browser_check

pytestmark = pytest.mark.browser


def test_the_runs_view_lists_the_training_runs_with_their_metrics_and_no_range_test_run(small_archive, tmp_path):
    pytest.importorskip("playwright", reason="pip install -e '.[browser]' (make browser-check does)")
    if not Path(browser_check.CHROMIUM).exists():
        pytest.skip(f"no {browser_check.CHROMIUM}: apt-get install chromium (make browser-check does)")
    path, md5 = small_archive
    repo = browser_check.make_repo(tmp_path / "work", {"url": str(path), "md5": md5})
    seen = browser_check.check(repo, tmp_path / "shots")

    assert seen.problems == []
    assert len(seen.run_names) == len(browser_check.RUNS) == len(set(seen.run_names)), "distinct training runs"
    assert all(name.startswith(tuple(browser_check.RUNS)) for name in seen.run_names), "named after the experiment"
    assert all(name in seen.runs_view for name in seen.run_names)
    assert seen.range_names and not any(name in seen.runs_view for name in seen.range_names)
    assert {"test_acc", "best_test_acc", "lr_max"} <= set(seen.runs_view.split())  # the shared view's columns
    assert all(metric in seen.charts_view.split() for metric in browser_check.CHART_METRICS)
    assert "range/lr" not in seen.charts_view
    shots = sorted(p.name for p in (tmp_path / "shots").iterdir())
    # MLflow 3's Models tab lists each run's model under a name of its own; the model's page shows its test_acc
    assert len(set(seen.model_names)) == len(seen.run_names) and all(n in seen.models_view for n in seen.model_names)
    assert "test_acc" in seen.model_view and "cifar10-test" in seen.model_view
    assert shots == ["charts.png", "compare.png", "model.png", "models.png", "run-metrics.png", "run.png", "runs.png"]
    assert all((tmp_path / "shots" / s).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for s in shots)

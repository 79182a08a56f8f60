"""MLflow tracking details that the stage tests do not reach: where runs go, their names, descriptions and
tags, the experiments' shared view, and a resumed experiment's name. A real SQLite store in each test."""

from __future__ import annotations

import getpass
import json

from mlflow.tracking import MlflowClient

from onecycle.errors import Terminated
from onecycle.mlflow_ui import VIEW_KEY, VIEW_TAG
from onecycle.tracking import EXPERIMENT, RANGE_EXPERIMENT, VIEW_COLUMNS, Tracker, model_name


def store(tmp_path, monkeypatch) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri, MlflowClient(uri)


def test_a_resumed_run_takes_the_name_of_the_experiment_that_finished_it(tmp_path, monkeypatch):
    uri, client = store(tmp_path, monkeypatch)
    monkeypatch.setenv("DVC_EXP_NAME", "killed-one")  # the experiment killed mid-training
    run_id = Tracker(tmp_path).start_run("train_one_cycle", {"train.epochs": 3}, {}, detail="w4 · seed 0").id
    assert client.get_run(run_id).info.run_name == "killed-one · w4 · seed 0"
    monkeypatch.setenv("DVC_EXP_NAME", "rerun")  # DVC's name for the rerun that resumes the checkpoint
    resumed = Tracker(tmp_path).start_run(
        "train_one_cycle", {"train.epochs": 3}, {}, run_id=run_id, detail="w4 · seed 0"
    )
    assert resumed.id == run_id and resumed.resumed
    run = client.get_run(run_id)
    assert run.info.run_name == "rerun · w4 · seed 0" and run.data.tags["dvc.exp_name"] == "rerun"
    assert run.data.tags["dvc.exp_name.resumed_from"] == "killed-one"
    assert run.data.params == {"train.epochs": "3"}  # params logged once, by the first attempt


def test_training_and_range_test_runs_live_in_their_own_experiments(tmp_path, monkeypatch):
    _, client = store(tmp_path, monkeypatch)
    monkeypatch.setenv("DVC_EXP_NAME", "first")
    ranges = Tracker(tmp_path, experiment=RANGE_EXPERIMENT)  # the range test runs first in a fresh store
    range_run = ranges.start_run("lr_range_test", {}, {}, detail="range test · w4").id
    training = Tracker(tmp_path)
    train_run = training.start_run("train_one_cycle", {}, {}, detail="w4 · seed 0").id

    by_name = {e.name: e.experiment_id for e in client.search_experiments()}
    assert by_name[EXPERIMENT] == "1", "the training experiment comes first in a fresh store"
    assert ranges.experiment_id == by_name[RANGE_EXPERIMENT] != by_name[EXPERIMENT] == training.experiment_id
    assert [r.info.run_id for r in client.search_runs([by_name[EXPERIMENT]])] == [train_run]
    assert [r.info.run_id for r in client.search_runs([by_name[RANGE_EXPERIMENT]])] == [range_run]
    assert client.get_run(range_run).info.run_name == "first · range test · w4"
    assert client.get_run(train_run).info.run_name == "first · w4 · seed 0"


def test_a_run_says_what_it_is_who_ran_it_and_from_which_stage(tmp_path, monkeypatch):
    _, client = store(tmp_path, monkeypatch)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)  # `dvc repro` or a bare stage: named by its start time
    tracker = Tracker(tmp_path)
    started = tracker.start_run("train_one_cycle", {}, {"data.md5": "x"}, detail="w4 · seed 1", note="**Training**")
    run = client.get_run(started.id)
    assert run.info.run_name.startswith("repro 20") and run.info.run_name.endswith(" · w4 · seed 1")
    assert run.data.tags["mlflow.source.name"] == "stages/train_one_cycle.py"  # "Source" in the UI
    assert run.data.tags["mlflow.user"] == getpass.getuser()  # "Created by"
    assert run.data.tags["mlflow.note.content"] == "**Training**"  # the description
    assert run.data.tags["stage"] == "train_one_cycle" and run.data.tags["data.md5"] == "x"
    started.set_note("**Test accuracy 91.40%**")
    assert client.get_run(started.id).data.tags["mlflow.note.content"] == "**Test accuracy 91.40%**"


def test_each_experiment_carries_a_shared_view_with_its_columns_also_when_it_existed_before(tmp_path, monkeypatch):
    uri, client = store(tmp_path, monkeypatch)
    old = client.create_experiment(EXPERIMENT)  # a store from before the shared view
    tracker = Tracker(tmp_path)
    assert tracker.experiment_id == old
    Tracker(tmp_path, experiment=RANGE_EXPERIMENT)
    for name in (EXPERIMENT, RANGE_EXPERIMENT):
        view = json.loads(client.get_experiment_by_name(name).tags[VIEW_TAG])
        assert view["selectedColumns"] == VIEW_COLUMNS[name]
    assert "metrics.`test_acc`" in VIEW_COLUMNS[EXPERIMENT] and "params.`lr_max`" in VIEW_COLUMNS[EXPERIMENT]
    assert tracker.runs_url() == (
        f"http://127.0.0.1:5000/#/experiments/{old}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    )


def test_a_run_held_with_with_ends_finished_failed_or_killed_and_says_why(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) and SIGTERM (Terminated, as errors.stage_main raises it) end the run KILLED."""
    _, client = store(tmp_path, monkeypatch)
    tracker = Tracker(tmp_path)
    for raised, status in (
        (None, "FINISHED"),
        (ValueError, "FAILED"),
        (KeyboardInterrupt, "KILLED"),
        (Terminated, "KILLED"),
    ):
        run = tracker.start_run("train_one_cycle", {}, {}, note="**Training**", stopped_note=lambda s: f"**{s}**")
        try:
            with run:
                if raised:
                    raise raised
        except BaseException as exc:
            assert isinstance(exc, raised), "the exception goes on to the stage's handler"
        ended = client.get_run(run.id)
        assert ended.info.status == status and ended.info.end_time, raised
        assert ended.data.tags["mlflow.note.content"] == ("**Training**" if status == "FINISHED" else f"**{status}**")


def test_a_logged_model_s_name_takes_the_width_and_the_run_s_label_in_letters_mlflow_accepts():
    from mlflow.utils.validation import _validate_logged_model_name

    labels = {
        "bally-cess": "resnet-w16-bally-cess",
        "lrc-x0.5": "resnet-w16-lrc-x0-5",  # make lr-check's experiments: MLflow refuses '.' in the name
        "repro 2026-12-05 14:03:21": "resnet-w16-repro-2026-12-05-14-03-21",
        "it's 50%: a/b": "resnet-w16-it-s-50-a-b",
    }
    for label, name in labels.items():
        assert model_name(16, label) == name
        _validate_logged_model_name(name)  # raises on a name MLflow would refuse

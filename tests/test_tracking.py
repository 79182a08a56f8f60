"""MLflow tracking details that the stage tests do not reach: a resumed experiment's name."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from onecycle.tracking import Tracker


def test_a_resumed_run_takes_the_name_of_the_experiment_that_finished_it(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "killed-one")  # the experiment killed mid-training
    run_id = Tracker(tmp_path).start_run("train_one_cycle", {"train.epochs": 3}, {})
    monkeypatch.setenv("DVC_EXP_NAME", "rerun")  # DVC's name for the rerun that resumes the checkpoint
    assert Tracker(tmp_path).start_run("train_one_cycle", {"train.epochs": 3}, {}, run_id=run_id) == run_id
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.run_name == "rerun" and run.data.tags["dvc.exp_name"] == "rerun"
    assert run.data.tags["dvc.exp_name.resumed_from"] == "killed-one"
    assert run.data.params == {"train.epochs": "3"}  # params logged once, by the first attempt

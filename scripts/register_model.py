"""`make register`: register the trained model in MLflow's Model Registry, as a new version of one name.

    python scripts/register_model.py [--name cifar10-custom-resnet] [--run RUN_ID | --best]

By default it registers the MLflow model of the run that trained the workspace's models/model.pt (found by the
file's sha256, as plot_reports finds it); --run names another training run, --best the logged model with the
highest test_acc of the training experiment (mlflow.search_logged_models). It registers that run's logged
model by its own URI (models:/<model id>), as MLflow 3 keeps it. Prints the version and its models:/ URI, which
`mlflow.pytorch.load_model` and `mlflow models serve` take.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow

from onecycle.errors import UserError, stage_main
from onecycle.tracking import Tracker, file_sha256

REGISTERED_NAME = "cifar10-custom-resnet"


def best_model(tracker: Tracker):
    """The training experiment's logged model of the highest final test_acc (None when there is none)."""
    order = [{"field_name": "metrics.test_acc", "ascending": False}]
    ranked = mlflow.search_logged_models(
        experiment_ids=[tracker.experiment_id], order_by=order, max_results=1, output_format="list"
    )
    return ranked[0] if ranked else None


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=REGISTERED_NAME, help=f"registered model name (default {REGISTERED_NAME})")
    parser.add_argument("--run", help="training run whose model to register (default: the run of --model)")
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"), help="the trained state_dict")
    parser.add_argument("--best", action="store_true", help="the experiment's logged model of highest test_acc")
    args = parser.parse_args()
    tracker = Tracker()  # an unreachable tracking server stops here
    mlflow.set_tracking_uri(tracker.uri)
    run_id, model_id = args.run, None
    if args.best:
        best = best_model(tracker)
        if best is None:
            raise UserError(f"no logged model in the experiment at {tracker.uri}: train first (`dvc repro`)")
        run_id, model_id = best.source_run_id, best.model_id
        acc = next(m.value for m in best.metrics if m.key == "test_acc")
        print(f"the best logged model: {model_id} of run {run_id}, test_acc {acc:.2f}%")
    elif run_id is None:
        if not args.model.exists():
            raise UserError(f"no {args.model}: train first (`dvc repro`), or name a run with RUN=<run id>")
        run = tracker.run_of_model(file_sha256(args.model))
        if run is None:
            raise UserError(f"no training run at {tracker.uri} produced {args.model}; name one with RUN=<run id>")
        run_id = run.id
    try:
        logged = [model_id] if model_id else [m.model_id for m in tracker.client.get_run(run_id).outputs.model_outputs]
        version = mlflow.register_model(f"models:/{logged[-1]}", args.name) if logged else None
    except Exception as exc:  # no such run, or a store that refuses
        raise UserError(f"cannot register the model of run {run_id}: {' '.join(str(exc).split())[:300]}") from None
    if version is None:
        raise UserError(f"run {run_id} logged no MLflow model (its training did not finish?)")
    print(f"registered {args.name} version {version.version} (run {run_id}): models:/{args.name}/{version.version}")


if __name__ == "__main__":
    main()

"""What MLflow's web UI (3.17) needs from the stages: links that open the training view, and a saved runs view.

Everything here rests on one MLflow version's UI internals, not on its API, so it is the first thing to check
when MLflow moves:
- The UI opens an experiment, and a run picked from its list, in its GenAI view ("Evaluations") unless the URL
  says `workflowType=machine_learning` (or the browser remembers the "Model training" toggle). The
  `mlflow.experimentKind` tag does not change that in 3.17: its UI reads the kind from the URL and the toggle.
- Its runs table shows no metric or param column until one is added, and keeps that choice per browser. A URL
  with `viewStateShareKey=K` loads the view stored in the experiment tag `mlflow.sharedViewState.K` (what its
  "Share" button writes): each experiment carries such a view with the columns that matter here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from mlflow.tracking import MlflowClient

VIEW_KEY = "onecycle"  # the shared view's key: ?viewStateShareKey=onecycle
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"  # the experiment tag that holds it
UI_PORT = 5000  # where `mlflow ui` listens by default (on 127.0.0.1)
RUN_NAME_WIDTH = 340  # pixels: the run-name column, wide enough for the names the stages give
TRAINING_VIEW = "workflowType=machine_learning"


def column(kind: str, name: str) -> str:
    """A runs-table column as the UI names it: column("metrics", "test_acc") is metrics.`test_acc`. The UI orders
    the selected columns metrics, then params, then tags, each alphabetically."""
    return f"{kind}.`{name}`"


def shared_view(columns: Sequence[str]) -> str:
    """The JSON the UI reads from the tag VIEW_TAG: these columns, and a run-name column RUN_NAME_WIDTH wide."""
    name_column = column("attributes", "Run Name")
    return json.dumps(
        {
            "selectedColumns": list(columns),
            "columnOrder": [name_column],  # the UI applies the widths only to the columns listed here
            "columnWidths": {name_column: RUN_NAME_WIDTH},
        }
    )


def store_view(client: MlflowClient, experiment_id: str, tags: Mapping[str, str], columns: Sequence[str]) -> None:
    """Store the experiment's shared view when it is missing or outdated (`tags`: the experiment's tags now)."""
    view = shared_view(columns)
    if tags.get(VIEW_TAG) != view:
        client.set_experiment_tag(experiment_id, VIEW_TAG, view)


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, else `mlflow ui` on this machine."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{UI_PORT}"


def runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs table, in the training view, with the shared view's columns."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}&viewStateShareKey={VIEW_KEY}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """One run's page in the training view (its metrics, params, datasets, model), not the GenAI one."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"

"""MLflow: a run per training, in a store that needs no server (a SQLite file beside the runs).

``mlflow ui --backend-store-uri sqlite:///RUNS/mlruns.db`` then lists and compares the runs. The
client API (``MlflowClient``) is used rather than MLflow's fluent one, whose active run is global
state that a notebook's own MLflow use would share.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from bonetumor.tracking.base import Tracker

STORE_NAME = "mlruns.db"  # the default store: a SQLite file in the folder that holds the run
ARTIFACTS_NAME = "mlartifacts"  # beside it: the runs' files (curves, checkpoints, reports)
# MLflow's limits per log_batch call: 100 params or tags, 1,000 metrics.
_BATCH = 100


def default_uri(run_path: Path) -> str:
    """``sqlite:///`` the store beside the run folder (in its parent)."""
    return f"sqlite:///{(run_path.resolve().parent / STORE_NAME).as_posix()}"


class MlflowTracker(Tracker):
    """One MLflow run: created by ``start``, or, with ``meta['record']``, an existing one that an
    evaluation or explanation adds to."""

    name = "mlflow"

    def __init__(self, uri: str):
        self.uri = uri
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.adding = False  # to a finished run: it stays finished

    def start(self, meta: dict) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # a new store's schema migration logs at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=self.uri)
        record = meta.get("record")
        if record:
            self.run_id, self.experiment_id = record["run_id"], record.get("experiment_id")
            self.adding = not meta.get("resume")  # a resumed training run is running again; an evaluation adds
            if not self.adding:
                self.client.update_run(self.run_id, status="RUNNING")
            return
        self.experiment_id = self._experiment(meta["experiment"])
        run = self.client.create_run(self.experiment_id, run_name=meta["run_name"], tags=meta.get("tags", {}))
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in meta.get("params", {}).items()]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _BATCH])
        if meta.get("config"):
            self.client.log_text(self.run_id, meta["config"], "config.yaml")
        if meta.get("parent_run_id"):
            self.client.log_batch(self.run_id, tags=[RunTag("mlflow.parentRunId", meta["parent_run_id"])])

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        store = self.uri[len("sqlite:///"):] if self.uri.startswith("sqlite:///") else None
        # A local store keeps the runs' files beside it, not in whatever folder the command ran from.
        where = (Path(store).parent / ARTIFACTS_NAME).as_uri() if store else None
        return self.client.create_experiment(name, artifact_location=where)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 10 * _BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 10 * _BATCH])

    def log_image(self, path: Path, tag: str) -> None:
        self.client.log_artifact(self.run_id, str(path), "/".join(["figures", *tag.split("/")[:-1]]))

    def log_file(self, path: Path, folder: str = "") -> None:
        self.client.log_artifact(self.run_id, str(path), folder or None)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def adopt(self, child: dict) -> None:
        """Show the run ``child`` (a record) under this one: a fold of this cross-validation."""
        if child.get("tracking_uri") == self.uri and child.get("run_id"):
            self.client.set_tag(child["run_id"], "mlflow.parentRunId", self.run_id)

    def record(self) -> dict:
        return {"tracker": self.name, "tracking_uri": self.uri, "run_id": self.run_id,
                "experiment_id": self.experiment_id}

    def close(self, status: str = "FINISHED") -> None:
        if self.client is not None and self.run_id is not None and not self.adding:
            self.client.set_terminated(self.run_id, status)

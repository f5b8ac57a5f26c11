"""Experiment tracking: a run's parameters, per-epoch metrics, figures and files in MLflow or
TensorBoard, where a lab lists and compares runs.

``create_tracker`` opens one for a training run (``--tracker``); its ``tracking.json`` in the run
folder lets ``evaluate``, ``explain``, ``cv`` and ``report`` add to the same MLflow run later
(``reopen``). Every call runs on a background thread and a failing store only warns (base.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bonetumor.errors import BonetumorError
from bonetumor.tracking.base import Background, Tracker, TrackingWarning

TRACKERS = ("auto", "none", "mlflow", "tensorboard")
RECORD = "tracking.json"

__all__ = ["Background", "RECORD", "TRACKERS", "Tracker", "TrackingWarning", "check_tracker", "claim_logs", "create_tracker", "reopen",
           "resolve_tracker"]


def resolve_tracker(name: str) -> str:
    """``auto``: mlflow when ``MLFLOW_TRACKING_URI`` is set (the user has a store), else none."""
    if name not in TRACKERS:
        raise BonetumorError(f"--tracker must be one of {', '.join(TRACKERS)}, not {name!r}")
    if name == "auto":
        return "mlflow" if os.environ.get("MLFLOW_TRACKING_URI") else "none"
    return name


def _check_installed(name: str) -> None:
    from importlib.util import find_spec

    module = {"mlflow": "mlflow", "tensorboard": "tensorboard"}[name]
    if find_spec(module) is None:
        raise BonetumorError(f"--tracker {name} needs the {module} package: pip install 'bonetumor[tracking]' "
                             f"(or pip install {module}), or use --tracker none")


def check_tracker(name: str) -> None:
    """Raise, before any work, when ``name`` is no tracker or its package is not installed."""
    name = resolve_tracker(name)
    if name != "none":
        _check_installed(name)


def create_tracker(name: str, run_path: Path, uri: str | None = None) -> Background | None:
    """A started-later tracker for the run in ``run_path`` (None for ``none``). MLflow's store:
    ``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///`` a file beside the run folder.

    Raises:
        BonetumorError: the tracker's package is not installed (before any training).
    """
    name = resolve_tracker(name)
    if name == "none":
        return None
    _check_installed(name)
    if name == "mlflow":
        from bonetumor.tracking.mlflow_store import MlflowTracker, default_uri

        return Background(MlflowTracker(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(run_path)))
    from bonetumor.tracking.tensorboard import LOG_DIR, TensorBoardTracker

    return Background(TensorBoardTracker(Path(run_path) / LOG_DIR))


def reopen(run_path: Path, own_path: Path | None = None) -> Background | None:
    """The tracker of the training run in ``run_path`` (its ``tracking.json``), to add to: its
    MLflow run itself; for TensorBoard, a log in ``own_path/tensorboard`` (the adding command's
    own folder, shown beside the run's). None when the run was not tracked or its record is gone."""
    try:
        record = json.loads((Path(run_path) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    name = record.get("tracker")
    try:
        _check_installed(name)
    except (BonetumorError, KeyError):
        return None
    if name == "mlflow":
        from bonetumor.tracking.mlflow_store import MlflowTracker

        tracker = Background(MlflowTracker(record["tracking_uri"]))
        tracker.start({"record": record})
        return tracker
    if own_path is None:
        return None
    from bonetumor.tracking.tensorboard import LOG_DIR, TensorBoardTracker

    tracker = Background(TensorBoardTracker(Path(own_path) / LOG_DIR))
    tracker.start({"tags": {"run": str(run_path)}})
    return tracker


def claim_logs(run) -> None:
    """Note the TensorBoard event files in ``run`` (a RunDir) in its record, once written, so that
    ``--overwrite`` removes them with the rest of the run."""
    from bonetumor.tracking.tensorboard import LOG_DIR

    logs = run.path / LOG_DIR
    if logs.is_dir():
        for f in sorted(logs.rglob("*")):
            if f.is_file():
                run.claim(f.relative_to(run.path).as_posix())


def flat_metrics(values: dict, prefix: str) -> dict[str, float]:
    """``{prefix}/{name}``: each number of a results dict, and of a ``{"value", "ci_low",
    "ci_high"}`` entry its value and interval (``name``, ``name_ci_low``, ``name_ci_high``)."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = float(v)
        elif isinstance(v, dict) and isinstance(v.get("value"), (int, float)):
            out[f"{prefix}/{k}"] = float(v["value"])
            for end in ("ci_low", "ci_high"):
                if isinstance(v.get(end), (int, float)):
                    out[f"{prefix}/{k}_{end}"] = float(v[end])
    return {k: v for k, v in out.items() if v == v}  # NaN (an AUC of one class) is no number to compare


def add_results(model_run: Path, own, label: str, metrics: dict[str, float], images=(), files=(),
                tags: dict | None = None) -> None:
    """Add a command's results (``own``: its RunDir) to the tracked run that trained the model in
    ``model_run``: numbers, images and files under ``label`` (``test``, ``external_NAME``,
    ``explain_NAME``). Nothing when that run was not tracked."""
    tracker = reopen(model_run, own.path)
    if tracker is None:
        return
    if tags:
        tracker.set_tags(tags)
    tracker.log_metrics(metrics)
    for name in images:
        if own.has(name):
            tracker.log_image(own / name, f"{label}/{Path(name).stem}")
    for name in files:
        if own.has(name):
            tracker.log_file(own / name, f"{label}/{Path(name).parent}".rstrip("/."))
    tracker.close()
    claim_logs(own)

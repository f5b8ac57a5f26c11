"""What a training run tells its tracker (``--tracker``): the config as params, the data's
fingerprint and the precision as tags, each epoch's row, and at the end the curves, the
validation ROC and confusion matrix, the records and the best checkpoint.

Rank 0 alone tracks. The tracker works on a background thread (tracking/base.py): the epoch loop
queues calls and goes on.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bonetumor.config import TrainConfig, config_to_dict
from bonetumor.files import RunDir
from bonetumor.tracking import Background, claim_logs, create_tracker


def experiment_name(cfg: TrainConfig) -> str:
    """The experiment a run belongs to: its data folder's (or manifest's) name."""
    source = cfg.data or cfg.manifest or cfg.train_dir or "data"
    p = Path(source)
    return (p.stem if p.suffix.lower() == ".csv" else p.resolve().name) or "data"


def source_commit() -> str | None:
    """bonetumor's git commit when it runs from a checkout (an editable install), else None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def start_tracking(cfg: TrainConfig, run: RunDir, resume: bool) -> Background | None:
    """The run's tracker, started (in the background), or None with ``--tracker none``. A resumed
    run continues the run its ``tracking.json`` names."""
    import yaml

    tracker = create_tracker(cfg.tracker, run.path, cfg.tracking_uri)
    if tracker is None:
        return None
    data = run.read_json(RunDir.DATA) or {}
    env = run.read_json(RunDir.ENVIRONMENT) or {}
    values = config_to_dict(cfg)
    tags = {"data_fingerprint": str(data.get("fingerprint", "")), "split_level": str(data.get("split_level", "")),
            "precision": cfg.precision, "backbone": cfg.backbone, "run_folder": str(run.path.resolve()),
            "bonetumor_version": str(env.get("packages", {}).get("bonetumor", ""))}
    commit = source_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tracker.start({"experiment": experiment_name(cfg), "run_name": run.path.name, "tags": tags,
                   "params": {k: "" if v is None else v for k, v in values.items()},
                   "config": yaml.safe_dump(values, sort_keys=False),
                   "record": run.read_json(RunDir.TRACKING) if resume else None, "resume": resume})
    return tracker


def epoch_metrics(row: dict, n_images: int) -> dict[str, float]:
    """A history row as the tracker's numbers: losses, accuracy, AUC, learning rate, the
    epoch's seconds and training images per second."""
    out = {k: float(v) for k, v in row.items() if k != "epoch" and v not in ("", None)}
    if row.get("seconds"):
        out["images_per_second"] = round(n_images / float(row["seconds"]), 2)
    return out


def keep_record(tracker: Background | None, run: RunDir) -> bool:
    """Write ``tracking.json`` once the tracker has started (its run id known); True when written."""
    record = tracker.ready_record() if tracker is not None else None
    if record:
        run.write_json(RunDir.TRACKING, record)
    return bool(record)


def finish_tracking(tracker: Background, run: RunDir, best_val, threshold: float | None, classes: list[str],
                    failed: bool = False) -> None:
    """The run's figures and files, then the tracker closed (waiting for its queue)."""
    if not failed:
        _validation_figures(run, best_val, threshold, classes)
        for name in (RunDir.CURVES, RunDir.VAL_ROC, RunDir.VAL_CONFUSION):
            if run.has(name):
                tracker.log_image(run / name, name.removesuffix(".png"))
        for name in (RunDir.CONFIG, RunDir.HISTORY, RunDir.DATA, RunDir.AUDIT, RunDir.OPERATING_POINT, RunDir.OOD):
            if run.has(name):
                tracker.log_file(run / name)
        if run.has(RunDir.BEST):
            tracker.log_file(run / RunDir.BEST, "checkpoint")
    tracker.close("FAILED" if failed else "FINISHED")
    keep_record(tracker, run)
    claim_logs(run)


def _validation_figures(run: RunDir, best_val, threshold: float | None, classes: list[str]) -> None:
    """The best epoch's validation ROC and confusion matrix at the chosen threshold (binary)."""
    if best_val is None or len(classes) != 2 or threshold is None or len(set(best_val.targets.tolist())) < 2:
        return
    import numpy as np
    from sklearn.metrics import confusion_matrix

    from bonetumor.evaluate.figures import plot_confusion, plot_roc

    p = best_val.probs[:, -1] if best_val.probs.ndim == 2 else best_val.probs
    run.save_figure(RunDir.VAL_ROC, plot_roc(best_val.targets, p, title="ROC (validation, best epoch)"))
    cm = confusion_matrix(best_val.targets, (p >= threshold).astype(int), labels=[0, 1])
    run.save_figure(RunDir.VAL_CONFUSION, plot_confusion(np.asarray(cm), classes,
                                                         f"Validation at threshold {threshold:.3f}"))


class RunTracker:
    """A training run's tracker as the epoch loop uses it."""

    def __init__(self, tracker: Background, run: RunDir, n_images: int):
        self.tracker, self.run, self.n_images = tracker, run, n_images
        self.recorded = False

    def epoch(self, row: dict) -> None:
        """One epoch's row (queued); ``tracking.json`` once the tracker's run exists."""
        self.tracker.log_metrics(epoch_metrics(row, self.n_images), int(row["epoch"]))
        self.recorded = self.recorded or keep_record(self.tracker, self.run)

    def finish(self, best_val, classes: list[str], failed: bool = False) -> None:
        op = self.run.read_json(RunDir.OPERATING_POINT) or {}
        finish_tracking(self.tracker, self.run, best_val, op.get("threshold"), classes, failed)


@contextmanager
def tracking(cfg: TrainConfig, run: RunDir, resume: bool, n_images: int, enabled: bool = True) -> Iterator[RunTracker | None]:
    """The run's ``RunTracker`` (None without a tracker, or when not ``enabled``: another rank);
    a run that stops on an error is marked FAILED in the tracker."""
    tracker = start_tracking(cfg, run, resume) if enabled else None
    if tracker is None:
        yield None
        return
    rt = RunTracker(tracker, run, n_images)
    try:
        yield rt
    except BaseException:
        rt.finish(None, [], failed=True)
        raise

"""Cross-validation: k folds, stratified by class and grouped by patient, out-of-fold predictions.

Each fold trains on the other folds (with its own validation part carved from them for early
stopping and the operating point) and predicts its held-out fold once, so every image gets
exactly one out-of-fold prediction from a model that never saw it or its patient. A test split
that the data set already has is left out of cross-validation altogether.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from bonetumor.config import TrainConfig, config_to_dict
from bonetumor.data.layouts import DatasetIndex
from bonetumor.data.splits import (
    assign_folds,
    assign_splits,
    groups_per_class,
    with_splits,
)
from bonetumor.errors import BonetumorError
from bonetumor.evaluate.metrics import (
    N_BOOT,
    binary_values,
    compute_metrics,
    multiclass_values,
)
from bonetumor.files import RunDir
from bonetumor.inference import open_model, predict_samples
from bonetumor.runtime import distributed as ranks
from bonetumor.train import console, fit, prepare_data

FOLD_METRICS = ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "brier", "ece")


def fold_indices(index: DatasetIndex, folds: int, seed: int) -> tuple[list, np.ndarray]:
    """(pooled samples, fold number per sample): everything but an existing test split."""
    pool = [dataclasses.replace(s, split=None) for s in index.samples if s.split != "test"]
    per_class = min(groups_per_class(pool).values())
    if folds < 2 or folds > per_class:
        raise BonetumorError(f"--folds {folds}: need 2 to {per_class} (patients or images of the smallest class)")
    return pool, assign_folds(pool, folds, seed)


def cross_validate(cfg: TrainConfig, out: str | Path, folds: int = 5, overwrite: bool = False, verbose: bool = True,
                   n_boot: int = N_BOOT) -> dict | None:
    """Train ``folds`` models and write ``out/fold_K/`` runs, ``oof_predictions.csv``,
    ``cv_folds.csv`` and ``cv.json`` (per-fold metrics, their mean and sd, pooled out-of-fold
    metrics with patient-level CIs).

    Under torchrun every rank trains each fold (DistributedDataParallel, as ``train``) and
    predicts its share of the held-out fold; rank 0 finds the data, writes and returns the
    result (None on the other ranks)."""
    main = ranks.join(cfg.device)
    verbose = verbose and main
    with ranks.together():  # bad options stop every rank of a torchrun job, with one line
        cfg.validate()
        RunDir(out).refuse_existing(overwrite, inputs=cfg.inputs)
    # rank 0 finds the data (--split-by cluster reads every image) and sends it, without the scan
    index = ranks.made_by_main(lambda: prepare_data(cfg), lambda index: dataclasses.replace(index, facts=None))
    with ranks.together():
        pool, fold = fold_indices(index, folds, cfg.seed)
    root = ranks.output_folder(out, overwrite, cfg.inputs)  # once the data are found: bad data leave no folder
    if main:
        root.write_yaml(RunDir.CONFIG, config_to_dict(cfg))
    rows, per_fold = [], []
    for k in range(folds):
        rows_k, summary = _run_fold(cfg, index, pool, fold, k, folds, root, overwrite, verbose)
        rows += rows_k
        per_fold.append(summary)
    ranks.close_distributed()
    if not main:
        return None
    result = _summarise(index, pool, per_fold, rows, folds, n_boot)
    prob_cols = [c for c in rows[0] if c == "probability" or c.startswith("p_")]
    root.write_csv(RunDir.OOF, ["path", "label", "patient_id", "fold", *prob_cols, "prediction"], rows)
    root.write_csv(RunDir.CV_FOLDS, ["fold", "n", "threshold", "best_epoch", *result["mean_sd"]], per_fold)
    root.write_json(RunDir.CV, result)
    _track(cfg, root, result, folds)
    return result


def _run_fold(cfg: TrainConfig, index: DatasetIndex, pool: list, fold: np.ndarray, k: int, folds: int, root: RunDir,
              overwrite: bool, verbose: bool) -> tuple[list[dict], dict]:
    """Train fold ``k`` and predict its held-out images: (their rows, the fold's metrics)."""
    held = [s for s, f in zip(pool, fold) if f == k]
    rest = assign_splits([s for s, f in zip(pool, fold) if f != k], cfg.val_fraction, 0.0, cfg.seed + k)
    fold_index = dataclasses.replace(index, samples=rest + with_splits(held, ["test"] * len(held)))
    if verbose:
        console.print(f"fold {k + 1}/{folds}: train {sum(s.split == 'train' for s in rest)}, "
                      f"valid {sum(s.split == 'valid' for s in rest)}, held out {len(held)}")
    res = fit(dataclasses.replace(cfg), root / f"fold_{k + 1}", overwrite=overwrite, verbose=verbose, index=fold_index)
    ck, device = open_model(res.run_dir / RunDir.BEST, cfg.device)
    preds = predict_samples(ck, held, device, cfg.batch_size, what=f"fold {k + 1} held-out" if verbose else None)
    vals = (binary_values(preds.targets, preds.probs, ck.threshold) if ck.task.binary
            else multiclass_values(preds.targets, preds.probs))
    summary = {"fold": k + 1, "n": len(held), "threshold": ck.threshold, "best_epoch": res.best_epoch,
               **{name: vals[name] for name in FOLD_METRICS if name in vals}}
    cols = ck.task.probability_columns()
    rows = [{"path": s.path, "label": s.label, "patient_id": s.patient_id or "", "fold": k + 1,
             **dict(zip(cols, (f"{v:.6f}" for v in np.atleast_1d(p)))), "prediction": ck.label_for(p)}
            for s, p in zip(held, preds.probs)]
    return rows, summary


def _summarise(index: DatasetIndex, pool: list, per_fold: list[dict], rows: list[dict], folds: int, n_boot: int) -> dict:
    """Per-fold metrics with their mean and sd, and the pooled out-of-fold metrics."""
    names = [n for n in FOLD_METRICS if n in per_fold[0]]
    summary = {n: {"mean": float(np.nanmean([f[n] for f in per_fold])), "sd": float(np.nanstd([f[n] for f in per_fold], ddof=1))}
               for n in names}
    classes = index.classes
    cols = [c for c in rows[0] if c == "probability" or c.startswith("p_")]
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([[float(r[c]) for c in cols] for r in rows])
    p = p[:, 0] if len(classes) == 2 else p
    g = [r["patient_id"] for r in rows] if all(r["patient_id"] for r in rows) else None
    # Pooled out-of-fold scores come from k models with k thresholds, so only the threshold-free
    # metrics are pooled; thresholded ones are in the per-fold table.
    full = compute_metrics(y, p, classes, 0.5, g, n_boot)
    pooled = {k: full[k] for k in ("n", "roc_auc", "pr_auc", "brier", "ece", "interval") if k in full}
    return {"folds": folds, "n_images": len(pool), "left_out_test_images": len(index.samples) - len(pool),
            "split_level": index.split_level, "per_fold": per_fold, "mean_sd": summary, "pooled_out_of_fold": pooled}


def _track(cfg: TrainConfig, root: RunDir, result: dict, folds: int) -> None:
    """With ``--tracker``: a run for the cross-validation (its summary and tables) in the folds'
    own store, each fold's run shown under it."""
    import yaml

    from bonetumor.tracking import claim_logs, create_tracker, flat_metrics
    from bonetumor.tracking.mlflow_store import default_uri
    from bonetumor.train.tracked import experiment_name

    tracker = create_tracker(cfg.tracker, root.path, cfg.tracking_uri or default_uri(root / "fold_1"))
    if tracker is None:
        return
    values = config_to_dict(cfg)
    tracker.start({"experiment": experiment_name(cfg), "run_name": root.path.name, "tags": {"cv_folds": str(folds)},
                   "params": {k: "" if v is None else v for k, v in {**values, "folds": folds}.items()},
                   "config": yaml.safe_dump(values, sort_keys=False)})
    tracker.log_metrics(flat_metrics(result["pooled_out_of_fold"], "cv/pooled")
                        | {f"cv/{k}_{s}": v[s] for k, v in result["mean_sd"].items() for s in ("mean", "sd") if v[s] == v[s]})
    for name in (RunDir.CV, RunDir.CV_FOLDS, RunDir.OOF):
        tracker.log_file(root / name)
    for k in range(folds):
        child = RunDir(root / f"fold_{k + 1}").read_json(RunDir.TRACKING)
        if child:
            tracker.adopt(child)
    tracker.close()
    record = tracker.ready_record()
    if record:
        root.write_json(RunDir.TRACKING, record)
    claim_logs(root)

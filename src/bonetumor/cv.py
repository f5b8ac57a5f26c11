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
import torch
from bonetumor.config import TrainConfig, save_config
from bonetumor.data.datasets import DatasetIndex, ImageDataset, with_splits
from bonetumor.checkpoint import load_checkpoint
from bonetumor.data.splits import assign_folds, assign_splits, groups_per_class
from bonetumor.data.transforms import create_transforms
from bonetumor.errors import BonetumorError
from bonetumor.evaluate import compute_metrics, predict_loader
from bonetumor.metrics import N_BOOT, binary_values, multiclass_values
from bonetumor.train import console, fit, prepare_data
from bonetumor.utils import atomic_write_csv, atomic_write_json, prepare_out_dir, select_device

FOLD_METRICS = ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "brier", "ece")


def fold_indices(index: DatasetIndex, folds: int, seed: int) -> tuple[list, np.ndarray]:
    """(pooled samples, fold number per sample): everything but an existing test split."""
    pool = [dataclasses.replace(s, split=None) for s in index.samples if s.split != "test"]
    per_class = min(groups_per_class(pool).values())
    if folds < 2 or folds > per_class:
        raise BonetumorError(f"--folds {folds}: need 2 to {per_class} (patients or images of the smallest class)")
    return pool, assign_folds(pool, folds, seed)


def cross_validate(cfg: TrainConfig, out: str | Path, folds: int = 5, overwrite: bool = False, verbose: bool = True,
                   n_boot: int = N_BOOT) -> dict:
    """Train ``folds`` models and write ``out/fold_K/`` runs, ``oof_predictions.csv``,
    ``cv_folds.csv`` and ``cv.json`` (per-fold metrics, their mean and sd, pooled out-of-fold
    metrics with patient-level CIs)."""
    cfg.validate()
    root = prepare_out_dir(out, overwrite=overwrite)
    index = prepare_data(cfg)
    pool, fold = fold_indices(index, folds, cfg.seed)
    save_config(cfg, root / "config.yaml")
    device = select_device(cfg.device)
    binary = len(index.classes) == 2
    prob_cols = ["probability"] if binary else [f"p_{c}" for c in index.classes]
    rows, per_fold = [], []
    for k in range(folds):
        held = [s for s, f in zip(pool, fold) if f == k]
        rest = assign_splits([s for s, f in zip(pool, fold) if f != k], cfg.val_fraction, 0.0, cfg.seed + k)
        fold_index = dataclasses.replace(index, samples=rest + with_splits(held, ["test"] * len(held)))
        if verbose:
            console.print(f"fold {k + 1}/{folds}: train {sum(s.split == 'train' for s in rest)}, "
                  f"valid {sum(s.split == 'valid' for s in rest)}, held out {len(held)}")
        res = fit(dataclasses.replace(cfg), root / f"fold_{k + 1}", overwrite=overwrite, verbose=verbose, index=fold_index)
        ck = load_checkpoint(res.run_dir / "best.pt", device)
        tf = create_transforms(False, ck.image_size, mean=ck.mean, std=ck.std)
        loader = torch.utils.data.DataLoader(ImageDataset(held, ck.classes, tf), batch_size=cfg.batch_size, shuffle=False)
        preds = predict_loader(ck.model, loader, device)
        vals = binary_values(preds.targets, preds.probs, ck.threshold) if binary else multiclass_values(preds.targets, preds.probs)
        per_fold.append({"fold": k + 1, "n": len(held), "threshold": ck.threshold, "best_epoch": res.best_epoch,
                         **{name: vals[name] for name in FOLD_METRICS if name in vals}})
        for i, p in zip(preds.indices, preds.probs):
            s = held[i]
            rows.append({"path": s.path, "label": s.label, "patient_id": s.patient_id or "", "fold": k + 1,
                         **dict(zip(prob_cols, (f"{v:.6f}" for v in np.atleast_1d(p)))), "prediction": ck.label_for(p)})
    names = [n for n in FOLD_METRICS if n in per_fold[0]]
    summary = {n: {"mean": float(np.nanmean([f[n] for f in per_fold])), "sd": float(np.nanstd([f[n] for f in per_fold], ddof=1))}
               for n in names}
    classes = index.classes
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([[float(r[c]) for c in prob_cols] for r in rows])
    p = p[:, 0] if binary else p
    g = [r["patient_id"] for r in rows] if all(r["patient_id"] for r in rows) else None
    # Pooled out-of-fold scores come from k models with k thresholds, so only the threshold-free
    # metrics are pooled; thresholded ones are in the per-fold table.
    full = compute_metrics(y, p, classes, 0.5, g, n_boot)
    pooled = {k: full[k] for k in ("n", "roc_auc", "pr_auc", "brier", "ece", "interval") if k in full}
    result = {"folds": folds, "n_images": len(pool), "left_out_test_images": len(index.samples) - len(pool),
              "split_level": "patient" if index.patient_level else "image", "per_fold": per_fold,
              "mean_sd": summary, "pooled_out_of_fold": pooled}
    atomic_write_csv(root / "oof_predictions.csv", ["path", "label", "patient_id", "fold", *prob_cols, "prediction"], rows)
    atomic_write_csv(root / "cv_folds.csv", ["fold", "n", "threshold", "best_epoch", *names], per_fold)
    atomic_write_json(root / "cv.json", result)
    return result

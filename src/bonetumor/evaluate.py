"""Evaluation: predictions over a whole split, metrics (scikit-learn), figures and tables.

The original computed its ROC curve from the first few batches only; here every image of the
split is predicted once, in order, and every figure comes from those same predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn import metrics as skm

from bonetumor.errors import BonetumorError
from bonetumor.metrics import N_BOOT, binary_values, multiclass_values, patient_scores, roc_band, with_intervals
from bonetumor.utils import atomic_write_csv, atomic_write_json, atomic_write_text


@dataclass
class Predictions:
    """Model outputs over a loader: probs is P(positive) (N,) for binary, else (N, C)."""

    probs: np.ndarray
    targets: np.ndarray
    indices: np.ndarray
    loss: float = float("nan")
    logits: np.ndarray | None = None  # (N,) for one logit, else (N, C)

    def accuracy(self, threshold: float = 0.5) -> float:
        pred = (self.probs >= threshold).astype(int) if self.probs.ndim == 1 else self.probs.argmax(1)
        return float((pred == self.targets).mean()) if len(pred) else float("nan")


def loss_target(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Targets in the form the loss wants: float (N, 1) for one logit, class indices otherwise."""
    return y.float().view_as(logits) if logits.shape[1] == 1 else y


@torch.inference_mode()
def predict_loader(model: torch.nn.Module, loader, device: torch.device, loss_fn=None,
                   dtype: torch.dtype | None = None) -> Predictions:
    """Run ``model`` (eval mode, autocast to ``dtype`` if given) over every batch of ``loader``;
    mean loss if ``loss_fn`` is given."""
    model.eval()
    probs, targets, indices, raw, total = [], [], [], [], 0.0
    for x, y, idx in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).float()
        if loss_fn is not None:
            total += loss_fn(logits, loss_target(logits, y.to(device))).item() * len(y)
        p = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, 1)
        probs.append(p.cpu().numpy())
        raw.append((logits[:, 0] if logits.shape[1] == 1 else logits).cpu().numpy())
        targets.append(y.numpy())
        indices.append(np.asarray(idx))
    n = sum(len(t) for t in targets)
    cat = (lambda a: np.concatenate(a) if a else np.zeros(0))
    return Predictions(cat(probs), cat(targets).astype(int), cat(indices).astype(int), total / n if n else float("nan"),
                       cat(raw))


def binary_auc(targets: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC, or NaN when only one class is present (undefined, not an error)."""
    if probs.ndim != 1 or len(np.unique(targets)) < 2:
        return float("nan")
    return float(skm.roc_auc_score(targets, probs))


def compute_metrics(targets: np.ndarray, probs: np.ndarray, classes: Sequence[str], threshold: float = 0.5,
                    groups: Sequence | None = None, n_boot: int = N_BOOT) -> dict:
    """Every metric as ``{"value", "ci_low", "ci_high"}`` (95% bootstrap over patients when
    ``groups`` are given, else over images), the confusion matrix and a classification report.

    Binary: positive = ``classes[-1]``, predicted positive when P >= threshold; with groups also
    per-patient metrics (a patient's score is the max, or the mean, of its images').
    """
    targets = np.asarray(targets).astype(int)
    unit = "patient" if groups is not None else "image"
    if probs.ndim == 1:
        pred = (probs >= threshold).astype(int)
        out = {"n": len(targets), "n_positive": int(targets.sum()), "n_negative": int((targets == 0).sum()),
               "positive_class": classes[-1], "threshold": float(threshold)}
        out.update(with_intervals(lambda t, p: binary_values(t, p, threshold), targets, probs, groups, n_boot))
        if threshold != 0.5:
            # The chosen operating point beside the naive one, so a reader sees what the choice did.
            at_half = binary_values(targets, probs, 0.5)
            out["at_threshold_0.5"] = {k: at_half[k] for k in ("accuracy", "balanced_accuracy", "sensitivity",
                                                                "specificity", "ppv", "npv", "f1")}
        if groups is not None:
            out["n_patients"] = len(set(groups))
            out["per_patient"] = {}
            for how in ("max", "mean"):
                t, p = patient_scores(targets, probs, groups, how)
                out["per_patient"][how] = with_intervals(lambda a, b: binary_values(a, b, threshold), t, p, None, n_boot)
    else:
        pred = probs.argmax(1)
        out = {"n": len(targets)}
        out.update(with_intervals(multiclass_values, targets, probs, groups, n_boot))
    out["interval"] = {"level": 0.95, "resamples": n_boot, "unit": unit, "method": "percentile bootstrap"}
    cm = skm.confusion_matrix(targets, pred, labels=list(range(len(classes))))
    out["confusion_matrix"] = {"labels": list(classes), "matrix": cm.tolist()}
    out["classification_report"] = skm.classification_report(
        targets, pred, labels=list(range(len(classes))), target_names=list(classes), zero_division=0, digits=4)
    return out


def evaluate(checkpoint: str | Path, data: str | None = None, out: str | Path = "eval", split: str = "test", *,
             manifest: str | None = None, device: str = "auto", batch_size: int | None = None,
             workers: int = 0, overwrite: bool = False, skip_bad_files: bool = False, baseline: bool = True,
             n_boot: int = N_BOOT) -> dict:
    """Evaluate a checkpoint on one split of a data set and write the results to ``out``.

    Writes metrics.json (each metric with a 95% bootstrap CI), classification_report.txt,
    predictions.csv, roc.png (with CI band), pr.png, reliability.png, scores.png and
    confusion_matrix.png. The split is rebuilt exactly as in training (same seed and fractions).
    With ``baseline``, metrics.json also holds ``memorisation_baseline``: a 1-nearest-neighbour
    look-up on grey thumbnails of the training split, scored on the same images.

    Returns:
        The metrics dict (also in metrics.json).
    """
    from bonetumor.checkpoint import load_checkpoint
    from bonetumor.data.datasets import ImageDataset, check_files, discover
    from bonetumor.data.splits import assign_splits
    from bonetumor.data.transforms import create_transforms
    from bonetumor.plots import plot_confusion, plot_pr, plot_reliability, plot_roc, plot_score_hist
    from bonetumor.utils import prepare_out_dir, select_device

    split = {"val": "valid", "validation": "valid"}.get(split, split)
    if split not in ("train", "valid", "test"):
        raise BonetumorError(f"--split must be train, valid or test, not {split!r}")
    dev = select_device(device)
    ck = load_checkpoint(checkpoint, dev)
    cfg = ck.config
    outdir = prepare_out_dir(out, overwrite=overwrite)
    index = discover(data, manifest, None, None, None, classes=ck.classes)
    all_samples = assign_splits(index.samples, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    samples = [s for s in all_samples if s.split == split]
    if not samples:
        raise BonetumorError(f"{data or manifest}: no images in the {split} split")
    samples, skipped = check_files(samples, skip_bad_files)
    tf = create_transforms(False, ck.image_size, mean=ck.mean, std=ck.std)
    loader = torch.utils.data.DataLoader(ImageDataset(samples, ck.classes, tf), batch_size=batch_size or cfg.batch_size,
                                         shuffle=False, num_workers=workers)
    preds = predict_loader(ck.model, loader, dev)
    ordered = [samples[i] for i in preds.indices]
    groups = [s.patient_id for s in ordered] if all(s.patient_id for s in ordered) else None
    m = compute_metrics(preds.targets, preds.probs, ck.classes, ck.threshold, groups, n_boot)
    m.update({"split": split, "checkpoint": str(checkpoint), "skipped_files": len(skipped)})
    if baseline:
        from bonetumor.data.audit import split_baseline

        # Look-up alone, on the same split: when it comes near the model, the split measures memory.
        b = split_baseline(all_samples, split, ck.classes)
        if b is not None:
            m["memorisation_baseline"] = b
    report = m.pop("classification_report")
    atomic_write_json(outdir / "metrics.json", m)
    atomic_write_text(outdir / "classification_report.txt", report)
    prob_cols = ["probability"] if preds.probs.ndim == 1 else [f"p_{c}" for c in ck.classes]
    rows = ({"path": samples[i].path, "label": samples[i].label, "prediction": ck.label_for(p),
             **dict(zip(prob_cols, (f"{v:.6f}" for v in np.atleast_1d(p))))}
            for i, p in zip(preds.indices, preds.probs))
    atomic_write_csv(outdir / "predictions.csv", ["path", "label", *prob_cols, "prediction"], rows)
    if preds.probs.ndim == 1:
        t, p = preds.targets, preds.probs
        auc = m["roc_auc"]
        plot_roc(t, p, outdir / "roc.png", title=f"ROC ({split}, n={m['n']})", band=roc_band(t, p, groups, n_boot),
                 auc_ci=(auc["ci_low"], auc["ci_high"]))
        plot_pr(t, p, outdir / "pr.png", title=f"Precision-recall ({split})")
        plot_reliability(t, p, outdir / "reliability.png", m["ece"]["value"], title=f"Reliability ({split})")
        plot_score_hist(t, p, ck.classes, outdir / "scores.png", ck.threshold, title=f"Scores per class ({split})")
    plot_confusion(np.array(m["confusion_matrix"]["matrix"]), ck.classes, outdir / "confusion_matrix.png",
                   title=f"Confusion matrix at threshold {ck.threshold:.3f}" if preds.probs.ndim == 1 else "Confusion matrix")
    m["classification_report"] = report
    return m

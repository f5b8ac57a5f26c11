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

from bonetumor.batchnorm import inference_folded
from bonetumor.errors import BonetumorError
from bonetumor.metrics import N_BOOT, binary_values, multiclass_values, patient_scores, roc_band, with_intervals
from bonetumor.utils import atomic_write_csv, atomic_write_json, atomic_write_text, to_device


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
    with inference_folded(model):
        for x, y, idx in loader:
            x = to_device(x, device)
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


def parse_class_map(text: str | None) -> dict[str, str] | None:
    """``malignant=cancer,normal=normal`` → {"malignant": "cancer", "normal": "normal"}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        src, eq, dst = part.partition("=")
        if not eq or not src.strip() or not dst.strip():
            raise BonetumorError(f"--class-map {text!r}: write it as theirs=ours,theirs=ours (e.g. malignant=cancer)")
        out[src.strip()] = dst.strip()
    return out


def _select(data, manifest, ck, split: str, class_map: dict[str, str] | None):
    """(all samples with splits, the samples to evaluate, classes dropped by the map and their counts)."""
    from dataclasses import replace

    from bonetumor.data.datasets import discover
    from bonetumor.data.splits import assign_splits

    cfg = ck.config
    index = discover(data, manifest, None, None, None, classes=None if class_map else ck.classes, options=ck.read_options)
    samples, dropped = index.samples, {}
    if class_map:
        bad = sorted(set(class_map.values()) - set(ck.classes))
        if bad:
            raise BonetumorError(f"--class-map maps to {bad}, which are not the model's classes {ck.classes}")
        for s in samples:
            if s.label not in class_map:
                dropped[s.label] = dropped.get(s.label, 0) + 1
        samples = [replace(s, label=class_map[s.label]) for s in samples if s.label in class_map]
    if split == "all":
        return samples, list(samples), dropped
    all_samples = assign_splits(samples, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return all_samples, [s for s in all_samples if s.split == split], dropped


def evaluate(checkpoint: str | Path, data: str | None = None, out: str | Path = "eval", split: str = "test", *,
             manifest: str | None = None, device: str = "auto", batch_size: int | None = None,
             workers: int = 0, overwrite: bool = False, skip_bad_files: bool = False, baseline: bool = True,
             n_boot: int = N_BOOT, class_map: dict[str, str] | None = None, external: bool = False,
             exclude_near_duplicates_of: str | None = None) -> dict:
    """Evaluate a checkpoint on one split of a data set and write the results to ``out``.

    Writes metrics.json (each metric with a 95% bootstrap CI), classification_report.txt,
    predictions.csv, roc.png (with CI band), pr.png, reliability.png, scores.png and
    confusion_matrix.png. The split is rebuilt exactly as in training (same seed and fractions);
    ``split="all"`` takes every image (for an external data set).

    Args:
        baseline: also score a 1-nearest-neighbour look-up on the training split's thumbnails
            (``memorisation_baseline``).
        class_map: the data set's class names → the model's; other classes are dropped and counted.
        external: label the figures as external (another data set than the model's).
        exclude_near_duplicates_of: a split name (``train``): the same metrics again without the
            images that copy one of that split's (``excluding_copies``).

    Returns:
        The metrics dict (also in metrics.json).
    """
    from bonetumor.checkpoint import load_checkpoint
    from bonetumor.data.datasets import ImageDataset, check_files
    from bonetumor.data.transforms import create_transforms
    from bonetumor.plots import plot_confusion, plot_pr, plot_reliability, plot_roc, plot_score_hist
    from bonetumor.utils import prepare_out_dir, select_device

    split = {"val": "valid", "validation": "valid"}.get(split, split)
    if split not in ("train", "valid", "test", "all"):
        raise BonetumorError(f"--split must be train, valid, test or all, not {split!r}")
    dev = select_device(device)
    ck = load_checkpoint(checkpoint, dev)
    cfg = ck.config
    all_samples, samples, dropped = _select(data, manifest, ck, split, class_map)
    if not samples:
        raise BonetumorError(f"{data or manifest}: no images in the {split} split")
    if exclude_near_duplicates_of is not None and not any(s.split == exclude_near_duplicates_of for s in all_samples):
        raise BonetumorError(f"--exclude-near-duplicates-of {exclude_near_duplicates_of}: the data has no "
                             f"{exclude_near_duplicates_of} split")
    outdir = prepare_out_dir(out, overwrite=overwrite)
    samples, skipped = check_files(samples, skip_bad_files, options=ck.read_options)
    tf = create_transforms(False, ck.image_size, mean=ck.mean, std=ck.std)
    loader = torch.utils.data.DataLoader(ImageDataset(samples, ck.classes, tf, ck.read_options),
                                         batch_size=batch_size or cfg.batch_size,
                                         shuffle=False, num_workers=workers)
    preds = predict_loader(ck.model, loader, dev)
    ordered = [samples[i] for i in preds.indices]
    # Intervals resample patients (or, without ids, whole volumes/series): their images are not independent.
    groups = [s.patient_id or s.study for s in ordered] if all(s.patient_id or s.study for s in ordered) else None
    m = compute_metrics(preds.targets, preds.probs, ck.classes, ck.threshold, groups, n_boot)
    m.update({"split": split, "checkpoint": str(checkpoint), "data": str(data or manifest), "external": bool(external),
              "skipped_files": len(skipped)})
    missing = [c for i, c in enumerate(ck.classes) if not (np.asarray(preds.targets) == i).any()]
    if missing:
        m["notes"] = [f"the {split} split holds no {', '.join(missing)} images: ROC-AUC and the metrics that "
                      f"need them (sensitivity, PPV, F1) are undefined (nan)"]
    if class_map:
        m["class_map"], m["dropped_classes"] = class_map, dropped
    _lookup_figures(m, all_samples, ordered, preds, ck, groups, n_boot, baseline, exclude_near_duplicates_of)
    report = m.pop("classification_report")
    atomic_write_json(outdir / "metrics.json", m)
    atomic_write_text(outdir / "classification_report.txt", report)
    prob_cols = ["probability"] if preds.probs.ndim == 1 else [f"p_{c}" for c in ck.classes]
    rows = ({"path": samples[i].ref, "label": samples[i].label, "prediction": ck.label_for(p),
             **dict(zip(prob_cols, (f"{v:.6f}" for v in np.atleast_1d(p))))}
            for i, p in zip(preds.indices, preds.probs))
    atomic_write_csv(outdir / "predictions.csv", ["path", "label", *prob_cols, "prediction"], rows)
    name = f"{split}, external" if external else split
    if preds.probs.ndim == 1:
        t, p = preds.targets, preds.probs
        auc = m["roc_auc"]
        plot_roc(t, p, outdir / "roc.png", title=f"ROC ({name}, n={m['n']})", band=roc_band(t, p, groups, n_boot),
                 auc_ci=(auc["ci_low"], auc["ci_high"]))
        plot_pr(t, p, outdir / "pr.png", title=f"Precision-recall ({name})")
        plot_reliability(t, p, outdir / "reliability.png", m["ece"]["value"], title=f"Reliability ({name})")
        plot_score_hist(t, p, ck.classes, outdir / "scores.png", ck.threshold, title=f"Scores per class ({name})")
    plot_confusion(np.array(m["confusion_matrix"]["matrix"]), ck.classes, outdir / "confusion_matrix.png",
                   title=f"Confusion matrix at threshold {ck.threshold:.3f}" if preds.probs.ndim == 1 else "Confusion matrix")
    m["classification_report"] = report
    return m


def _lookup_figures(m: dict, all_samples, ordered, preds: Predictions, ck, groups, n_boot: int, baseline: bool,
                    exclude_of: str | None) -> None:
    """Add the 1-NN look-up baseline and the metrics without copies of ``exclude_of`` to ``m``."""
    from bonetumor.data.audit import copies_of, scan, split_baseline

    train = [s for s in all_samples if s.split == "train"]
    if not ((baseline and train and m["split"] != "train") or exclude_of):
        return
    fh = scan(ordered, options=ck.read_options)
    cache: dict[str, tuple[list, list]] = {}  # a reference split is read once, even when both figures need it

    def facts_of(split: str) -> tuple[list, list]:
        if split not in cache:
            refs = [s for s in all_samples if s.split == split]
            cache[split] = (refs, scan(refs, options=ck.read_options))
        return cache[split]

    if baseline and train and m["split"] != "train":
        # Look-up alone, on the same images: when it comes near the model, the split measures memory.
        b = split_baseline(*facts_of("train"), ordered, fh, ck.classes)
        if b is not None:
            m["memorisation_baseline"] = b
    if exclude_of:
        mask, why = copies_of(ordered, fh, *facts_of(exclude_of))
        keep = ~mask
        sub = {"of": exclude_of, "removed": why, "n": int(keep.sum())}
        if keep.any():
            g = None if groups is None else [x for x, k in zip(groups, keep) if k]
            sub.update({k: v for k, v in compute_metrics(preds.targets[keep], preds.probs[keep], ck.classes, ck.threshold,
                                                         g, n_boot).items() if k != "classification_report"})
        m["excluding_copies"] = sub

"""Metrics with 95% bootstrap confidence intervals, at the image and at the patient level.

Point values come from scikit-learn. The intervals are percentile bootstrap intervals over
resampled *patients* when patient ids are known (slices of one patient are not independent, so
resampling images would make the intervals too narrow) and over images otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn import metrics as skm

from bonetumor.task import Task

N_BOOT = 1000
BINARY = ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv",
          "f1", "brier", "ece")
MULTICLASS = ("roc_auc", "accuracy", "balanced_accuracy", "f1", "brier", "ece")


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of (bin share) x |observed rate - mean confidence|.

    Binary: calibration of P(positive). Multiclass: of the top-label confidence. scikit-learn's
    calibration_curve drops empty bins and returns no counts, so the weighting is done here.
    """
    targets = np.asarray(targets)
    if probs.ndim == 1:
        conf, hit = probs, targets == 1
    else:
        conf, hit = probs.max(1), probs.argmax(1) == targets
    if len(conf) == 0:
        return float("nan")
    return float(sum(n / len(conf) * abs(rate - c) for _, c, rate, n in calibration_bins(conf, hit, bins)))


def calibration_bins(conf: np.ndarray, hit: np.ndarray, bins: int = 10) -> list[tuple[int, float, float, int]]:
    """(bin, mean confidence, observed rate, count) for each non-empty equal-width bin of ``conf``."""
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return [(b, float(conf[which == b].mean()), float(hit[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_values(targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Every binary metric at ``threshold`` (positive when P >= threshold); NaN where undefined."""
    targets = np.asarray(targets).astype(int)
    pred = (probs >= threshold).astype(int)
    tp = int(((pred == 1) & (targets == 1)).sum())
    tn = int(((pred == 0) & (targets == 0)).sum())
    fp = int(((pred == 1) & (targets == 0)).sum())
    fn = int(((pred == 0) & (targets == 1)).sum())
    both = 0 < targets.sum() < len(targets)
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "roc_auc": float(skm.roc_auc_score(targets, probs)) if both else float("nan"),
        "pr_auc": float(skm.average_precision_score(targets, probs)) if both else float("nan"),
        "accuracy": _ratio(tp + tn, len(targets)),
        "balanced_accuracy": (sens + spec) / 2 if both else float("nan"),
        "sensitivity": sens, "specificity": spec, "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "brier": float(np.mean((probs - targets) ** 2)) if len(targets) else float("nan"),
        "ece": expected_calibration_error(targets, probs),
    }


def multiclass_values(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Macro one-vs-rest ROC-AUC, accuracy, balanced accuracy, macro F1, Brier and top-label ECE."""
    targets = np.asarray(targets).astype(int)
    k = probs.shape[1]
    pred = probs.argmax(1)
    onehot = np.eye(k)[targets]
    every = len(np.unique(targets)) == k
    return {
        "roc_auc": float(skm.roc_auc_score(targets, probs, multi_class="ovr", labels=list(range(k)))) if every else float("nan"),
        "accuracy": float((pred == targets).mean()),
        "balanced_accuracy": float(skm.balanced_accuracy_score(targets, pred)) if every else float("nan"),
        "f1": float(skm.f1_score(targets, pred, average="macro", labels=list(range(k)), zero_division=0)),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
        "ece": expected_calibration_error(targets, probs),
    }


def resample_indices(n: int, groups: Sequence | None, n_boot: int, seed: int = 0):
    """Yield ``n_boot`` index arrays drawn with replacement: whole groups (patients) when given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, n)
        return
    groups = np.asarray(groups)
    members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        yield np.concatenate([members[i] for i in pick])


def with_intervals(values: Callable[[np.ndarray, np.ndarray], dict[str, float]], targets: np.ndarray,
                   probs: np.ndarray, groups: Sequence | None = None, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = 0.95) -> dict[str, dict[str, float]]:
    """``{name: {"value", "ci_low", "ci_high"}}``: the metric on all data and its percentile
    bootstrap interval (resamples where a metric is undefined, e.g. one class only, are left out)."""
    point = values(targets, probs)
    draws = {k: [] for k in point}
    for idx in resample_indices(len(targets), groups, n_boot, seed):
        for k, v in values(targets[idx], probs[idx]).items():
            draws[k].append(v)
    a = (1 - level) / 2
    out = {}
    for k, v in point.items():
        d = np.asarray(draws[k], dtype=float)
        d = d[np.isfinite(d)]
        lo, hi = (float(np.quantile(d, a)), float(np.quantile(d, 1 - a))) if len(d) else (float("nan"),) * 2
        out[k] = {"value": float(v), "ci_low": lo, "ci_high": hi}
    return out


def patient_scores(targets: np.ndarray, probs: np.ndarray, groups: Sequence, how: str) -> tuple[np.ndarray, np.ndarray]:
    """One score per patient (the max or the mean of its slices' P(positive)); a patient is
    positive when any of its slices is."""
    groups = np.asarray(groups)
    ids = np.unique(groups)
    agg = np.max if how == "max" else np.mean
    t = np.array([targets[groups == g].max() for g in ids])
    p = np.array([agg(probs[groups == g]) for g in ids])
    return t, p


def roc_band(targets: np.ndarray, probs: np.ndarray, groups: Sequence | None = None, n_boot: int = N_BOOT,
             seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise bootstrap band of the ROC curve: (fpr grid, tpr low, tpr high)."""
    grid = np.linspace(0, 1, 101)
    curves = []
    for idx in resample_indices(len(targets), groups, n_boot, seed):
        t, p = targets[idx], probs[idx]
        if 0 < t.sum() < len(t):
            fpr, tpr, _ = skm.roc_curve(t, p)
            curves.append(np.interp(grid, fpr, tpr))
    if not curves:
        return grid, np.full_like(grid, np.nan), np.full_like(grid, np.nan)
    a = (1 - level) / 2
    c = np.stack(curves)
    return grid, np.quantile(c, a, axis=0), np.quantile(c, 1 - a, axis=0)


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
    task = Task.of(classes)
    targets = np.asarray(targets).astype(int)
    out = (_binary_metrics(targets, probs, classes[-1], threshold, groups, n_boot) if task.binary
           else {"n": len(targets), **with_intervals(multiclass_values, targets, probs, groups, n_boot)})
    out["interval"] = {"level": 0.95, "resamples": n_boot, "unit": "patient" if groups is not None else "image",
                       "method": "percentile bootstrap"}
    pred = task.indices(probs, threshold)
    cm = skm.confusion_matrix(targets, pred, labels=list(range(len(classes))))
    out["confusion_matrix"] = {"labels": list(classes), "matrix": cm.tolist()}
    out["classification_report"] = skm.classification_report(
        targets, pred, labels=list(range(len(classes))), target_names=list(classes), zero_division=0, digits=4)
    return out


def _binary_metrics(targets: np.ndarray, probs: np.ndarray, positive: str, threshold: float, groups: Sequence | None,
                    n_boot: int) -> dict:
    out = {"n": len(targets), "n_positive": int(targets.sum()), "n_negative": int((targets == 0).sum()),
           "positive_class": positive, "threshold": float(threshold)}
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
    return out

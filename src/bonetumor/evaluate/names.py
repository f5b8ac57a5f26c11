"""What each figure is called on a page and what it means, in words a radiologist reads without a
glossary; and how many digits it shows (three significant: a CI over a few hundred images does
not support a fourth)."""

from __future__ import annotations

import math

import numpy as np

# What an image beyond the out-of-distribution check's threshold is called (model/ood.py).
UNLIKE_WORDS = "unlike the training data"

# key -> (name, meaning); {pos} and {neg} become the model's positive and negative class names
LABELS = {
    "roc_auc": ("ROC-AUC", "The chance that a random {pos} image scores above a random {neg} one: 0.5 is chance, 1 perfect."),
    "pr_auc": ("PR-AUC (average precision)", "Area under precision against sensitivity; compare it with the share of "
               "{pos} images."),
    "accuracy": ("Accuracy", "Share of images classified correctly at the operating threshold."),
    "balanced_accuracy": ("Balanced accuracy", "Mean of sensitivity and specificity: not swayed by how many images "
                          "each class has."),
    "sensitivity": ("Sensitivity", "Share of {pos} images the model calls {pos} (recall; 1 - the miss rate)."),
    "specificity": ("Specificity", "Share of {neg} images the model calls {neg} (1 - the false alarm rate)."),
    "ppv": ("PPV (precision)", "Of the images called {pos}, the share that are {pos}; depends on how common {pos} is."),
    "npv": ("NPV", "Of the images called {neg}, the share that are {neg}; depends on how common {pos} is."),
    "f1": ("F1 score", "Harmonic mean of PPV and sensitivity."),
    "brier": ("Brier score", "Mean squared gap between the probability and the truth (0 is perfect; lower is better)."),
    "ece": ("Calibration error (ECE)", "Mean gap between the predicted probability and how often it comes true "
            "(lower is better)."),
    "pointing": ("Pointing game", "Share of lesion images whose heatmap peak lies inside the lesion."),
    "energy": ("Heatmap energy in the lesion", "Share of the heatmap's total inside the lesion."),
    "iou_top15": ("Overlap of the hottest 15%", "Intersection over union of the heatmap's hottest 15% of pixels "
                  "and the lesion."),
}

# Said wherever a binary model's labels are shown, when its best.pt holds no chosen threshold.
THRESHOLD_NOT_CHOSEN = ("this checkpoint was saved before training chose its operating point on validation (training "
                        "was stopped or is still running): its labels use the default threshold 0.5")


def metric_name(key: str) -> str:
    """The plain name of a metric (the key itself when unknown)."""
    return LABELS.get(key, (key, ""))[0]


def metric_meaning(key: str, classes: list[str] | tuple[str, ...] = ("normal", "cancer")) -> str:
    """One line saying what the metric means, with the model's class names."""
    neg, pos = (classes[0], classes[-1]) if len(classes) == 2 else ("other", "the class")
    return LABELS.get(key, ("", ""))[1].format(pos=pos, neg=neg)


def sig3(v) -> str:
    """A number with three significant digits, trailing zeros kept (0.9996 -> 1.00); n/a for NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if not isinstance(v, (float, np.floating)):
        return str(v)
    return f"{float(v):,.0f}" if abs(v) >= 1000 else f"{float(v):#.3g}"

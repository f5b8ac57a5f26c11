"""The figures of training and evaluation, one function each, returned for ``RunDir.save_figure``.

Headless (Agg backend): no display needed.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn import metrics as skm  # noqa: E402


def plot_curves(history: Sequence[dict], best_epoch: int | None = None) -> Figure:
    """Accuracy and loss per epoch, train vs validation; the best epoch (the kept model) marked."""
    ep = [int(h["epoch"]) for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, name in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")):
        ax.plot(ep, [float(h[f"train_{key}"]) for h in history], "o-", label="train")
        ax.plot(ep, [float(h[f"val_{key}"]) for h in history], "o-", label="validation")
        if best_epoch:
            ax.axvline(best_epoch, color="black", ls=":", lw=1.2, label=f"best epoch {best_epoch} (kept)")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_roc(targets: np.ndarray, probs: np.ndarray, title: str = "ROC",
             band: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, auc_ci: tuple[float, float] | None = None) -> Figure:
    """ROC curve with its AUC (positive class = 1) and, if given, a 95% bootstrap band."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    if len(np.unique(targets)) == 2:
        fpr, tpr, _ = skm.roc_curve(targets, probs)
        ci = f" [{auc_ci[0]:.3f}, {auc_ci[1]:.3f}]" if auc_ci else ""
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {skm.roc_auc_score(targets, probs):.3f}{ci}")
        if band is not None:
            ax.fill_between(band[0], band[1], band[2], alpha=0.25, label="95% bootstrap band")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    if len(np.unique(targets)) == 2:  # one class only: no curve, so nothing to label
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def plot_pr(targets: np.ndarray, probs: np.ndarray, title: str = "Precision-recall") -> Figure:
    """Precision-recall curve with average precision; the dashed line is the prevalence."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    if len(np.unique(targets)) == 2:
        prec, rec, _ = skm.precision_recall_curve(targets, probs)
        ax.plot(rec, prec, lw=2, label=f"AP = {skm.average_precision_score(targets, probs):.3f}")
        ax.axhline(float(np.mean(targets)), ls="--", color="grey", lw=1, label="prevalence")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if len(np.unique(targets)) == 2:
        ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return fig


MIN_BIN_IMAGES = 10  # a reliability bin with fewer images says little: drawn grey, with its count


def plot_reliability(targets: np.ndarray, probs: np.ndarray, ece: float, bins: int = 10,
                     title: str = "Reliability") -> Figure:
    """Observed positive rate against mean predicted probability in equal-width bins, with counts;
    bins of fewer than ``MIN_BIN_IMAGES`` images are grey, unjoined and labelled n = count."""
    from bonetumor.evaluate.metrics import calibration_bins

    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.6, 5.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    cells = calibration_bins(probs, targets == 1, bins)
    full = [c for c in cells if c[3] >= MIN_BIN_IMAGES]
    few = [c for c in cells if c[3] < MIN_BIN_IMAGES]
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.plot([c[1] for c in full], [c[2] for c in full], "o-", lw=2, label=f"model (ECE {ece:.3f})")
    if few:
        ax.plot([c[1] for c in few], [c[2] for c in few], "o", color="#bbbbbb", mfc="none",
                label=f"bins of < {MIN_BIN_IMAGES} images")
        for c in few:
            ax.annotate(f"n={c[3]}", (c[1], c[2]), textcoords="offset points", xytext=(4, 4), fontsize=7, color="#888888")
    ax.set_ylabel("observed positive rate")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    axh.bar([(c[0] + 0.5) / bins for c in cells], [c[3] for c in cells], width=1 / bins * 0.9,
            color=["grey" if c[3] >= MIN_BIN_IMAGES else "#dddddd" for c in cells])
    axh.set_xlabel("predicted probability")
    axh.set_ylabel("images")
    return fig


def plot_score_hist(targets: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                    threshold: float, title: str = "Scores per class") -> Figure:
    """Histogram of P(positive) for each true class, with the operating threshold."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    edges = np.linspace(0, 1, 26)
    for k, name in enumerate(classes):
        ax.hist(probs[targets == k], bins=edges, alpha=0.55, label=f"true {name} (n={int((targets == k).sum())})")
    ax.axvline(threshold, color="black", lw=1.5, ls="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel(f"P({classes[-1]})")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    return fig


def plot_confusion(cm: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Confusion matrix with counts (rows = true class, columns = predicted)."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(classes), 1.3 + 1.0 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig

"""Every figure, one function each. Headless (Agg backend): no display needed."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from bonetumor.utils import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def plot_curves(history: Sequence[dict], path: str | Path) -> None:
    """Accuracy and loss per epoch, train vs validation (the original's two curves)."""
    ep = [int(h["epoch"]) for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, name in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")):
        ax.plot(ep, [float(h[f"train_{key}"]) for h in history], "o-", label="train")
        ax.plot(ep, [float(h[f"val_{key}"]) for h in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_roc(targets: np.ndarray, probs: np.ndarray, path: str | Path, title: str = "ROC") -> None:
    """ROC curve with its AUC (positive class = 1)."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    if len(np.unique(targets)) == 2:
        fpr, tpr, _ = skm.roc_curve(targets, probs)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {skm.roc_auc_score(targets, probs):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "Confusion matrix") -> None:
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
    _save(fig, path)

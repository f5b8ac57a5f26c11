"""What the model's outputs mean: a binary task (one logit) or a multiclass one (one per class).

Every place that turns outputs into probabilities, labels, losses or table columns asks the
``Task`` instead of testing the output width itself.

Binary: ``classes`` is [negative, positive]; the one logit gives P(positive) through a sigmoid,
and an image is called positive when P >= the checkpoint's threshold (chosen on validation).
Multiclass: a softmax over one logit per class; the label is the most probable class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Task:
    """The classes of a model, and what its outputs mean for them."""

    classes: tuple[str, ...]

    @classmethod
    def of(cls, classes: Sequence[str]) -> "Task":
        """The task of a class list (binary: [negative, positive])."""
        return cls(tuple(classes))

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def n_outputs(self) -> int:
        """Model outputs: one logit for a binary task, one per class otherwise."""
        return 1 if self.binary else len(self.classes)

    @property
    def positive_class(self) -> str:
        """The class whose probability a binary model outputs (the last class)."""
        return self.classes[-1]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, outputs) logits -> P(positive) (N,) for a binary task, else class probabilities (N, C)."""
        return torch.sigmoid(logits[:, 0]) if self.binary else torch.softmax(logits, 1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits in the shape of ``probabilities``: (N,) for a binary task, else (N, C)."""
        return logits[:, 0] if self.binary else logits

    def loss_target(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Targets in the form the loss wants: float (N, 1) for one logit, class indices otherwise."""
        return y.float().view_as(logits) if self.binary else y

    def class_score(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per image, the logit of class ``index[i]``; for one logit, +logit for the positive class
        and -logit for the negative, so that a wrong prediction's evidence can be asked for too."""
        if self.binary:
            return torch.where(index == 1, logits[:, 0], -logits[:, 0])
        return logits.gather(1, index[:, None])[:, 0]

    def class_probability(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per image, the probability of class ``index[i]``."""
        if self.binary:
            return torch.sigmoid(self.class_score(logits, index))
        return torch.softmax(logits, 1).gather(1, index[:, None])[:, 0]

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:
        """Class index per image at the default decision (logit > 0; the top class)."""
        return (logits[:, 0] > 0).long() if self.binary else logits.argmax(1)

    def create_loss(self, class_counts: Sequence[float] | None = None) -> nn.Module:
        """BCEWithLogits for a binary task, cross-entropy otherwise; with ``class_counts`` (the
        training images of each class) weighted so that every class counts alike."""
        if class_counts is None:
            return nn.BCEWithLogitsLoss() if self.binary else nn.CrossEntropyLoss()
        counts = np.asarray(class_counts, dtype=float)
        if self.binary:
            return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([counts[0] / counts[1]]))
        return nn.CrossEntropyLoss(weight=torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32))

    def indices(self, probs, threshold: float = 0.5):
        """Predicted class index per image (numpy or torch, as ``probs``): P(positive) >= threshold,
        else the most probable class."""
        if self.binary:
            hit = probs >= threshold
            return hit.long() if isinstance(hit, torch.Tensor) else hit.astype(int)
        return probs.argmax(1)

    def label(self, prob, threshold: float = 0.5) -> str:
        """The predicted class of one image, from ``probabilities``' row for it."""
        p = np.asarray(prob, dtype=float)
        return self.classes[int(p >= threshold)] if self.binary else self.classes[int(p.argmax())]

    def ranking_score(self, prob) -> float:
        """The number an image or slice is ranked by: P(positive), or the top class probability."""
        return float(prob) if self.binary else float(np.max(prob))

    def probability_columns(self) -> list[str]:
        """Table columns of the probabilities: ``probability``, or ``p_<class>`` per class."""
        return ["probability"] if self.binary else [f"p_{c}" for c in self.classes]

    def probability_fields(self, prob, digits: int | None = None) -> dict:
        """``{"probability": p}`` (binary, rounded to ``digits``), else ``{"probabilities": {class: p}}``."""
        if self.binary:
            p = float(prob)
            return {"probability": round(p, digits) if digits is not None else p}
        return {"probabilities": dict(zip(self.classes, map(float, prob)))}

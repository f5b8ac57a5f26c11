"""The operating point and calibration, both fitted on the validation split only.

The decision threshold is chosen once, on validation, stored in the checkpoint and applied
unchanged to test and to ``predict``; choosing it on test would flatter the test figures.
Temperature scaling (Guo et al., 2017) divides the logits by one number T fitted by maximum
likelihood on validation; it changes the probabilities, never the ranking (ROC-AUC is unchanged).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax
from sklearn import metrics as skm

from bonetumor.config import parse_rule
from bonetumor.errors import BonetumorError
from bonetumor.evaluate.metrics import binary_values, expected_calibration_error


def choose_threshold(targets: np.ndarray, probs: np.ndarray, rule: str) -> float:
    """The threshold on P(positive) that ``rule`` picks on these (validation) predictions.

    youden: maximises sensitivity + specificity - 1. sensitivity:X: the highest threshold whose
    sensitivity is at least X (so the best specificity that keeps it). specificity:X: the lowest
    threshold whose specificity is at least X. fixed:X: X.
    """
    kind, value = parse_rule(rule)
    if kind == "fixed":
        return float(value)
    targets = np.asarray(targets).astype(int)
    if not 0 < targets.sum() < len(targets):
        raise BonetumorError("the validation split needs both classes to choose a threshold; use --threshold-rule fixed:0.5")
    fpr, tpr, thr = skm.roc_curve(targets, probs, drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # scikit-learn's first threshold is +inf (nothing positive)
    if kind == "youden":
        i = int(np.argmax(tpr - fpr))
    elif kind == "sensitivity":
        i = int(np.nonzero(tpr >= value - 1e-12)[0][0])
    else:
        i = int(np.nonzero(1 - fpr >= value - 1e-12)[0][-1])
    return float(thr[i])


def _nll(logits: np.ndarray, targets: np.ndarray, t: float) -> float:
    z = logits / t
    if z.ndim == 1:
        # Binary cross-entropy on the logit, in a form that does not overflow.
        return float(np.mean(np.logaddexp(0, z) - targets * z))
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(len(targets)), targets]))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T > 0 that minimises the negative log-likelihood of ``logits / T`` (one logit per
    image for a binary model, else one per class)."""
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets).astype(int)
    res = minimize_scalar(lambda log_t: _nll(logits, targets, float(np.exp(log_t))), bounds=(-4.0, 4.0),
                          method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(positive) for one logit per image, else the softmax over classes."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if z.ndim == 1:
        return expit(z)
    return np.exp(log_softmax(z, axis=1))


def operating_point(logits: np.ndarray, targets: np.ndarray, rule: str, calibrate: bool, precision: str) -> dict:
    """The operating point chosen on validation logits: the temperature (with ``calibrate``)
    and the threshold ``rule`` picks (binary; 0.5 otherwise), with the validation figures at
    that threshold and at 0.5, as recorded in ``operating_point.json`` and ``best.pt``."""
    logits = np.asarray(logits, dtype=np.float64)
    op: dict = {"split": "valid", "n": len(targets), "rule": rule, "precision": precision}
    temperature = 1.0
    if calibrate:
        temperature = fit_temperature(logits, targets)
        op.update(temperature=temperature,
                  ece_before=expected_calibration_error(targets, probabilities(logits)),
                  ece_after=expected_calibration_error(targets, probabilities(logits, temperature)))
    probs = probabilities(logits, temperature)
    binary = probs.ndim == 1
    op["threshold"] = choose_threshold(targets, probs, rule) if binary else 0.5
    if binary:
        keep = ("sensitivity", "specificity", "accuracy", "balanced_accuracy")
        chosen, half = binary_values(targets, probs, op["threshold"]), binary_values(targets, probs, 0.5)
        op["at_threshold"] = {k: chosen[k] for k in keep}
        op["at_threshold_0.5"] = {k: half[k] for k in keep}
    return op

"""Does something other than the image content predict the label? File names, first.

When each class of a data set was collected from its own source, the sources leave traces a
model can learn instead of the disease: one export names its files ``IMG0000123``, another
``image-no12-normal-3``. A model rewarded for telling the sources apart scores well inside the
data set and at chance on another hospital's. This module measures how much of the label the
file names alone give away: the classes of each naming pattern, and the cross-validated
ROC-AUC of a classifier that sees nothing but the name's tokens.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from bonetumor.data.studies import Sample

CONFOUND_AUC = 0.8  # a property that alone predicts the class this well makes in-set figures untrustworthy
PURE = 0.95  # a naming pattern this dominated by one class marks its source
_DIGITS = re.compile(r"\d+")
_HASH = re.compile(r"(?<![0-9a-f])[0-9a-f]{12,}(?![0-9a-f])", re.IGNORECASE)  # uuids, checksums: no pattern
_TOKEN = re.compile(r"[A-Za-z]+|#")
# Export tools rename files but keep the source name: Roboflow writes "<stem>_<ext>.rf.<hash>.<ext>".
_EXPORT_NAME = re.compile(r"^(.+)_(?:jpe?g|png|bmp|tiff?|dcm)\.rf\.[0-9a-f]{32}\.\w+$", re.IGNORECASE)


def source_name(path: str) -> str | None:
    """The original file name an export tool kept inside a renamed file, or None."""
    m = _EXPORT_NAME.match(Path(path).name)
    return m.group(1) if m else None


def frequent_at_least(n_images: int) -> int:
    """How many images a naming pattern needs to count as a source: rarer ones say little."""
    return max(5, int(0.005 * n_images))


def name_pattern(path: str) -> str:
    """A file's naming pattern: the stem (an export tool's kept source name when there is one)
    with hashes and runs of digits collapsed to ``#``: ``IMG0000123.jpg`` -> ``IMG#``."""
    name = Path(path).name
    stem = source_name(path) or name.split(".")[0] or name
    return _DIGITS.sub("#", _HASH.sub("#", stem))


def name_tokens(pattern: str) -> list[str]:
    """The words of a pattern, lower-cased, and the pattern itself (its shape is a token too)."""
    return [t.lower() for t in _TOKEN.findall(pattern)] + ["pattern:" + pattern]


def cv_folds(labels: np.ndarray) -> int:
    """Folds for a stratified cross-validation: up to 5, no more than the rarest class has images
    (0 when there is one class or fewer than 2 images of one)."""
    counts = Counter(labels)
    folds = min(5, min(counts.values())) if len(counts) > 1 else 0
    return folds if folds >= 2 else 0


def cv_auc(model, x, labels: np.ndarray, groups, classes: list[str], seed: int) -> float:
    """Cross-validated ROC-AUC (macro one-vs-rest for more than two classes) of ``model`` on
    ``x``; folds keep a group's (a patient's) images together when groups are given. Needs
    ``cv_folds(labels)`` >= 2."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import (
        StratifiedGroupKFold,
        StratifiedKFold,
        cross_val_predict,
    )

    folds = cv_folds(labels)
    if groups is not None and len(set(groups)) >= folds:
        cv, groups = StratifiedGroupKFold(folds, shuffle=True, random_state=seed), list(groups)
    else:
        cv, groups = StratifiedKFold(folds, shuffle=True, random_state=seed), None
    p = cross_val_predict(model, x, labels, groups=groups, cv=cv, method="predict_proba")
    order = sorted(set(labels))  # sklearn's class order
    if len(order) == 2:
        positive = classes[-1] if classes[-1] in order else order[-1]
        return float(roc_auc_score(labels == positive, p[:, order.index(positive)]))
    return float(roc_auc_score(labels, p, multi_class="ovr", average="macro", labels=order))


def _name_auc(tokens: list[list[str]], labels: np.ndarray, groups, classes: list[str], seed: int) -> float | None:
    """``cv_auc`` of a logistic regression on bag-of-tokens (None with too few images per class)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    if not cv_folds(labels):
        return None
    x = CountVectorizer(analyzer=lambda t: t, binary=True).fit_transform(tokens)
    return cv_auc(LogisticRegression(max_iter=2000, C=1.0), x, labels, groups, classes, seed)


def file_name_confound(samples: Sequence[Sample], classes: list[str], seed: int = 42, top: int = 10) -> dict:
    """How much of the label the file names give away: each frequent naming pattern's classes
    and purity, the share of images in patterns that one class dominates, and the cross-validated
    ROC-AUC of a classifier on name tokens alone (0.5: the names say nothing)."""
    labelled = [s for s in samples if s.label is not None]
    patterns = [name_pattern(s.path) for s in labelled]
    labels = np.array([s.label for s in labelled])
    by_pattern: dict[str, Counter] = defaultdict(Counter)
    for p, y in zip(patterns, labels):
        by_pattern[p][y] += 1
    frequent = frequent_at_least(len(labelled))
    rows = []
    for p, c in sorted(by_pattern.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(c.values())
        if n >= frequent:
            rows.append({"pattern": p, "n": n, "by_class": dict(c.most_common()), "purity": round(c.most_common(1)[0][1] / n, 4)})
    in_pure = sum(r["n"] for r in rows if r["purity"] >= PURE)
    groups = np.array([s.patient_id for s in labelled]) if all(s.patient_id for s in labelled) else None
    auc = _name_auc([name_tokens(p) for p in patterns], labels, groups, classes, seed)
    return {"n_images": len(labelled), "n_patterns": len(by_pattern), "frequent_at_least": frequent,
            "patterns": rows[:top], "share_in_pure_patterns": round(in_pure / max(len(labelled), 1), 4),
            "cv_auc": None if auc is None else round(auc, 4),
            "flag": auc is not None and abs(auc - 0.5) >= CONFOUND_AUC - 0.5}


def confound_summary(report: dict) -> str:
    """One plain-words line when the label is predictable from something other than the image
    content (empty when nothing was found or the audit predates this check)."""
    found = []
    names = report.get("confounds", {}).get("file_names")
    if names and names["flag"]:
        pure = [r for r in names["patterns"] if r["purity"] >= PURE][:2]
        eg = "; ".join(f"{r['pattern']}: {r['n']} images, {r['purity']:.0%} {next(iter(r['by_class']))}" for r in pure)
        found.append(f"file names alone predict the class (cross-validated ROC-AUC {names['cv_auc']:.2f}"
                     + (f"; e.g. {eg}" if eg else "") + ")")
    style = report.get("confounds", {}).get("style")
    if style and style["flag"]:
        found.append(f"image style alone predicts the class (cross-validated ROC-AUC {style['cv_auc']:.2f})")
    if not found:
        return ""
    return ("class is confounded with source: " + " and ".join(found)
            + "; a model can learn the source instead of the disease: external testing is required")

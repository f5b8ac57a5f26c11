"""Stratified, patient-grouped splits (scikit-learn's StratifiedGroupKFold does the work)."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from bonetumor.data.studies import Sample
from bonetumor.errors import BonetumorError


def with_splits(samples: Sequence[Sample], splits: Sequence[str]) -> list[Sample]:
    """Copy of samples with their split set."""
    return [replace(s, split=sp) for s, sp in zip(samples, splits)]


def _groups(samples: Sequence[Sample]) -> np.ndarray:
    # A sample's group (--split-by cluster) first; without one, its patient; without patient ids a
    # volume's or series' slices form one group, and any other image is its own group (an
    # image-level split, said so in the record).
    return np.array([s.group or s.patient_id or (f"__study_{s.study}" if s.study else f"__image_{i}")
                     for i, s in enumerate(samples)])


def groups_per_class(samples: Sequence[Sample]) -> dict[str, int]:
    """Number of patients (or images, without patient ids) of each class."""
    labels, groups = np.array([s.label for s in samples]), _groups(samples)
    return {str(c): len(set(groups[labels == c])) for c in sorted(set(labels))}


def assign_folds(samples: Sequence[Sample], k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each sample: stratified by label, a patient's images in one fold."""
    labels = np.array([s.label for s in samples])
    fold = np.empty(len(samples), dtype=int)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(cv.split(np.zeros(len(samples)), labels, _groups(samples))):
        fold[held] = f
    return fold


def hold_out(samples: Sequence[Sample], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out part of about ``fraction``, stratified by label, grouped by patient."""
    counts = groups_per_class(samples)
    # Every class needs at least k groups to be stratified; tiny data sets get a larger held-out part.
    small = min(counts, key=counts.get)
    if counts[small] < 2:
        raise BonetumorError(f"class {small!r} has too few images/patients to split (need at least 2)")
    k = max(2, min(int(round(1.0 / fraction)), counts[small]))
    return assign_folds(samples, k, seed) == 0


def assign_splits(samples: Sequence[Sample], val_fraction: float, test_fraction: float, seed: int,
                  refuse_shared_patients: bool = True) -> list[Sample]:
    """Give every sample a split. Existing splits are kept; a missing valid split is carved from
    train, and samples with no split at all are divided into train/valid/test. A patient found
    in two given splits is refused (the audit passes ``refuse_shared_patients=False`` to count them)."""
    samples = list(samples)
    given = [s for s in samples if s.split]
    free = [s for s in samples if not s.split]
    out = list(given)
    if free:
        splits = np.array(["train"] * len(free), dtype=object)
        rest = np.arange(len(free))
        if test_fraction > 0:
            m = hold_out(free, test_fraction, seed)
            splits[m] = "test"
            rest = np.nonzero(~m)[0]
        sub = [free[i] for i in rest]
        m = hold_out(sub, val_fraction / (1.0 - test_fraction), seed + 1)
        splits[rest[m]] = "valid"
        out += with_splits(free, list(splits))
    if not any(s.split == "valid" for s in out):
        train = [s for s in out if s.split == "train"]
        if not train:
            raise BonetumorError("no training images found")
        m = hold_out(train, val_fraction, seed + 1)
        others = [s for s in out if s.split != "train"]
        out = others + with_splits(train, ["valid" if x else "train" for x in m])
    if not any(s.split == "train" for s in out):
        raise BonetumorError("no training images found")
    if refuse_shared_patients:
        _check_patients(out)
    return out


def _check_patients(samples: Sequence[Sample]) -> None:
    """A patient in two splits leaks; refuse it."""
    seen: dict[str, str] = {}
    for s in samples:
        if s.patient_id:
            prev = seen.setdefault(s.patient_id, s.split)
            if prev != s.split:
                raise BonetumorError(f"patient {s.patient_id} appears in both {prev} and {s.split} splits")

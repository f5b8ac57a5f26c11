"""``--split-by``: which images must share a split.

``given`` keeps the data's own splits (folders, a manifest's ``split`` column) and splits the rest
by patient; ``patient`` re-splits everything, a patient's (or a volume's) images together;
``cluster`` also keeps together every duplicate cluster the audit finds: exact copies, near
copies and an export tool's renamed copies of one source file. Copies on both sides of a split
let a model score by recognising an image it trained on; the audit's look-up baseline shows how
much (on ``bone-cancer-xray-v1``'s own splits, 56% of the validation images copy a training one).

``cluster`` also keeps each source group in one split where that can go with stratification: a
frequent naming pattern (``confounds.name_pattern``, as the confound audit counts them) that
holds more than one class, such as one hospital's export, so that validation and test images come
from sources the model did not train on. A pattern one class holds (>= ``confounds.PURE``) is not
kept whole: there the source is the class (``bone-cancer-xray-v1``: every one of its frequent
patterns), so a split keeping it whole could not hold both classes (tried: test would be 3,236
cancers and 101 normals). That data can only be judged on an external set, as the confound audit
says. A pattern holding half the images or more is a naming scheme (``P#_s#``), not a source.

The groups are the connected components of "same patient", "same volume", "copy of" and "same
source" links (scipy's csgraph); the splitting itself stays scikit-learn's StratifiedGroupKFold
(data/splits.py).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from typing import Sequence

import numpy as np

from bonetumor.data.studies import Sample

SOURCE_MAX_SHARE = 0.5  # a naming pattern of at least this share of the images is a scheme, not a source


def source_links(samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """Links joining the images of each source group that can stay in one split (module docstring):
    a frequent naming pattern of more than one class and under half of the images."""
    from bonetumor.data.confounds import PURE, frequent_at_least, name_pattern

    by_pattern: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_pattern[name_pattern(s.path)].append(i)
    frequent = frequent_at_least(len(samples))
    links = []
    for members in by_pattern.values():
        if not frequent <= len(members) < SOURCE_MAX_SHARE * len(samples):
            continue
        classes = Counter(samples[i].label for i in members)
        if len(classes) > 1 and max(classes.values()) / len(members) < PURE:
            links.extend((members[0], i) for i in members[1:])
    return links


def copy_groups(samples: Sequence[Sample], facts: Sequence) -> np.ndarray:
    """A group name per sample: linked by patient id, volume, any copy pair (``facts``: the
    audit's scan of ``samples``) or a source group that holds more than one class."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from bonetumor.data.confounds import source_name
    from bonetumor.data.copies import NEAR_THRESHOLD, all_near_pairs, copy_pairs

    links = [(i, j) for i, j, _, _ in copy_pairs(samples, facts, all_near_pairs(facts, NEAR_THRESHOLD), source_name)]
    links += source_links(samples)
    first: dict[str, int] = {}
    for i, s in enumerate(samples):
        for key in (f"patient:{s.patient_id}" if s.patient_id else None, f"study:{s.study}" if s.study else None):
            if key is not None:
                links.append((first.setdefault(key, i), i))
    n = len(samples)
    rows = np.array([a for a, _ in links], dtype=int)
    cols = np.array([b for _, b in links], dtype=int)
    _, comp = connected_components(coo_matrix((np.ones(len(links)), (rows, cols)), shape=(n, n)), directed=False)
    return np.array([f"__cluster_{c}" for c in comp])


def apply_split_by(samples: Sequence[Sample], split_by: str, facts: Sequence | None = None) -> list[Sample]:
    """``samples`` made ready for ``assign_splits`` under ``split_by``: given splits kept or
    cleared, and for ``cluster`` each sample's group set."""
    if split_by == "given":
        return list(samples)
    cleared = [replace(s, split=None) for s in samples]
    if split_by == "patient":
        return cleared
    if facts is None:
        raise ValueError("--split-by cluster needs the audit's scan of the images")
    return [replace(s, group=g) for s, g in zip(cleared, copy_groups(cleared, facts))]


def cross_split_copies(samples: Sequence[Sample], groups: Sequence[str]) -> int:
    """How many groups span more than one split (0 after a cluster split)."""
    spans: dict[str, set] = {}
    for s, g in zip(samples, groups):
        spans.setdefault(g, set()).add(s.split)
    return sum(len(v) > 1 for v in spans.values())


def split_samples(samples: Sequence[Sample], split_by: str, val_fraction: float, test_fraction: float, seed: int,
                  options=None, refuse_shared_patients: bool = True) -> tuple[list[Sample], dict | None]:
    """(``samples`` with their splits under ``split_by``, the audit's scan by sample ref when
    ``cluster`` had to read every image for it, else None): train, evaluate and audit split alike."""
    from bonetumor.data.facts import scan
    from bonetumor.data.splits import assign_splits

    facts = scan(samples, options=options) if split_by == "cluster" else None
    out = assign_splits(apply_split_by(samples, split_by, facts), val_fraction, test_fraction, seed,
                        refuse_shared_patients)
    return out, dict(zip((s.ref for s in samples), facts)) if facts is not None else None

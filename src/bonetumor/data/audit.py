"""Leakage and confound audit of a data set, before any model is trained.

What it looks for:
    - exact duplicates (SHA-256 of the file) and near-duplicates (perceptual hash, imagehash's
      pHash, Hamming distance <= ``near_threshold`` of 64 bits), within and across splits;
    - held-out files whose export source name (Roboflow keeps it in the renamed file) is in train;
    - the same patient in two splits; the same image under two labels; unreadable files;
    - shortcuts: per-class differences in size, aspect, colour vs grey, mean intensity, file
      format and metadata, each with the size of the difference (a single-feature ROC-AUC for
      numbers, the total variation distance between the classes' distributions for categories);
    - a memorisation baseline: 1-nearest-neighbour on 32x32 grey thumbnails, fitted on the
      training split and scored on the others. When it comes near a model's score, the split
      measures look-up rather than learning.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from bonetumor.data.confounds import file_name_confound, source_name
from bonetumor.data.copies import (
    CLUSTER_FIELDS,
    NEAR_THRESHOLD,
    PAIR_FIELDS,
    all_near_pairs,
    cluster_rows,
    copy_pairs,
    near_pairs,
    pair_rows,
)
from bonetumor.data.facts import THUMB, ImageFacts, scan, scan_file  # noqa: F401  (re-exported)
from bonetumor.data.layouts import DatasetIndex, listing_problems
from bonetumor.data.pixels import ReadOptions
from bonetumor.data.studies import Sample
from bonetumor.data.style import style_confound
from bonetumor.files import RunDir

AUC_FLAG = 0.2  # flag a numeric shortcut when |AUC - 0.5| >= this (AUC >= 0.7 or <= 0.3)
TVD_FLAG = 0.2  # flag a categorical shortcut when the class distributions differ this much
BASELINE_MAX_HELD = 5000  # held-out images the look-up baseline scores (a seeded sample beyond)


def _duplicates(samples, facts, splits, pairs) -> dict:
    """Exact and near-duplicate counts within each split and of each split against train."""
    by_split = {s: [i for i, x in enumerate(samples) if x.split == s and facts[i].error is None] for s in splits}
    train_sha = {facts[i].sha256 for i in by_split.get("train", [])}
    near_within, near_train = set(), set()
    for i, j in pairs:
        a, b = samples[i].split, samples[j].split
        if a == b:
            near_within |= {i, j}
        elif "train" in (a, b):
            near_train.add(j if a == "train" else i)
    out = {}
    for split, idx in by_split.items():
        sha = Counter(facts[i].sha256 for i in idx)
        row = {"n": len(idx), "distinct_files": len(sha),
               "exact_duplicates_within": sum(c - 1 for c in sha.values()),
               "near_duplicates_within": sum(i in near_within for i in idx)}
        if split != "train" and train_sha:
            exact = {i for i in idx if facts[i].sha256 in train_sha}
            near = exact | {i for i in idx if i in near_train}
            row.update({"exact_copies_of_train": len(exact), "exact_rate": len(exact) / max(len(idx), 1),
                        "near_copies_of_train": len(near), "near_rate": len(near) / max(len(idx), 1)})
        out[split] = row
    return out


def _label_conflicts(samples, facts, pairs) -> dict:
    """The same image (exact) or a near copy of it under two different labels."""
    by_sha = defaultdict(set)
    for s, f in zip(samples, facts):
        if f.error is None:
            by_sha[f.sha256].add(s.label)
    exact = sum(1 for labels in by_sha.values() if len(labels) > 1)
    near = sum(1 for i, j in pairs if samples[i].label != samples[j].label)
    return {"exact_images_with_two_labels": exact, "near_pairs_with_two_labels": near}


def _same_source(samples, splits) -> dict:
    """Held-out images whose export source name also occurs in train (copies made by the export)."""
    train = {source_name(s.path) for s in samples if s.split == "train"} - {None}
    out = {}
    for split in splits:
        if split == "train" or not train:
            continue
        names = [source_name(s.path) for s in samples if s.split == split]
        if any(names):
            out[split] = sum(n in train for n in names if n)
    return out


def _style(samples, facts, classes) -> dict:
    ok = [i for i, f in enumerate(facts) if f.error is None and f.style is not None and samples[i].label is not None]
    groups = [samples[i].patient_id for i in ok] if all(samples[i].patient_id for i in ok) else None
    return style_confound([facts[i].style for i in ok], [samples[i].label for i in ok], classes, groups)


def _patients_in_two_splits(samples) -> list[str]:
    where = defaultdict(set)
    for s in samples:
        if s.patient_id:
            where[s.patient_id].add(s.split)
    return sorted(p for p, sp in where.items() if len(sp) > 1)


def _numeric_effect(values: np.ndarray, labels: np.ndarray, classes: list[str]) -> float:
    """How well one number alone tells the classes apart: the one-vs-rest ROC-AUC furthest from 0.5."""
    best = 0.5
    for c in (classes[-1:] if len(classes) == 2 else classes):
        y = labels == c
        if y.all() or not y.any() or np.ptp(values) == 0:
            continue
        auc = float(roc_auc_score(y, values))
        best = auc if abs(auc - 0.5) > abs(best - 0.5) else best
    return best


def _shortcuts(samples, facts, classes) -> dict:
    ok = [i for i, f in enumerate(facts) if f.error is None]
    labels = np.array([samples[i].label for i in ok])
    numeric = {"width": [facts[i].width for i in ok], "height": [facts[i].height for i in ok],
               "aspect": [facts[i].width / facts[i].height for i in ok], "mean_intensity": [facts[i].mean for i in ok]}
    categorical = {"colour": ["colour" if facts[i].colour else "grey" for i in ok],
                   "format": [facts[i].fmt for i in ok], "mode": [facts[i].mode for i in ok],
                   "metadata": [facts[i].metadata or "(none)" for i in ok]}
    out = {}
    for name, vals in numeric.items():
        v = np.asarray(vals, dtype=float)
        auc = _numeric_effect(v, labels, classes)
        out[name] = {"kind": "numeric", "auc": round(auc, 4), "flag": abs(auc - 0.5) >= AUC_FLAG,
                     "per_class": {c: {"mean": float(v[labels == c].mean()), "sd": float(v[labels == c].std())}
                                   for c in classes if (labels == c).any()}}
    for name, vals in categorical.items():
        vals = np.asarray(vals)
        dist = {c: {str(k): n / int((labels == c).sum()) for k, n in Counter(vals[labels == c]).most_common(5)}
                for c in classes if (labels == c).any()}
        full = {c: Counter(vals[labels == c]) for c in dist}
        tvd = 0.0
        for a in dist:
            for b in dist:
                na, nb = sum(full[a].values()), sum(full[b].values())
                keys = set(full[a]) | set(full[b])
                tvd = max(tvd, 0.5 * sum(abs(full[a][k] / na - full[b][k] / nb) for k in keys))
        out[name] = {"kind": "categorical", "tvd": round(tvd, 4), "flag": tvd >= TVD_FLAG, "per_class": dist}
    return out


def memorisation_baseline(train_thumbs: np.ndarray, train_labels: Sequence[str], thumbs: np.ndarray,
                          labels: Sequence[str], classes: list[str]) -> dict:
    """1-nearest-neighbour on grey thumbnails: accuracy and ROC-AUC of look-up alone.

    The score for the positive class is the distance to the nearest negative minus the distance
    to the nearest positive training image (one-vs-rest per class for more than two classes).
    """
    train_labels, labels = np.asarray(train_labels), np.asarray(labels)
    dist = np.full((len(thumbs), len(classes)), np.inf)
    for k, c in enumerate(classes):
        ref = train_thumbs[train_labels == c]
        if len(ref):
            dist[:, k] = NearestNeighbors(n_neighbors=1).fit(ref).kneighbors(thumbs)[0][:, 0]
    pred = np.array(classes)[dist.argmin(1)]
    y = np.array([classes.index(v) for v in labels])
    out = {"accuracy": float((pred == labels).mean()), "roc_auc": float("nan"), "n": len(labels)}
    if len(set(y)) == len(classes):
        if len(classes) == 2:
            out["roc_auc"] = float(roc_auc_score(y, dist[:, 0] - dist[:, 1]))
        else:
            s = np.exp(-(dist - dist.min(1, keepdims=True)))
            out["roc_auc"] = float(roc_auc_score(y, s / s.sum(1, keepdims=True), multi_class="ovr"))
    return out


def audit(index: DatasetIndex, near_threshold: int = NEAR_THRESHOLD, baseline: bool = True,
          workers: int | None = None, facts: list[ImageFacts] | None = None, options: ReadOptions | None = None,
          run: RunDir | None = None) -> dict:
    """Audit the samples of ``index`` (with splits assigned). Returns a JSON-able dict whose
    ``leakage`` entry is true when any split shares images or patients with another, or an
    image carries two labels. ``facts``: the samples' ``scan``, when already made. ``run``: a
    folder to write ``audit.json``, ``duplicates.csv`` (which file copies which) and
    ``clusters.csv`` (each image's duplicate cluster) into."""
    samples, classes = index.samples, index.classes
    facts = facts if facts is not None else scan(samples, workers, options)
    splits = [s for s in ("train", "valid", "test") if any(x.split == s for x in samples)]
    pairs = all_near_pairs(facts, near_threshold)
    dup = _duplicates(samples, facts, splits, pairs)
    conflicts = _label_conflicts(samples, facts, pairs)
    patients = _patients_in_two_splits(samples)
    report = {
        "data": str(index.root), "n_images": len(samples), "classes": classes, "layout": index.layout,
        "split_level": index.split_level, "near_threshold_bits": near_threshold,
        "unreadable": [{"path": s.ref, "error": f.error} for s, f in zip(samples, facts) if f.error],
        "listed_twice": [{"path": samples[i].ref, "problem": why} for i, why in sorted(listing_problems(samples).items())],
        "duplicates": dup, "label_conflicts": conflicts,
        "patients_in_two_splits": {"n": len(patients), "examples": patients[:10]},
        "shortcuts": _shortcuts(samples, facts, classes),
        "confounds": {"file_names": file_name_confound(samples, classes), "style": _style(samples, facts, classes)},
    }
    if baseline and "train" in splits:
        part = {sp: [(s, f) for s, f in zip(samples, facts) if s.split == sp] for sp in splits}
        train, ft = zip(*part["train"])
        report["memorisation_baseline"] = {}
        for split in splits[1:]:
            b = split_baseline(train, list(ft), *map(list, zip(*part[split])), classes) if part[split] else None
            if b is not None:
                report["memorisation_baseline"][split] = b
    for split, n in _same_source(samples, splits).items():
        dup[split]["same_source_name_as_train"] = n
    cross = [r.get("near_copies_of_train", 0) + r.get("same_source_name_as_train", 0) for r in dup.values()]
    report["leakage"] = bool(sum(cross) or patients or conflicts["exact_images_with_two_labels"])
    report["shortcuts_flagged"] = sorted(k for k, v in report["shortcuts"].items() if v["flag"])
    copies = copy_pairs(samples, facts, pairs, source_name)
    clusters = cluster_rows(samples, copies)
    kinds = Counter(kind for _, _, kind, _ in copies)
    report["copies"] = {"pairs": len(copies), **{k: kinds.get(k, 0) for k in ("exact", "near", "same-source")},
                        "cross_split_pairs": sum(samples[i].split != samples[j].split for i, j, _, _ in copies),
                        "clusters_with_copies": len({r["cluster"] for r in clusters if r["cluster_size"] > 1}),
                        "tables": [RunDir.DUPLICATES, RunDir.CLUSTERS]}
    if run is not None:
        run.write_json(RunDir.AUDIT, report)
        run.write_csv(RunDir.DUPLICATES, PAIR_FIELDS, pair_rows(samples, copies))
        run.write_csv(RunDir.CLUSTERS, CLUSTER_FIELDS, clusters)
    return report


def run_audit(data: str | None = None, manifest: str | None = None, out: str | Path | None = None, *,
              seed: int = 42, val_fraction: float = 0.15, test_fraction: float = 0.15,
              near_threshold: int = NEAR_THRESHOLD, baseline: bool = True, overwrite: bool = False,
              options: ReadOptions | None = None, split_by: str = "given", positive_class: str | None = None) -> dict:
    """Find the data set as ``train`` would (same layouts, same seeded split, ``split_by`` as its
    ``--split-by``), audit it and, with ``out``, write ``out/audit.json``."""
    from bonetumor.data.grouping import split_samples
    from bonetumor.data.layouts import discover

    index = discover(data, manifest, positive_class=positive_class, options=options)
    index.samples, by_ref = split_samples(index.samples, split_by, val_fraction, test_fraction, seed, options,
                                          refuse_shared_patients=False)
    index.split_by = split_by
    run = RunDir.create(out, overwrite=overwrite, inputs=[data, manifest]) if out is not None else None
    index.root = index.root or str(data or manifest)
    return audit(index, near_threshold, baseline, options=options, run=run,
                 facts=[by_ref[s.ref] for s in index.samples] if by_ref else None)


def leakage_summary(report: dict) -> str:
    """One line naming each kind of leakage found (empty when none)."""
    parts = []
    for split, row in report["duplicates"].items():
        if row.get("near_copies_of_train"):
            parts.append(f"{row['near_copies_of_train']} of {row['n']} {split} images copy or nearly copy a training "
                         f"image ({row['exact_copies_of_train']} exact)")
        if row.get("same_source_name_as_train"):
            parts.append(f"{row['same_source_name_as_train']} {split} images share their export source name with a training image")
    if report["patients_in_two_splits"]["n"]:
        parts.append(f"{report['patients_in_two_splits']['n']} patient(s) in two splits")
    if report["label_conflicts"]["exact_images_with_two_labels"]:
        parts.append(f"{report['label_conflicts']['exact_images_with_two_labels']} image(s) under two labels")
    return "; ".join(parts)


def split_baseline(train: Sequence[Sample], ft: list[ImageFacts], held: Sequence[Sample], fh: list[ImageFacts],
                   classes: list[str], max_held: int = BASELINE_MAX_HELD, seed: int = 0) -> dict | None:
    """The 1-NN memorisation baseline for ``held`` images, fitted on the ``train`` images
    (facts from ``scan``), or None when either side has no readable image.

    Exact 1-NN costs (training images) x (held-out images); beyond ``max_held`` readable
    held-out images it scores a seeded random sample of that many, so the cost grows linearly
    with the data (``n`` says how many were scored, ``n_held`` how many there were)."""
    tr = [(f.thumb, s.label) for f, s in zip(ft, train) if f.error is None]
    he = [(f.thumb, s.label) for f, s in zip(fh, held) if f.error is None]
    if not tr or not he:
        return None
    n_held = len(he)
    if n_held > max_held:
        he = [he[k] for k in np.sort(np.random.default_rng(seed).choice(n_held, max_held, replace=False))]
    out = memorisation_baseline(np.stack([t for t, _ in tr]).astype(np.float32) / 255, [lab for _, lab in tr],
                                np.stack([t for t, _ in he]).astype(np.float32) / 255, [lab for _, lab in he], classes)
    return {**out, "n_held": n_held} if n_held > max_held else out


def copies_of(held: Sequence[Sample], fh: list[ImageFacts], ref: Sequence[Sample], fr: list[ImageFacts],
              near_threshold: int = NEAR_THRESHOLD) -> tuple[np.ndarray, dict[str, int]]:
    """Which ``held`` images copy a ``ref`` image: the same bytes, a near copy (as the audit
    defines it) or the same export source name. Returns (mask, count per reason)."""
    ref_sha = {f.sha256 for f in fr if f.error is None}
    ref_names = {source_name(s.path) for s in ref} - {None}
    exact = np.array([f.error is None and f.sha256 in ref_sha for f in fh], dtype=bool)
    near = np.zeros(len(held), dtype=bool)
    ok_h = [i for i, f in enumerate(fh) if f.error is None]
    ok_r = [f for f in fr if f.error is None]
    for i, _ in near_pairs([fh[i] for i in ok_h], ok_r, near_threshold, False):
        near[ok_h[i]] = True
    named = np.array([source_name(s.path) in ref_names for s in held], dtype=bool)
    mask = exact | near | named
    return mask, {"exact": int(exact.sum()), "near": int((near & ~exact).sum()),
                  "source_name_only": int((named & ~exact & ~near).sum()), "total": int(mask.sum())}

"""``evaluate``: a checkpoint's metrics, figures and per-image predictions on one split of a data set.

Every image of the split is scored once, in order, through the inference pipeline, and every
figure comes from those same predictions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonetumor.data.grouping import split_samples
from bonetumor.data.layouts import check_files, discover, image_problems
from bonetumor.data.splits import with_splits
from bonetumor.errors import BonetumorError
from bonetumor.evaluate.metrics import N_BOOT, compute_metrics, roc_band
from bonetumor.evaluate.names import UNLIKE_WORDS
from bonetumor.files import RunDir
from bonetumor.inference import Predictions, open_model, predict_samples
from bonetumor.model.checkpoint import LoadedCheckpoint
from bonetumor.model.ood import OOD_FIELDS, flagged
from bonetumor.runtime import distributed as ranks


def parse_class_map(text: str | None) -> dict[str, str] | None:
    """``malignant=cancer,normal=normal`` → {"malignant": "cancer", "normal": "normal"}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        src, eq, dst = part.partition("=")
        if not eq or not src.strip() or not dst.strip():
            raise BonetumorError(f"--class-map {text!r}: write it as theirs=ours,theirs=ours (e.g. malignant=cancer)")
        out[src.strip()] = dst.strip()
    return out


def select_samples(data, manifest, ck, split: str, class_map: dict[str, str] | None, run_dir: Path | None = None):
    """(all samples with splits, the samples to evaluate, classes dropped by the map and their counts)."""
    if class_map:
        bad = sorted(set(class_map.values()) - set(ck.classes))
        if bad:
            raise BonetumorError(f"--class-map maps to {bad}, which are not the model's classes {ck.classes}")
    index = discover(data, manifest, None, None, None, classes=ck.classes, options=ck.read_options,
                     class_map=class_map)
    samples, dropped = index.samples, index.dropped_classes
    if split == "all":
        return samples, list(samples), dropped
    all_samples = _splits_as_trained(samples, index, ck, run_dir)
    return all_samples, [s for s in all_samples if s.split == split], dropped


def _key(path: str, frame, root: str | None) -> str:
    """A sample's name relative to its data root: the same whatever folder a command ran from."""
    p = Path(path)
    rel = p.relative_to(root) if root and p.is_relative_to(root) else p
    return f"{rel.as_posix()}#{frame}" if frame not in (None, "") else rel.as_posix()


def _splits_as_trained(samples: list, index, ck, run_dir: Path | None) -> list:
    """The splits the model was trained with: the run's splits.csv when it lists every sample,
    else rebuilt as training built them (same seed, fractions and --split-by)."""
    cfg, run = ck.config, RunDir(run_dir) if run_dir is not None else None
    recorded = run.read_splits() if run is not None else None
    data = run.read_json(RunDir.DATA) if run is not None else None
    if recorded and data:
        by_key = {}
        for ref, sp in recorded.items():
            path, _, frame = ref.partition("#")
            by_key[_key(path, frame, data.get("root"))] = sp
        found = [by_key.get(_key(s.path, s.frame, index.root)) for s in samples]
        if all(found):
            return with_splits(samples, found)
    return split_samples(samples, cfg.split_by, cfg.val_fraction, cfg.test_fraction, cfg.seed, index.options)[0]


def evaluate(checkpoint: str | Path, data: str | None = None, out: str | Path = "eval", split: str = "test", *,
             manifest: str | None = None, device: str = "auto", batch_size: int | None = None,
             workers: int = 0, overwrite: bool = False, skip_bad_files: bool = False, baseline: bool = True,
             n_boot: int = N_BOOT, class_map: dict[str, str] | None = None, external: bool = False,
             exclude_near_duplicates_of: str | None = None) -> dict:
    """Evaluate a checkpoint on one split of a data set and write the results to ``out``.

    Writes metrics.json (each metric with a 95% bootstrap CI), classification_report.txt,
    predictions.csv, roc.png (with CI band), pr.png, reliability.png, scores.png and
    confusion_matrix.png. The split is rebuilt exactly as in training (same seed and fractions);
    ``split="all"`` takes every image (for an external data set).

    Args:
        baseline: also score a 1-nearest-neighbour look-up on the training split's thumbnails
            (``memorisation_baseline``).
        class_map: the data set's class names → the model's; other classes are dropped and counted.
        external: label the figures as external (another data set than the model's).
        exclude_near_duplicates_of: a split name (``train``): the same metrics again without the
            images that copy one of that split's (``excluding_copies``).

    Returns:
        The metrics dict (also in metrics.json); None on ranks other than 0 under torchrun.
    """
    split = {"val": "valid", "validation": "valid"}.get(split, split)
    if split not in ("train", "valid", "test", "all"):
        raise BonetumorError(f"--split must be train, valid, test or all, not {split!r}")
    inputs = [checkpoint, data, manifest]
    main = ranks.join(device)  # under torchrun each rank scores its share; rank 0 writes
    with ranks.together():  # every rank checks the inputs: bad input stops the job with one line
        RunDir(out).refuse_existing(overwrite, inputs=inputs)  # before the model is loaded
        ck, dev = open_model(checkpoint, device)
        all_samples, samples, dropped = select_samples(data, manifest, ck, split, class_map, Path(checkpoint).parent)
        if not samples:
            raise BonetumorError(f"{data or manifest}: no images in the {split} split")
        if exclude_near_duplicates_of is not None and not any(s.split == exclude_near_duplicates_of for s in all_samples):
            raise BonetumorError(f"--exclude-near-duplicates-of {exclude_near_duplicates_of}: the data has no "
                                 f"{exclude_near_duplicates_of} split")
        mine = image_problems([samples[i] for i in ranks.shard(len(samples))], options=ck.read_options, progress=main)
    problems = ranks.gather_in_order(ranks.shard(len(samples)), mine)  # each rank decoded its share once
    with ranks.together():
        samples, skipped = check_files(samples, skip_bad_files, problems=problems)
    run = ranks.output_folder(out, overwrite, inputs)  # once the inputs are known good: bad ones leave no folder
    preds = predict_samples(ck, samples, dev, batch_size or ck.config.batch_size, workers, what="evaluate")
    # Intervals resample patients (or, without ids, whole volumes/series): their images are not independent.
    groups = [s.patient_id or s.study for s in samples] if all(s.patient_id or s.study for s in samples) else None
    m = compute_metrics(preds.targets, preds.probs, ck.classes, ck.threshold, groups, n_boot)
    m.update({"split": split, "checkpoint": str(checkpoint), "data": str(data or manifest), "external": bool(external),
              "skipped_files": len(skipped), "precision": ck.precision_on(dev),
              "threshold_source": "validation" if ck.threshold_chosen else "default",
              # predictions.csv keeps the paths as given; a report run from elsewhere finds them from here
              "paths_relative_to": str(Path.cwd())})
    if class_map:
        m["class_map"], m["dropped_classes"] = class_map, dropped
    _notes(m, preds, ck, split)
    _lookup_figures(m, all_samples, samples, preds, ck, groups, n_boot, baseline, exclude_near_duplicates_of)
    ranks.close_distributed()
    if main:
        _write(run, m, samples, preds, ck, f"{split}, external" if external else split, groups, n_boot)
        _track(Path(checkpoint).parent, run, m, split, external, str(data or manifest))
    return m if main else None


def _track(model_run: Path, run: RunDir, m: dict, split: str, external: bool, data: str) -> None:
    """The metrics, figures and tables, added to the tracked run that trained the model: under
    the split's name, or ``external_<folder>`` for another data set, tagged external."""
    from bonetumor.tracking import add_results, flat_metrics

    label = f"external_{run.path.name}" if external else split
    numbers = flat_metrics(m, label) | flat_metrics(m.get("ood") or {}, f"{label}/unlike_training")
    tags = {f"evaluation.{label}.data": data} | ({"external_evaluation": "true"} if external else {})
    add_results(model_run, run, label, numbers, images=(RunDir.ROC, RunDir.CONFUSION, RunDir.PR, RunDir.RELIABILITY),
                files=(RunDir.METRICS, RunDir.CLASSIFICATION_REPORT, RunDir.PREDICTIONS), tags=tags)


def _write(run: RunDir, m: dict, samples: list, preds: Predictions, ck: LoadedCheckpoint, title: str,
           groups: list | None, n_boot: int) -> None:
    """metrics.json, the classification report, predictions.csv and the figures."""
    report = m.pop("classification_report")
    run.write_json(RunDir.METRICS, m)
    run.write_text(RunDir.CLASSIFICATION_REPORT, report)
    _write_predictions(run, samples, preds, ck)
    _write_figures(run, preds, m, ck, title, groups, n_boot)
    m["classification_report"] = report


def _notes(m: dict, preds: Predictions, ck: LoadedCheckpoint, split: str) -> None:
    """Notes on classes the split lacks, and the out-of-distribution figures."""
    missing = [c for i, c in enumerate(ck.classes) if not (preds.targets == i).any()]
    if missing:
        m["notes"] = [f"the {split} split holds no {', '.join(missing)} images: ROC-AUC and the metrics that "
                      f"need them (sensitivity, PPV, F1) are undefined (nan)"]
    _ood_figures(m, preds, ck, split)


def _ood_figures(m: dict, preds: Predictions, ck: LoadedCheckpoint, split: str) -> None:
    """The share of images the model's out-of-distribution check flags (overall and per class),
    with a note when it is well above what images like the training data give."""
    far = flagged(preds.distances, ck.ood)
    if far is None:
        return
    expected = 1 - float(ck.ood["quantile"])
    by_class = {c: float(far[preds.targets == i].mean()) for i, c in enumerate(ck.classes) if (preds.targets == i).any()}
    m["ood"] = {"flagged": int(far.sum()), "of": int(len(far)), "rate": float(far.mean()), "by_class": by_class,
                "expected_rate": expected, "threshold": float(ck.ood["threshold"]), "quantile": float(ck.ood["quantile"])}
    # Beyond four times the chance rate (and more than a couple of images): not chance any more.
    if far.mean() > max(4 * expected, 0.05) and far.sum() > 2:
        m.setdefault("notes", []).append(
            f"{far.mean():.0%} of the {split} images are {UNLIKE_WORDS} (images like it: about {expected:.0%}): the "
            f"model is judged here on images unlike those it learnt from, and its probabilities for them cannot be "
            f"trusted")


def _write_predictions(run: RunDir, samples, preds: Predictions, ck: LoadedCheckpoint) -> None:
    cols = ck.task.probability_columns()
    far = flagged(preds.distances, ck.ood)
    rows = ({"path": s.ref, "label": s.label, "prediction": ck.label_for(p),
             **dict(zip(cols, (f"{v:.6f}" for v in np.atleast_1d(p)))),
             **({} if far is None else {"ood_distance": f"{preds.distances[i]:.3f}", "unlike_training": bool(far[i])})}
            for i, (s, p) in enumerate(zip(samples, preds.probs)))
    run.write_csv(RunDir.PREDICTIONS, ["path", "label", *cols, "prediction", *([] if far is None else OOD_FIELDS)], rows)


def _write_figures(run: RunDir, preds: Predictions, m: dict, ck: LoadedCheckpoint, name: str, groups, n_boot: int) -> None:
    # Imported here: matplotlib adds about 30 MB and a second to every command that imports the
    # package (predict, serve), though only evaluate and fit draw.
    from bonetumor.evaluate.figures import (
        plot_confusion,
        plot_pr,
        plot_reliability,
        plot_roc,
        plot_score_hist,
    )

    if ck.task.binary:
        t, p = preds.targets, preds.probs
        auc = m["roc_auc"]
        run.save_figure(RunDir.ROC, plot_roc(t, p, title=f"ROC ({name}, n={m['n']})", band=roc_band(t, p, groups, n_boot),
                                             auc_ci=(auc["ci_low"], auc["ci_high"])))
        run.save_figure(RunDir.PR, plot_pr(t, p, title=f"Precision-recall ({name})"))
        run.save_figure(RunDir.RELIABILITY, plot_reliability(t, p, m["ece"]["value"], title=f"Reliability ({name})"))
        run.save_figure(RunDir.SCORES, plot_score_hist(t, p, ck.classes, ck.threshold, title=f"Scores per class ({name})"))
    title = f"Confusion matrix at threshold {ck.threshold:.3f}" if ck.task.binary else "Confusion matrix"
    run.save_figure(RunDir.CONFUSION, plot_confusion(np.array(m["confusion_matrix"]["matrix"]), ck.classes, title=title))


def _lookup_figures(m: dict, all_samples, ordered, preds: Predictions, ck, groups, n_boot: int, baseline: bool,
                    exclude_of: str | None) -> None:
    """Add the 1-NN look-up baseline and the metrics without copies of ``exclude_of`` to ``m``."""
    from bonetumor.data.audit import copies_of, scan, split_baseline

    train = [s for s in all_samples if s.split == "train"]
    if not ((baseline and train and m["split"] != "train") or exclude_of):
        return
    fh = scan(ordered, options=ck.read_options)
    cache: dict[str, tuple[list, list]] = {}  # a reference split is read once, even when both figures need it

    def facts_of(split: str) -> tuple[list, list]:
        if split not in cache:
            refs = [s for s in all_samples if s.split == split]
            cache[split] = (refs, scan(refs, options=ck.read_options))
        return cache[split]

    if baseline and train and m["split"] != "train":
        # Look-up alone, on the same images: when it comes near the model, the split measures memory.
        b = split_baseline(*facts_of("train"), ordered, fh, ck.classes)
        if b is not None:
            m["memorisation_baseline"] = b
    if exclude_of:
        mask, why = copies_of(ordered, fh, *facts_of(exclude_of))
        keep = ~mask
        sub = {"of": exclude_of, "removed": why, "n": int(keep.sum())}
        if keep.any():
            g = None if groups is None else [x for x, k in zip(groups, keep) if k]
            sub.update({k: v for k, v in compute_metrics(preds.targets[keep], preds.probs[keep], ck.classes, ck.threshold,
                                                         g, n_boot).items() if k != "classification_report"})
        m["excluding_copies"] = sub

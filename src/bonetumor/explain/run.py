"""``explain``: heatmaps for files or folders, scored against lesion masks when they exist.

Works batch by batch and writes each batch's outputs before the next, so memory stays flat
however many images there are; only per-image scores are kept. For a volume or DICOM series,
only its ``top_slices`` highest-scoring slices are explained.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bonetumor.data.layouts import read_manifest
from bonetumor.data.lesions import mask_lookup
from bonetumor.data.studies import Sample, expand_inputs
from bonetumor.explain.cam import compute_cams
from bonetumor.explain.grid import model_grid
from bonetumor.explain.index import index_page
from bonetumor.explain.margins import margin_scores, margin_summary
from bonetumor.explain.panels import cam_panel
from bonetumor.explain.scores import (
    bootstrap_ci,
    deletion_insertion,
    gaussian_baseline,
    localization_scores,
)
from bonetumor.files import RunDir
from bonetumor.inference import explained_batches, image_units
from bonetumor.model.backbones import BACKBONES
from bonetumor.model.checkpoint import LoadedCheckpoint, load_checkpoint
from bonetumor.progress import tracked
from bonetumor.runtime import distributed as ranks
from bonetumor.runtime.device import select_device

SCORES = ("pointing", "energy", "iou_top15")


@dataclass
class ExplainResult:
    """What ``explain`` wrote and the summary figures."""

    out: Path
    rows: list[dict] = field(default_factory=list)
    localization: dict | None = None
    faithfulness: dict | None = None
    grid: tuple[int, int] | None = None  # cells of the explained layer's map
    warning: str | None = None  # when that grid is too coarse to localise (``explain.grid``)
    margins: dict | None = None  # the maps' mass in the margins and on markers (``explain.margins``)
    note: str | None = None  # which model made the maps, when not the one given (a quantised folder's float one)


def truth_of(s: Sample, classes: list[str]) -> str | None:
    """The image's true class when known: its manifest label, else the name of its folder when
    that is one of the model's classes (the ``<class>/`` layouts)."""
    for name in (s.label, Path(s.path).parent.name):
        if name in classes:
            return name
    return None


def outcome(truth: str | None, predicted: str, classes: list[str]) -> str:
    """true/false positive/negative for a binary model, correct/wrong otherwise; unknown without truth."""
    if truth is None:
        return "unknown"
    if len(classes) != 2:
        return "correct" if truth == predicted else "wrong"
    kind = "positive" if predicted == classes[-1] else "negative"
    return f"{'true' if truth == predicted else 'false'} {kind}"


def _summary(rows: list[dict], prefix: str) -> dict:
    return {k: bootstrap_ci([r[f"{prefix}{k}"] for r in rows]) for k in SCORES}


def explain(checkpoint: str | Path | LoadedCheckpoint, paths, out: str | Path, method: str = "gradcam", target: str = "predicted",
            layer: str | None = None, masks=None, boxes=None, manifest=None, device: str = "auto",
            batch_size: int = 16, faithfulness_samples: int = 32, max_panels: int | None = None,
            overwrite: bool = False, top_slices: int = 3) -> ExplainResult | None:
    """Write a panel (image | heatmap | overlay), the raw map (.npy) per image and ``index.html``;
    with ground truth also ``localization.json``/``.csv``; deletion/insertion AUC on a sample.
    Volumes and series: the ``top_slices`` slices with the highest positive-class score.

    Under torchrun each rank explains its share (whole volumes) and writes its maps and panels;
    rank 0 writes the tables and returns the result (None on the other ranks).
    """
    inputs = [checkpoint, *(paths := list(paths)), manifest, masks, boxes]  # paths: checked, then expanded
    checkpoint, note = _with_gradients(checkpoint)
    main = ranks.join(device)
    with ranks.together():  # every rank checks the inputs: bad input stops the job with one line
        RunDir(out).refuse_existing(overwrite, inputs=inputs)  # before the model is loaded
        if isinstance(checkpoint, LoadedCheckpoint):  # a caller explaining several groups loads it once
            ck, dev = checkpoint, next(checkpoint.model.parameters()).device
        else:
            dev = ranks.local_device(select_device(device))
            ck = load_checkpoint(checkpoint, dev)  # Grad-CAM needs the PyTorch model's gradients
        layer = layer or BACKBONES[ck.config.backbone]["cam_layer"]
        grid, warning = model_grid(ck, layer)
        listed = read_manifest(Path(manifest)) if manifest else None
        samples = _with_truth(expand_inputs(paths, ck.read_options), listed)
        mine, ids = share_of_images(samples, top_slices)
        lookup = mask_lookup(masks, boxes, manifest, listed)
    run = ranks.output_folder(out, overwrite, inputs)
    run.folder(RunDir.MAPS)
    run.folder(RunDir.PANELS)
    # Volumes explain only their top slices, so their count is known only as they are read.
    batches = tracked(explained_batches(ck, mine, top_slices, dev, batch_size),
                      None if any(s.study for s in mine) else len(mine), "explain",
                      size=lambda b: len(b[1]), enabled=main)
    rows, faith = [], []
    with ranks.together():  # an unreadable image on one rank stops them all
        for start, chunk, x in batches:
            res = compute_cams(ck.model, x, layer, method, target, ck.classes, ck.threshold, ck.precision_on(dev))
            n = ids[start:start + len(chunk)]  # the images' numbers in the whole job
            k = sum(g < faithfulness_samples for g in n)  # the job's first images, wherever they are explained
            if k:
                d, i = deletion_insertion(ck.model, x[:k], res.maps[:k], res.target_index[:k], task=ck.task)
                faith += list(zip(d.tolist(), i.tolist()))
            rows += [_one_image(g, f, image, res, j, ck, lookup, run, max_panels)
                     for j, (g, (f, image)) in enumerate(zip(n, chunk))]
    if ranks.world_size() > 1:
        faith = ranks.gather_in_order([g for g in ids if g < faithfulness_samples][:len(faith)], faith)
        rows = ranks.gather_in_order(ids[:len(rows)], rows)
    ranks.close_distributed()
    if not main:
        return None
    for r in rows:  # the other ranks' files too, so that --overwrite removes them
        run.claim(r["map"])
        if r["panel"]:
            run.claim(r["panel"])
    result = ExplainResult(run.path, rows, grid=grid, warning=warning, note=note)
    result.faithfulness = {k: bootstrap_ci([f[c] for f in faith]) for c, k in enumerate(("deletion", "insertion"))}
    _write_tables(run, result, method, target, layer, ck.classes[-1])
    _track(checkpoint, run, result)
    return result


def _with_gradients(checkpoint):
    """(the model to explain, a note saying so when it is not the one given): a quantised
    folder's float checkpoint, as Grad-CAM needs gradients, which an int8 model has not."""
    if isinstance(checkpoint, LoadedCheckpoint) or not Path(checkpoint).is_dir():
        return checkpoint, None
    from bonetumor.model.quantized import float_checkpoint

    source = float_checkpoint(checkpoint)
    return source, (f"Grad-CAM ran on the float checkpoint {source}, which {checkpoint} was quantised from: an int8 "
                    "model has no gradients; its probabilities differ slightly from these")


def _track(checkpoint, run: RunDir, result: ExplainResult, panels: int = 4) -> None:
    """The maps' scores and the first few panels, added to the tracked run that trained the model
    (a checkpoint file's folder)."""
    from bonetumor.tracking import add_results, flat_metrics

    if isinstance(checkpoint, LoadedCheckpoint):
        return

    label = f"explain_{run.path.name}"
    numbers = flat_metrics(result.faithfulness or {}, label) | flat_metrics(result.margins or {}, f"{label}/margins")
    if result.localization:
        numbers |= flat_metrics(result.localization["cam"], f"{label}/cam")
        numbers |= flat_metrics(result.localization["baseline_centred_gaussian"], f"{label}/centred_baseline")
    shown = [r["panel"] for r in result.rows if r["panel"]][:panels]
    add_results(Path(checkpoint).parent, run, label, numbers, images=shown,
                files=(RunDir.EXPLAIN, RunDir.LOCALIZATION, RunDir.INDEX))


def _with_truth(samples: list[Sample], listed: list[Sample] | None) -> list[Sample]:
    """``samples`` with the labels a manifest's rows (``listed``) give them: their truth."""
    if listed is None:
        return samples
    labels = {str(Path(s.path).resolve()): s.label for s in listed}
    return [replace(s, label=labels.get(str(Path(s.path).resolve()), s.label)) for s in samples]


def share_of_images(samples: list[Sample], top_slices: int) -> tuple[list[Sample], list[int]]:
    """(this rank's samples, the number in the whole job of each image they explain): a 2-D image
    explains one image and a volume or series its ``top_slices`` best slices (all of a smaller
    one), so the numbers, and the file names made from them, are known before any image is read.
    Ranks take whole units ``rank::world``; a process on its own takes everything."""
    units = image_units(samples)
    counts = [1 if u[0].study is None else min(len(u), top_slices) for u in units]
    starts = np.cumsum([0, *counts])
    mine, ids = [], []
    for u in ranks.shard(len(units)):
        mine += units[u]
        ids += range(int(starts[u]), int(starts[u + 1]))
    return mine, ids


def _one_image(n: int, f: Sample, original: torch.Tensor, res, j: int, ck, lookup, run: RunDir, max_panels) -> dict:
    h, w = original.shape[-2:]
    cam = F.interpolate(res.maps[j][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    cam = cam.clamp(0, 1).cpu().numpy().astype(np.float32)
    p_file = Path(f.path)
    name = p_file.name if f.frame is None else f"{p_file.name} slice {f.frame}"
    base = p_file.name[:-7] if p_file.name.lower().endswith(".nii.gz") else p_file.stem
    stem = f"{n:05d}_{base}" + ("" if f.frame is None else f"_slice{f.frame:04d}")
    run.save(f"{RunDir.MAPS}/{stem}.npy", lambda tmp: _save_npy(tmp, cam))
    p = res.probs[j]
    prob, label = float(p.max()), ck.classes[int(res.predicted[j])]
    truth = truth_of(f, ck.classes)
    row = {"path": f.path, "slice": f.frame, "study": f.study, "probability": round(prob, 6), "prediction": label,
           "truth": truth, "outcome": outcome(truth, label, ck.classes),
           "explained_class": ck.classes[int(res.target_index[j])], "map": f"{RunDir.MAPS}/{stem}.npy", "panel": ""}
    row.update(margin_scores(cam, original.mean(dim=0).numpy()))
    mask = lookup(p_file, (h, w)) if f.frame is None else None  # lesion masks are given per 2-D image
    if mask is not None and mask.any():
        row.update(localization_scores(cam, mask))
        row.update({f"baseline_{k}": v for k, v in localization_scores(gaussian_baseline((h, w)), mask).items()})
    if max_panels is None or n < max_panels:
        row["panel"] = f"{RunDir.PANELS}/{stem}.png"
        said = f"truth {truth}, predicted {label}" if truth else f"predicted {label}"
        title = f"{name}: {said} (P {ck.classes[-1] if ck.task.binary else label} {prob:.3f})"
        panel = cam_panel(original.permute(1, 2, 0).numpy(), cam, title, mask)
        run.save(row["panel"], lambda tmp: panel.save(tmp, format="PNG"))
    return row


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a temporary name
        np.save(f, arr)


def _write_tables(run: RunDir, result: ExplainResult, method: str, target: str, layer: str, positive: str) -> None:
    rows = result.rows
    scored = [r for r in rows if "pointing" in r]
    if scored:
        # Images with a lesion that the model also called positive: where a map should point at it.
        correct_pos = [r for r in scored if r["prediction"] == positive]
        result.localization = {
            "method": method, "target": target, "layer": layer, "grid": result.grid, "grid_warning": result.warning,
            "n_images": len(rows), "n_with_lesion": len(scored),
            "cam": _summary(scored, ""), "baseline_centred_gaussian": _summary(scored, "baseline_"),
            "correctly_classified_positive": {"n": len(correct_pos), "cam": _summary(correct_pos, ""),
                                              "baseline_centred_gaussian": _summary(correct_pos, "baseline_")},
        }
        run.write_json(RunDir.LOCALIZATION, result.localization)
        keys = ["path", "probability", "prediction", "explained_class", *SCORES, *[f"baseline_{k}" for k in SCORES]]
        run.write_csv(RunDir.LOCALIZATION_TABLE, keys, scored)
    result.margins = margin_summary(rows)
    run.write_json(RunDir.EXPLAIN, {"method": method, "target": target, "layer": layer, "n_images": len(rows),
                                    **({"model_note": result.note} if result.note else {}),
                                    "grid": result.grid, "grid_warning": result.warning,
                                    "faithfulness": result.faithfulness, "margins": result.margins, "images": rows})
    run.write_text(RunDir.INDEX, index_page(rows, f"{method} ({target}, {layer})", result.warning))

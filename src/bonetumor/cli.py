"""Command line: one thin function per command over the Python API.

A BonetumorError becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from bonetumor.errors import BonetumorError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Train, evaluate and explain CNN classifiers of bone-tumour images.")
err = Console(stderr=True)
WINDOW_HELP = ("Window: CENTRE,WIDTH in stored units (e.g. 40,400 Hounsfield) or pLOW,pHIGH percentiles "
               "(e.g. p1,p99). Default: the file's own (DICOM header, NIfTI 0.5-99.5 percentiles).")
out = Console(soft_wrap=True)


def _friendly(fn: Callable) -> Callable:
    """Turn user-fixable errors into one line and exit code 2."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BonetumorError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
    return wrapper


@app.command()
@_friendly
def synth(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder to create."),
    n_patients: int = typer.Option(100, help="Synthetic patients (half with cancer)."),
    size: int = typer.Option(128, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
    modality: str = typer.Option("mri", help="mri (axial limb slices) or xray (long-bone projections)."),
    slices: int = typer.Option(4, help="Images per patient."),
    bit_depth: int = typer.Option(8, help="PNG bit depth: 8 or 16."),
    zoom: float = typer.Option(1.0, help="Narrow the field of view onto the bone by this factor."),
    fmt: str = typer.Option("png", "--format", help="png, dicom (a series folder per patient) or nifti (a volume per patient)."),
):
    """Write a synthetic data set with tumour masks: OUT/{train,valid,test}/{cancer,normal}/ + manifest.csv."""
    from bonetumor.data.synth import create_synthetic_dataset

    r = create_synthetic_dataset(out_dir, n_patients, size, seed, modality, slices, bit_depth, zoom, fmt)
    out.print(f"wrote {r.n_images} images of {r.n_patients} patients to {r.root} (manifest: {r.manifest})")


@app.command()
@_friendly
def train(
    data: Optional[str] = typer.Argument(None, help="Data folder (any supported layout)."),
    out_dir: Path = typer.Option(..., "--out", help="Run folder to create."),
    config: Optional[Path] = typer.Option(None, help="YAML file of options (flags override it)."),
    manifest: Optional[str] = typer.Option(None, help="CSV with path,label[,patient_id][,split]."),
    train_dir: Optional[str] = typer.Option(None, help="Training folder of <class>/ subfolders."),
    val_dir: Optional[str] = typer.Option(None, help="Validation folder of <class>/ subfolders."),
    test_dir: Optional[str] = typer.Option(None, help="Test folder of <class>/ subfolders."),
    positive_class: Optional[str] = typer.Option(None, help="Positive class when none is named 'cancer'."),
    val_fraction: Optional[float] = typer.Option(None, help="Validation share when the tool splits (default 0.15)."),
    test_fraction: Optional[float] = typer.Option(None, help="Test share when the tool splits (default 0.15; 0 for none)."),
    epochs: Optional[int] = typer.Option(None),
    image_size: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = typer.Option(None, help="constant or cosine (decays to 1% of --lr by the last epoch)."),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps."),
    workers: Optional[int] = typer.Option(None, help="Data-loading worker processes."),
    precision: Optional[str] = typer.Option(None, help="auto (the device's native bf16/fp16 when a validation batch "
                                            "agrees with fp32 within 0.01, else fp32), fp32, bf16 or fp16."),
    weights: Optional[str] = typer.Option(None, help="imagenet, none, or a weights/checkpoint file."),
    backbone: Optional[str] = typer.Option(None, help="resnet50, densenet121 or efficientnet_b0."),
    freeze: Optional[str] = typer.Option(None, help="backbone (train the head only) or none."),
    unfreeze: Optional[str] = typer.Option(None, help="Blocks to fine-tune, e.g. layer4,layer3."),
    output_stride: Optional[int] = typer.Option(None, help="32, or 16/8 for resnet50: finer feature map and Grad-CAM."),
    recompute_stages: Optional[int] = typer.Option(None, help="Fine-tuning: recompute the first N backbone stages in "
                                                   "backward instead of keeping them: less memory, more time (0-5; default 0; "
                                                   "1 is the stem)."),
    bn_statistics: Optional[str] = typer.Option(None, help="Fine-tuning: BatchNorm statistics from each batch (batch) or "
                                                "kept from the pretrained weights (frozen: faster, less memory); "
                                                "default auto: frozen unless --weights none."),
    patience: Optional[int] = typer.Option(None, help="Early-stopping patience in epochs."),
    checkpoint_seconds: Optional[float] = typer.Option(None, help="Write best.pt/last.pt when this many seconds have "
                                                       "passed since the last write, and at the end (default 30; 0 = every epoch)."),
    threshold_rule: Optional[str] = typer.Option(None, help="Operating point chosen on validation: youden (default), "
                                                "sensitivity:0.95, specificity:0.9 or fixed:0.5."),
    calibrate: Optional[bool] = typer.Option(None, "--calibrate/--no-calibrate", help="Temperature scaling fitted on validation."),
    class_balanced: Optional[bool] = typer.Option(None, "--class-balanced/--no-class-balanced"),
    skip_bad_files: Optional[bool] = typer.Option(None, "--skip-bad-files/--no-skip-bad-files"),
    audit: Optional[bool] = typer.Option(None, "--audit/--no-audit", help="Leakage audit before training (default on)."),
    cache_features: Optional[bool] = typer.Option(None, "--cache-features/--no-cache-features",
                                                  help="Frozen backbone: compute its features once (default on)."),
    feature_views: Optional[int] = typer.Option(None, help="Augmented views per training image for the feature cache (default 4; 1 = none)."),
    feature_cache_dir: Optional[str] = typer.Option(None, help="Keep cached features on disk here, for later runs."),
    cache_images: Optional[bool] = typer.Option(None, "--cache-images/--no-cache-images",
                                                help="Keep decoded, resized images in memory (default: on for GPUs)."),
    compile_mode: Optional[str] = typer.Option(None, "--compile", help="torch.compile the frozen backbone's feature pass: "
                                               "auto (from 5,000 image views on), on or off."),
    window: Optional[str] = typer.Option(None, help=WINDOW_HELP),
    slice_axis: Optional[int] = typer.Option(None, help="NIfTI axis to slice across (0, 1 or 2; 2 = axial in RAS)."),
    allow_large_images: Optional[bool] = typer.Option(None, "--allow-large-images/--no-allow-large-images",
                                                      help="Read images above Pillow's decompression-bomb limit."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    resume: bool = typer.Option(False, help="Continue the run in --out from last.pt."),
):
    """Train a classifier; writes best.pt, last.pt, history.csv, curves.png and the run record."""
    from bonetumor.config import load_config
    from bonetumor.train import fit

    overrides = {k: v for k, v in dict(
        data=data, manifest=manifest, train_dir=train_dir, val_dir=val_dir, test_dir=test_dir,
        positive_class=positive_class, val_fraction=val_fraction, test_fraction=test_fraction, epochs=epochs, image_size=image_size, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
        seed=seed, device=device, workers=workers, precision=precision, weights=weights, backbone=backbone, freeze=freeze,
        unfreeze=[u.strip() for u in unfreeze.split(",") if u.strip()] if unfreeze is not None else None,
        output_stride=output_stride, recompute_stages=recompute_stages, bn_statistics=bn_statistics, patience=patience, checkpoint_seconds=checkpoint_seconds, class_balanced=class_balanced, skip_bad_files=skip_bad_files, audit=audit,
        threshold_rule=threshold_rule, calibrate=calibrate, window=window, slice_axis=slice_axis,
        cache_features=cache_features, feature_views=feature_views, feature_cache_dir=feature_cache_dir,
        cache_images=cache_images, compile=compile_mode,
        allow_large_images=allow_large_images).items()}
    cfg = load_config(config, overrides)
    res = fit(cfg, out_dir, overwrite=overwrite, resume=resume)
    out.print(f"best epoch {res.best_epoch} (val_loss {res.best_val_loss:.4f}); run folder: {res.run_dir}")


@app.command()
@_friendly
def cv(
    data: Optional[str] = typer.Argument(None, help="Data folder (same layout rules as train)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the fold runs and the summary."),
    folds: int = typer.Option(5, help="Number of folds (stratified, grouped by patient)."),
    config: Optional[Path] = typer.Option(None, help="YAML file of training options (as for train)."),
    manifest: Optional[str] = typer.Option(None),
    epochs: Optional[int] = typer.Option(None),
    image_size: Optional[int] = typer.Option(None),
    weights: Optional[str] = typer.Option(None, help="imagenet, none, or a weights file."),
    freeze: Optional[str] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    overwrite: bool = typer.Option(False),
):
    """Cross-validation: one model per fold, out-of-fold predictions, per-fold table and mean ± sd."""
    from bonetumor.config import load_config
    from bonetumor.cv import cross_validate

    cfg = load_config(config, {"data": data, "manifest": manifest, "epochs": epochs, "image_size": image_size,
                               "weights": weights, "freeze": freeze, "seed": seed, "device": device})
    r = cross_validate(cfg, out_dir, folds, overwrite=overwrite)
    t = Table(title=f"{folds}-fold cross-validation ({r['n_images']} images, {r['split_level']}-level folds)")
    # The main columns fit a terminal; every metric is in cv_folds.csv and cv.json.
    names = [n for n in ("roc_auc", "accuracy", "sensitivity", "specificity", "ece") if n in r["mean_sd"]]
    for col in ("fold", "n", *names):
        t.add_column(col, justify="right")
    for f in r["per_fold"]:
        t.add_row(str(f["fold"]), str(f["n"]), *(f"{f[n]:.3f}" for n in names))
    t.add_row("mean", "", *(f"{r['mean_sd'][n]['mean']:.3f}" for n in names))
    t.add_row("sd", "", *(f"{r['mean_sd'][n]['sd']:.3f}" for n in names))
    out.print(t)
    auc = r["pooled_out_of_fold"].get("roc_auc")
    if auc:
        out.print(f"pooled out-of-fold ROC-AUC {auc['value']:.4f} [{auc['ci_low']:.4f}, {auc['ci_high']:.4f}]")
    out.print(f"out-of-fold predictions: {out_dir / 'oof_predictions.csv'}; summary: {out_dir / 'cv.json'}")


@app.command()
@_friendly
def report(
    run: Path = typer.Argument(..., help="Run folder (holds best.pt, config.yaml)."),
    eval_dir: Optional[List[Path]] = typer.Option(None, "--eval", help="Folder written by evaluate; repeat it to add "
                                                 "other evaluations (another split, external data) beside the first."),
    explain_dir: Optional[Path] = typer.Option(None, "--explain", help="Folder written by explain (for localization)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default RUN/report.html)."),
):
    """One self-contained HTML report: data and audit, methods, metrics with CIs, plots, calibration,
    failure gallery with Grad-CAM, localization, intended use and limitations."""
    from bonetumor.report import build_report

    evals = list(eval_dir or [])
    path = build_report(run, evals[0] if evals else None, explain_dir, out_file, evals[1:])
    out.print(f"report written to {path}")


def _print_metrics(m: dict) -> None:
    iv = m.get("interval", {})
    kind = "EXTERNAL " if m.get("external") else ""
    t = Table(title=f"{kind}{m.get('split', '')} metrics (n={m['n']}; 95% CI, bootstrap over {iv.get('unit', 'image')}s)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI", justify="right")
    half = m.get("at_threshold_0.5")
    if half:
        t.add_column("at threshold 0.5", justify="right")
    for k in ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1",
              "brier", "ece"):
        if k in m:
            v = m[k]
            row = [k, f"{v['value']:.4f}", f"[{v['ci_low']:.4f}, {v['ci_high']:.4f}]"]
            t.add_row(*row, *([f"{half[k]:.4f}" if k in half else ""] if half else []))
    if "threshold" in m:
        t.add_row("threshold", f"{m['threshold']:.4f}", "", *(["0.5000"] if half else []))
    out.print(t)
    for note in m.get("notes", []):
        out.print(f"[yellow]note:[/] {note}")
    for how, pm in m.get("per_patient", {}).items():
        out.print(f"per patient ({m.get('n_patients')} patients, score = {how} over slices): ROC-AUC "
                  f"{pm['roc_auc']['value']:.4f} [{pm['roc_auc']['ci_low']:.4f}, {pm['roc_auc']['ci_high']:.4f}], "
                  f"accuracy {pm['accuracy']['value']:.4f}, sensitivity {pm['sensitivity']['value']:.4f}, "
                  f"specificity {pm['specificity']['value']:.4f}")
    b = m.get("memorisation_baseline")
    if b:
        out.print(f"beside it, 1-nearest-neighbour look-up on training thumbnails: accuracy {b['accuracy']:.4f}, "
                  f"ROC-AUC {b['roc_auc']:.4f} (when close to the model's, the split measures memory, not learning)")


@app.command()
@_friendly
def evaluate(
    checkpoint: Path = typer.Argument(..., help="RUN/best.pt"),
    data: Optional[str] = typer.Argument(None, help="Data folder (same layout rules as train)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for metrics and figures."),
    split: Optional[str] = typer.Option(None, help="train, valid, test (default) or all (default with --external)."),
    manifest: Optional[str] = typer.Option(None),
    class_map: Optional[str] = typer.Option(None, help="Their class names to the model's, e.g. malignant=cancer,normal=normal; "
                                            "other classes are dropped and counted."),
    external: bool = typer.Option(False, help="Another data set than the model's: figures labelled external."),
    exclude_near_duplicates_of: Optional[str] = typer.Option(None, help="Also report the metrics without images that "
                                                             "copy one of this split's (e.g. train)."),
    device: str = typer.Option("auto"),
    batch_size: Optional[int] = typer.Option(None),
    workers: int = typer.Option(0),
    skip_bad_files: bool = typer.Option(False),
    overwrite: bool = typer.Option(False),
):
    """Metrics (JSON), classification report, ROC and confusion-matrix plots, per-image predictions."""
    from bonetumor.evaluate.run import evaluate as run_eval

    if data is None and manifest is None:
        raise BonetumorError("no data given: pass DATA or --manifest")
    from bonetumor.evaluate.run import parse_class_map

    split = split or ("all" if external else "test")
    m = run_eval(checkpoint, data, out_dir, split, manifest=manifest, device=device, batch_size=batch_size,
                 workers=workers, overwrite=overwrite, skip_bad_files=skip_bad_files, class_map=parse_class_map(class_map),
                 external=external, exclude_near_duplicates_of=exclude_near_duplicates_of)
    _print_metrics(m)
    if m.get("dropped_classes"):
        out.print(f"dropped (not in --class-map): {m['dropped_classes']}")
    ex = m.get("excluding_copies")
    if ex:
        r = ex["removed"]
        line = (f"without the {r['total']} images that copy a {ex['of']} image ({r['exact']} exact, {r['near']} near, "
                f"{r['source_name_only']} by export source name): n={ex['n']}")
        if "roc_auc" in ex:
            line += (f", ROC-AUC {ex['roc_auc']['value']:.4f} [{ex['roc_auc']['ci_low']:.4f}, {ex['roc_auc']['ci_high']:.4f}],"
                     f" accuracy {ex['accuracy']['value']:.4f} (all images: {m['roc_auc']['value']:.4f}, {m['accuracy']['value']:.4f})")
        out.print(line)
    out.print(m["classification_report"])
    out.print(f"results in {out_dir}")


@app.command()
@_friendly
def audit(
    data: Optional[str] = typer.Argument(None, help="Data folder (same layout rules as train)."),
    manifest: Optional[str] = typer.Option(None, help="CSV with path,label[,patient_id][,split]."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for audit.json."),
    seed: int = typer.Option(42, help="Split seed, when the tool splits (as train's --seed)."),
    near_threshold: int = typer.Option(6, help="Near-duplicate: pHash differs in at most this many of 64 bits."),
    strict: bool = typer.Option(False, help="Exit with code 1 when leakage is found."),
    window: Optional[str] = typer.Option(None, help=WINDOW_HELP),
    slice_axis: int = typer.Option(2, help="NIfTI axis to slice across."),
    allow_large_images: bool = typer.Option(False, help="Read images above Pillow's decompression-bomb limit."),
    overwrite: bool = typer.Option(False),
):
    """Leakage and confound audit: duplicates within and across splits, patients in two splits,
    images with two labels, per-class shortcuts, and a 1-nearest-neighbour memorisation baseline."""
    from bonetumor.data.audit import leakage_summary, run_audit
    from bonetumor.data.pixels import ReadOptions, parse_window

    if data is None and manifest is None:
        raise BonetumorError("no data given: pass DATA or --manifest")
    parse_window(window)
    r = run_audit(data, manifest, out_dir, seed=seed, near_threshold=near_threshold, overwrite=overwrite,
                  options=ReadOptions(window, slice_axis, allow_large_images))
    t = Table(title=f"duplicates ({r['n_images']} images, {r['split_level']}-level splits)")
    for col in ("split", "n", "exact within", "near within", "exact copies of train", "exact or near copies of train",
                "same source name as train"):
        t.add_column(col, justify="right")
    for split, row in r["duplicates"].items():
        cp = (f"{row['exact_copies_of_train']} ({row['exact_rate']:.1%})", f"{row['near_copies_of_train']} ({row['near_rate']:.1%})") \
            if "exact_copies_of_train" in row else ("", "")
        src = row.get("same_source_name_as_train")
        t.add_row(split, str(row["n"]), str(row["exact_duplicates_within"]), str(row["near_duplicates_within"]), *cp,
                  "" if src is None else f"{src} ({src / max(row['n'], 1):.1%})")
    out.print(t)
    t = Table(title="shortcuts (numbers: single-feature ROC-AUC; categories: total variation distance)")
    for col in ("feature", "effect", "flag", "per class"):
        t.add_column(col)
    for name, v in r["shortcuts"].items():
        eff = f"AUC {v['auc']:.3f}" if v["kind"] == "numeric" else f"TVD {v['tvd']:.3f}"
        per = "; ".join(f"{c}: {x['mean']:.3g}" if v["kind"] == "numeric" else f"{c}: {next(iter(x), '')}"
                        for c, x in v["per_class"].items())
        t.add_row(name, eff, "[yellow]yes[/]" if v["flag"] else "", per)
    out.print(t)
    for split, b in r.get("memorisation_baseline", {}).items():
        out.print(f"1-NN memorisation baseline on {split}: accuracy {b['accuracy']:.3f}, ROC-AUC {b['roc_auc']:.3f} (n={b['n']})")
    if r["unreadable"]:
        out.print(f"[yellow]{len(r['unreadable'])} unreadable files[/], e.g. {r['unreadable'][0]['path']}: {r['unreadable'][0]['error']}")
    summary = leakage_summary(r)
    out.print(f"[bold yellow]leakage:[/] {summary}" if summary else "no leakage found")
    if out_dir is not None:
        out.print(f"audit written to {out_dir / 'audit.json'}")
    if strict and r["leakage"]:
        raise typer.Exit(1)


@app.command()
@_friendly
def predict(
    checkpoint: Path = typer.Argument(..., help="RUN/best.pt"),
    files: List[str] = typer.Argument(..., help="Image files, DICOM files or series folders, NIfTI volumes, folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines (images, then studies) instead of tables."),
    aggregate: str = typer.Option("topk:3", help="Study score from its slices: max, mean or topk:K (mean of the K highest)."),
    window: Optional[str] = typer.Option(None, help=WINDOW_HELP + " Default: the model's."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Also write predictions.csv (and studies.csv) here."),
    skip_bad_files: bool = typer.Option(False, help="List unreadable files with their problem instead of stopping."),
    overwrite: bool = typer.Option(False),
    engine: str = typer.Option("auto", help="auto (OpenVINO on a CPU, when installed, for 1,000 images or more or "
                               "a checkpoint already exported; else torch), torch, onnx (ONNX Runtime, fp32) or openvino (OpenVINO, fp32 or bf16; the fastest "
                               "on a CPU). The last two run a model.onnx from export, or export RUN/best.pt first (~7 s, "
                               "once: kept in ~/.cache/bonetumor/exports or $BONETUMOR_CACHE_DIR)."),
    precision: str = typer.Option("auto", help="auto (the device's native bf16/fp16 when a batch agrees with fp32 within 0.01; "
                                  "fp32 for a single batch), fp32, bf16 or fp16."),
    compile_mode: str = typer.Option("auto", "--compile", help="torch.compile the model: auto (from 5,000 images on, "
                                     "where its compile time pays), on or off."),
    device: str = typer.Option("auto"),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch; default 8 on a CPU, 64 on a GPU."),
    workers: Optional[int] = typer.Option(None, help="Processes decoding images ahead of the model; default: up to 8 "
                                          "on a GPU, none on a CPU."),
):
    """Probability of cancer (the positive class) and the label for each image or slice, and one
    aggregated score per volume or DICOM series."""
    from bonetumor.predict import predict_studies, write_predictions
    from bonetumor.rundir import RunDir

    run = RunDir.create(out_dir, overwrite=overwrite) if out_dir is not None else None
    rows, studies = predict_studies(checkpoint, files, aggregate, device, batch_size, window, skip_bad_files, engine,
                                    precision, compile_mode, workers)
    if run is not None:
        write_predictions(run, rows, studies)
    if as_json:
        for r in rows + studies:
            sys.stdout.write(json.dumps(r) + "\n")
        return
    t = Table()
    for col in ("file", "slice", "probability", "label"):
        t.add_column(col, justify="right" if col in ("slice", "probability") else "left")
    for r in rows:
        p = r.get("probability")
        shown = r.get("error") and f"[red]{r['error']}[/]" or (f"{p:.4f}" if p is not None else json.dumps(r["probabilities"]))
        t.add_row(r["path"], "" if r["slice"] is None else str(r["slice"]), shown, r.get("label", ""))
    out.print(t)
    if studies:
        t = Table(title=f"studies (score = {aggregate} of the slice scores)")
        for col in ("study", "slices", "probability", "label", "top slices"):
            t.add_column(col)
        for s in studies:
            p = s.get("probability")
            t.add_row(s["study"], str(s["n_slices"]), f"{p:.4f}" if p is not None else json.dumps(s["probabilities"]),
                      s["label"], " ".join(map(str, s["top_slices"][:3])))
        out.print(t)
    bad = sum("error" in r for r in rows)
    if bad:
        err.print(f"[yellow]{bad} unreadable file(s) skipped[/]")


@app.command()
@_friendly
def demo(
    out_dir: Path = typer.Option(Path("demo_output"), "--out", help="Folder for data, run and evaluation."),
    overwrite: bool = typer.Option(False),
    device: str = typer.Option("auto"),
    epochs: Optional[int] = typer.Option(None, help="Override the demo's epochs."),
):
    """Synthetic data → train ResNet50 from scratch → evaluate on the test split."""
    from bonetumor.demo import run_demo

    r = run_demo(out_dir, overwrite=overwrite, device=device, epochs=epochs)
    _print_metrics(r.metrics)
    _print_explain(r.explanation, "gradcam")
    out.print(f"demo finished in {r.seconds:.0f} s")
    out.print(f"  training curves:  {r.run_dir / 'curves.png'}")
    out.print(f"  ROC curve:        {r.eval_dir / 'roc.png'} (also pr.png, reliability.png, scores.png)")
    out.print(f"  confusion matrix: {r.eval_dir / 'confusion_matrix.png'}")
    out.print(f"  metrics:          {r.eval_dir / 'metrics.json'}")
    out.print(f"  Grad-CAM panels:  {r.explanation.out / 'index.html'}")
    out.print(f"  localization:     {r.explanation.out / 'localization.json'}")
    out.print(f"  checkpoint:       {r.run_dir / 'best.pt'}")
    out.print(f"  report:           {r.report}")


@app.command()
@_friendly
def explain(
    checkpoint: Path = typer.Argument(..., help="RUN/best.pt"),
    files: List[str] = typer.Argument(..., help="Image files or folders."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for panels, maps and scores."),
    method: str = typer.Option("gradcam", help="gradcam, gradcam++ or eigencam."),
    target: str = typer.Option("predicted", help="predicted, or a class name (e.g. cancer, normal)."),
    layer: Optional[str] = typer.Option(None, help="Module to explain (default: the backbone's last block)."),
    masks: Optional[Path] = typer.Option(None, help="Folder of lesion masks named like the images."),
    boxes: Optional[Path] = typer.Option(None, help="CSV path,x0,y0,x1,y1 of lesion boxes."),
    manifest: Optional[Path] = typer.Option(None, help="Manifest CSV with a mask_path column."),
    top_slices: int = typer.Option(3, help="Slices explained per volume or DICOM series (the highest-scoring)."),
    device: str = typer.Option("auto"),
    batch_size: int = typer.Option(16),
    overwrite: bool = typer.Option(False),
):
    """Heatmaps (image | heatmap | overlay panels, raw .npy maps, index.html), scored against lesions."""
    from bonetumor.explain.run import explain as run_explain

    if top_slices < 1:
        raise BonetumorError(f"--top-slices must be at least 1, not {top_slices}")
    r = run_explain(checkpoint, files, out_dir, method, target, layer, masks, boxes, manifest, device, batch_size,
                    overwrite=overwrite, top_slices=top_slices)
    _print_explain(r, method)
    out.print(f"{len(r.rows)} images explained; open {out_dir / 'index.html'}")


def _print_explain(r, method: str) -> None:
    if r.localization:
        t = Table(title=f"localization ({r.localization['n_with_lesion']} images with a lesion), 95% bootstrap CI")
        for col in ("score", method, "centred Gaussian baseline"):
            t.add_column(col)
        for k in ("pointing", "energy", "iou_top15"):
            a, b = r.localization["cam"][k], r.localization["baseline_centred_gaussian"][k]
            t.add_row(k, f"{a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]",
                      f"{b['value']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]")
        out.print(t)
        c = r.localization["correctly_classified_positive"]
        if c["n"]:
            a = c["cam"]["pointing"]
            b = c["baseline_centred_gaussian"]["pointing"]
            out.print(f"pointing game on the {c['n']} lesion images the model called positive: "
                      f"{a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] (baseline {b['value']:.3f})")
    if r.faithfulness and r.faithfulness["deletion"]["n"]:
        out.print(f"faithfulness on {r.faithfulness['deletion']['n']} images: deletion AUC "
                  f"{r.faithfulness['deletion']['value']:.3f} (lower is better), insertion AUC "
                  f"{r.faithfulness['insertion']['value']:.3f} (higher is better)")


@app.command()
@_friendly
def export(
    checkpoint: Path = typer.Argument(..., help="RUN/best.pt"),
    onnx: Path = typer.Option(..., "--onnx", help="The .onnx file to write."),
    overwrite: bool = typer.Option(False),
):
    """Export a checkpoint to one ONNX file (checked against PyTorch) for `predict --engine onnx|openvino`."""
    from bonetumor.model.export import export_onnx

    r = export_onnx(checkpoint, onnx, overwrite=overwrite)
    out.print(f"wrote {r['path']} ({r['bytes'] / 2**20:.1f} MB); ONNX Runtime vs PyTorch on 4 images: "
              f"max |Δ probability| {r['max_abs_diff_probability']:.2e}, max |Δ logit| {r['max_abs_diff_logit']:.2e}")


@app.command()
@_friendly
def serve(
    checkpoint: Path = typer.Argument(..., help="RUN/best.pt"),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs --token."),
    port: int = typer.Option(8000),
    token: Optional[str] = typer.Option(None, envvar="BONETUMOR_TOKEN",
                                        help="Bearer token every API call must send (or set BONETUMOR_TOKEN)."),
    max_upload_mb: float = typer.Option(50.0, help="Larger uploads are refused (413)."),
    device: str = typer.Option("auto"),
):
    """Serve the page (drop a scan, see the probability and the heatmap) and the API (/docs)."""
    from bonetumor.serve.run import check_bind, run_server

    check_bind(host, token)
    out.print(f"serving {checkpoint} on http://{host if ':' not in host else f'[{host}]'}:{port}/ (API docs: /docs)"
              + ("; API calls need the bearer token" if token else ""))
    run_server(checkpoint, host, port, token, max_upload_mb, device)


@app.command("fetch-weights")
@_friendly
def fetch_weights(backbone: str = typer.Option("resnet50", help="resnet50, densenet121 or efficientnet_b0.")):
    """Download ImageNet weights into torch's cache (run on a connected machine)."""
    from bonetumor.model.backbones import fetch_imagenet_weights

    out.print(f"ImageNet weights for {backbone}: {fetch_imagenet_weights(backbone)}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

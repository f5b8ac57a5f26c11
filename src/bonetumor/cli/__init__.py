"""Command line: one thin function per command over the Python API.

A BonetumorError becomes one line on stderr and exit code 2, never a traceback (friendly.py).
The options of ``train`` and ``cv`` are made from the config schema (options.py); what commands
print is in show.py. Heavy modules are imported inside each command, so that ``--help`` stays quick.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from bonetumor.cli.deploy import quantize_command
from bonetumor.cli.friendly import friendly
from bonetumor.cli.options import tidy_panels, with_config_options
from bonetumor.cli.show import out
from bonetumor.cli.tuning import lr_find_command
from bonetumor.config import WINDOW_DEFAULT, WINDOW_HELP
from bonetumor.data.synth import FORMATS, MODALITIES
from bonetumor.errors import BonetumorError, RankStopped

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Train, evaluate and explain CNN classifiers of bone-tumour images.")
DEVICE_HELP = "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps."


def _print_version(value: bool) -> None:
    if value:
        from bonetumor import __version__

        out.print(f"bonetumor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train, evaluate and explain CNN classifiers of bone-tumour images."""
    # pydicom warns about oddities of a file (a frame count of 0, excess pixel bytes) with its own
    # source paths; on the command line each file's real problem is one line of ours instead.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


@app.command()
@friendly
def synth(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder to create."),
    n_patients: int = typer.Option(100, help="Synthetic patients (half with cancer)."),
    size: int = typer.Option(128, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
    modality: str = typer.Option("mri", help=", ".join(f"{k} ({v})" for k, v in MODALITIES.items()) + "."),
    slices: int = typer.Option(4, help="Images per patient."),
    bit_depth: int = typer.Option(8, help="PNG bit depth: 8 or 16."),
    zoom: float = typer.Option(1.0, help="Narrow the field of view onto the bone by this factor."),
    fmt: str = typer.Option("png", "--format", help=", ".join(f"{k} ({v})" for k, v in FORMATS.items()) + "."),
):
    """Write a synthetic data set with tumour masks: OUT/{train,valid,test}/{cancer,normal}/ + manifest.csv."""
    from bonetumor.data.synth import create_synthetic_dataset

    r = create_synthetic_dataset(out_dir, n_patients, size, seed, modality, slices, bit_depth, zoom, fmt)
    out.print(f"wrote {r.n_images} images of {r.n_patients} patients to {r.root} (manifest: {r.manifest})")


@app.command()
@friendly
@with_config_options
def train(
    data: Optional[str] = typer.Argument(None, help="Data folder (any supported layout)."),
    out_dir: Path = typer.Option(..., "--out", help="Run folder to create."),
    config: Optional[Path] = typer.Option(None, help="YAML file of options (flags override it)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    resume: bool = typer.Option(False, help="Continue the run in --out from last.pt."),
    nproc_per_node: int = typer.Option(1, help="Train as this many processes on this machine (torchrun, "
                                       "DistributedDataParallel); --batch-size is per process."),
    options: dict = None,
):
    """Train a classifier; writes best.pt, last.pt, history.csv, curves.png and the run record.
    Every option is listed in docs/options.md; a YAML file takes the same names."""
    from bonetumor.config import load_config
    from bonetumor.runtime import distributed as ranks
    from bonetumor.train import fit

    if nproc_per_node > 1 and not ranks.launched():
        try:
            ranks.launch(nproc_per_node, sys.argv[1:])
        except RankStopped:
            raise
        except BonetumorError as e:
            raise BonetumorError(f"{e}; {out_dir} keeps its last checkpoint: add --resume to continue the run") from None
        return
    res = fit(load_config(config, {"data": data, **options}), out_dir, overwrite=overwrite, resume=resume)
    if ranks.is_main():  # under torchrun, one line for the job
        out.print(f"best epoch {res.best_epoch} (val_loss {res.best_val_loss:.4f}); run folder: {res.run_dir}")
    ranks.close_distributed()


@app.command()
@friendly
@with_config_options
def cv(
    data: Optional[str] = typer.Argument(None, help="Data folder (same layout rules as train)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the fold runs and the summary."),
    folds: int = typer.Option(5, help="Number of folds (stratified, grouped by patient)."),
    config: Optional[Path] = typer.Option(None, help="YAML file of training options (as for train)."),
    overwrite: bool = typer.Option(False),
    nproc_per_node: int = typer.Option(1, help="Train each fold as this many processes (as for train)."),
    options: dict = None,
):
    """Cross-validation: one model per fold, out-of-fold predictions, per-fold table and mean ± sd.
    Takes every training option (docs/options.md)."""
    from bonetumor.cli.show import show_cv
    from bonetumor.config import load_config
    from bonetumor.cv import cross_validate
    from bonetumor.runtime.distributed import launch, launched

    if nproc_per_node > 1 and not launched():
        return launch(nproc_per_node, sys.argv[1:])
    r = cross_validate(load_config(config, {"data": data, **options}), out_dir, folds, overwrite=overwrite)
    if r is not None:  # None on the other ranks of a torchrun job
        show_cv(r, folds, out_dir)


@app.command()
@friendly
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
    device: str = typer.Option("auto", help=DEVICE_HELP),
    batch_size: Optional[int] = typer.Option(None),
    workers: int = typer.Option(0),
    skip_bad_files: bool = typer.Option(False),
    overwrite: bool = typer.Option(False),
):
    """Metrics (JSON), classification report, ROC and confusion-matrix plots, per-image predictions."""
    from bonetumor.cli.show import show_evaluation
    from bonetumor.evaluate.run import evaluate as run_eval
    from bonetumor.evaluate.run import parse_class_map

    if data is None and manifest is None:
        raise BonetumorError("no data given: pass DATA or --manifest")
    split = split or ("all" if external else "test")
    m = run_eval(checkpoint, data, out_dir, split, manifest=manifest, device=device, batch_size=batch_size,
                 workers=workers, overwrite=overwrite, skip_bad_files=skip_bad_files, class_map=parse_class_map(class_map),
                 external=external, exclude_near_duplicates_of=exclude_near_duplicates_of)
    if m is not None:  # None on the other ranks of a torchrun job
        show_evaluation(m, out_dir)


@app.command()
@friendly
def audit(
    data: Optional[str] = typer.Argument(None, help="Data folder (same layout rules as train)."),
    manifest: Optional[str] = typer.Option(None, help="CSV with path,label[,patient_id][,split]."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for audit.json."),
    seed: int = typer.Option(42, help="Split seed, when the tool splits (as train's --seed)."),
    near_threshold: int = typer.Option(6, help="Near-duplicate: pHash differs in at most this many of 64 bits."),
    strict: bool = typer.Option(False, help="Exit with code 1 when leakage is found."),
    split_by: str = typer.Option("given", help="Audit the splits train's --split-by given|patient|cluster would make."),
    positive_class: Optional[str] = typer.Option(None, help="Positive class when none is named 'cancer' (as train's)."),
    window: Optional[str] = typer.Option(None, help=f"Window: {WINDOW_HELP} Default: {WINDOW_DEFAULT}."),
    slice_axis: int = typer.Option(2, help="NIfTI axis to slice across."),
    allow_large_images: bool = typer.Option(False, help="Read images above Pillow's decompression-bomb limit."),
    overwrite: bool = typer.Option(False),
):
    """Leakage and confound audit: duplicates within and across splits, patients in two splits,
    images with two labels, per-class shortcuts, and a 1-nearest-neighbour memorisation baseline."""
    from bonetumor.cli.show import show_audit
    from bonetumor.data.audit import run_audit
    from bonetumor.data.pixels import ReadOptions, parse_window

    if data is None and manifest is None:
        raise BonetumorError("no data given: pass DATA or --manifest")
    parse_window(window)
    if split_by not in ("given", "patient", "cluster"):
        raise BonetumorError(f"--split-by {split_by}: use given, patient or cluster")
    r = run_audit(data, manifest, out_dir, seed=seed, near_threshold=near_threshold, overwrite=overwrite,
                  options=ReadOptions(window, slice_axis, allow_large_images), split_by=split_by,
                  positive_class=positive_class)
    show_audit(r, out_dir)
    if strict and r["leakage"]:
        raise typer.Exit(1)


@app.command()
@friendly
def predict(
    checkpoint: Path = typer.Argument(..., help="RUN/best.pt, a model.onnx, or a folder from quantize."),
    files: List[str] = typer.Argument(..., help="Image files, DICOM files or series folders, NIfTI volumes, folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines (images, then studies) instead of tables."),
    aggregate: str = typer.Option("topk:3", help="Study score from its slices: max, mean or topk:K (mean of the K highest)."),
    window: Optional[str] = typer.Option(None, help=f"Window: {WINDOW_HELP} Default: the model's."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Also write predictions.csv (and studies.csv) here."),
    skip_bad_files: bool = typer.Option(False, help="List unreadable files with their problem instead of stopping."),
    overwrite: bool = typer.Option(False),
    engine: str = typer.Option("auto", help="auto (OpenVINO on a CPU, when installed, for 1,000 images or more or "
                               "a checkpoint already exported; else torch), torch, onnx (ONNX Runtime, fp32) or openvino (OpenVINO, fp32 or bf16; the fastest "
                               "on a CPU). The last two run a model.onnx from export, or export RUN/best.pt first (~7 s, "
                               "once: kept in ~/.cache/bonetumor/exports or $BONETUMOR_CACHE_DIR)."),
    precision: str = typer.Option("model", help="model (the precision chosen and checked on validation at training, "
                                  "where this device runs it natively, else fp32), or fp32, bf16 or fp16 to force one; "
                                  "int8: a folder from quantize."),
    compile_mode: str = typer.Option("auto", "--compile", help="torch.compile the model: auto (from 5,000 images on, "
                                     "where its compile time pays), on or off."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch; default 8 on a CPU, 64 on a GPU."),
    workers: Optional[int] = typer.Option(None, help="Processes decoding images ahead of the model; default: up to 8 "
                                          "on a GPU, none on a CPU."),
):
    """Probability of cancer (the positive class) and the label for each image or slice, and one
    aggregated score per volume or DICOM series."""
    from bonetumor.files import RunDir
    from bonetumor.predict import predict_studies, write_predictions
    from bonetumor.runtime.distributed import close_distributed, join, together

    main = join(device)  # under torchrun: each rank scores its share, rank 0 writes and prints
    with together():
        run = RunDir.create(out_dir, overwrite=overwrite, inputs=[checkpoint, *files]) if out_dir and main else None
    rows, studies = predict_studies(checkpoint, files, aggregate, device, batch_size, window, skip_bad_files, engine,
                                    precision, compile_mode, workers)
    close_distributed()
    if run is not None:
        write_predictions(run, rows, studies)
    if not main:
        return
    if as_json:
        for r in rows + studies:
            sys.stdout.write(json.dumps(r) + "\n")
        return
    from bonetumor.cli.show import show_predictions

    show_predictions(rows, studies, aggregate)


@app.command()
@friendly
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
    device: str = typer.Option("auto", help=DEVICE_HELP),
    batch_size: int = typer.Option(16),
    overwrite: bool = typer.Option(False),
):
    """Heatmaps (image | heatmap | overlay panels, raw .npy maps, index.html), scored against lesions."""
    from bonetumor.cli.show import show_explained
    from bonetumor.explain.run import explain as run_explain

    if top_slices < 1:
        raise BonetumorError(f"--top-slices must be at least 1, not {top_slices}")
    r = run_explain(checkpoint, files, out_dir, method, target, layer, masks, boxes, manifest, device, batch_size,
                    overwrite=overwrite, top_slices=top_slices)
    if r is not None:  # None on the other ranks of a torchrun job: rank 0 reports
        show_explained(r, method)


@app.command()
@friendly
def report(
    run: Path = typer.Argument(..., help="Run folder (holds best.pt, config.yaml)."),
    eval_dir: Optional[List[Path]] = typer.Option(None, "--eval", help="Folder written by evaluate; repeat it to add "
                                                 "other evaluations (another split, external data) beside the first."),
    explain_dir: Optional[Path] = typer.Option(None, "--explain", help="Folder written by explain (for localization)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default RUN/report.html, "
                                            "replaced each time)."),
    overwrite: bool = typer.Option(False),
):
    """One self-contained HTML report: data and audit, methods, metrics with CIs, plots, calibration,
    failure gallery with Grad-CAM, localization, intended use and limitations."""
    from bonetumor.report import build_report

    evals = list(eval_dir or [])
    path = build_report(run, evals[0] if evals else None, explain_dir, out_file, evals[1:], overwrite)
    out.print(f"report written to {path}")


@app.command()
@friendly
def demo(
    out_dir: Path = typer.Option(Path("demo_output"), "--out", help="Folder for data, run and evaluation."),
    overwrite: bool = typer.Option(False),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    epochs: Optional[int] = typer.Option(None, help="Override the demo's epochs."),
    guided: bool = typer.Option(False, help="Train with the synthetic lesion masks as guidance (--lesion-masks)."),
):
    """Synthetic data → train ResNet50 from scratch → evaluate on the test split."""
    from bonetumor.cli.show import show_explain, show_metrics
    from bonetumor.demo import run_demo

    r = run_demo(out_dir, overwrite=overwrite, device=device, epochs=epochs, guided=guided)
    show_metrics(r.metrics)
    show_explain(r.explanation, "gradcam")
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
@friendly
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
@friendly
def serve(
    checkpoint: Path = typer.Argument(..., help="RUN/best.pt"),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs --token."),
    port: int = typer.Option(8000),
    token: Optional[str] = typer.Option(None, envvar="BONETUMOR_TOKEN",
                                        help="Bearer token every API call must send (or set BONETUMOR_TOKEN)."),
    allowed_hosts: Optional[str] = typer.Option(
        None, help="Comma-separated names clients use in the URL ('*': any); default the loopback names and --host."),
    max_upload_mb: float = typer.Option(50.0, help="Larger uploads are refused (413) before they are read."),
    max_connections: int = typer.Option(512, min=1, help="Open connections beyond this get 503 and are closed."),
    header_timeout: float = typer.Option(10.0, min=0.1, help="Seconds a client has to send its request headers."),
    body_timeout: float = typer.Option(30.0, min=0.1, help="Longest silence, in seconds, while an upload is sent."),
    request_timeout: float = typer.Option(120.0, min=1, help="Seconds from headers to answer, model work included "
                                                             "(then 503 for the request, the server goes on)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Serve the page (drop a scan, see the probability and the heatmap) and the API (/docs)."""
    from bonetumor.serve.guard import ServeLimits
    from bonetumor.serve.run import allowed_hosts as hosts_for
    from bonetumor.serve.run import check_bind, run_server

    check_bind(host, token)
    limits = ServeLimits(max_upload_mb=max_upload_mb, header_timeout=header_timeout, body_timeout=body_timeout,
                         request_timeout=request_timeout, max_connections=max_connections,
                         allowed_hosts=hosts_for(host, allowed_hosts))
    out.print(f"serving {checkpoint} on http://{host if ':' not in host else f'[{host}]'}:{port}/ (API docs: /docs)"
              + ("; API calls need the bearer token" if token else ""))
    run_server(checkpoint, host, port, token, limits, device)


@app.command("fetch-weights")
@friendly
def fetch_weights(backbone: str = typer.Option("resnet50", help="resnet50, densenet121 or efficientnet_b0.")):
    """Download ImageNet weights into torch's cache (run on a connected machine)."""
    from bonetumor.model.backbones import fetch_imagenet_weights

    out.print(f"ImageNet weights for {backbone}: {fetch_imagenet_weights(backbone)}")

app.command("lr-find")(lr_find_command)
app.command("quantize")(quantize_command)
tidy_panels(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

"""``quantize``: a checkpoint made int8 for OpenVINO on a CPU (quantize.py)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from bonetumor.cli.friendly import friendly
from bonetumor.cli.show import out


@friendly
def quantize_command(
    checkpoint: Path = typer.Argument(..., help="RUN/best.pt"),
    calibration: str = typer.Option(..., help="Labelled data folder (as train takes): its training split calibrates, "
                                    "its validation split checks the int8 model against the float one."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the int8 model (e.g. RUN/int8)."),
    samples: int = typer.Option(300, help="Calibration images, drawn from the training split."),
    max_drop: Optional[float] = typer.Option(None, help="Accuracy control: keep layers in float until the validation "
                                             "ROC-AUC is within this (absolute) of the float model's, e.g. 0.005."),
    min_agreement: float = typer.Option(0.99, help="Accuracy control: also keep layers in float until this share "
                                        "of validation labels are the float model's."),
    max_float_layers: int = typer.Option(20, help="Accuracy control: at most this many layers go back to float "
                                         "(each costs a pass over the validation images)."),
    validation: Optional[str] = typer.Option(None, help="Another labelled folder to validate on (all its images), "
                                             "instead of the calibration data's validation split."),
    manifest: Optional[str] = typer.Option(None, help="CSV manifest of the calibration data (path,label,...)."),
    seed: int = typer.Option(0, help="Seed of the calibration images' draw."),
    overwrite: bool = typer.Option(False),
):
    """int8 post-training quantisation of a checkpoint for OpenVINO on a CPU (ONNX Runtime's
    quantiser; NNCF's accuracy control with --max-drop); predict, evaluate and serve take the
    folder it writes (Grad-CAM runs on the float checkpoint)."""
    from bonetumor.quantize import quantize_checkpoint

    with warnings.catch_warnings(record=True):  # its fallback warning is printed below, as one line
        warnings.simplefilter("always")
        m = quantize_checkpoint(checkpoint, calibration, out_dir, samples=samples, max_drop=max_drop,
                                max_float_layers=max_float_layers, min_agreement=min_agreement, validation=validation, overwrite=overwrite,
                                manifest=manifest, seed=seed)
    c, control = m["check"], m["accuracy_control"]
    if m["precision"] != "int8":
        out.print(f"[yellow]warning:[/yellow] {m['fallback']}: {out_dir} holds the float model (OpenVINO fp32)")
    auc = (f"ROC-AUC {c['roc_auc_float']:.4f} float, {c['roc_auc_int8']:.4f} {m['precision']}; "
           if "roc_auc_float" in c else "")
    n = m["layers"]
    out.print(f"{m['precision']} model: {out_dir} ({m['calibration']['images']} calibration images, {m['seconds']:.0f} s; "
              f"{n['int8']} of {n['convolutions_and_matmuls']} convolutions and matrix products in int8)\n"
              f"on {c['images']} {c['on']} images: {auc}labels agree {c['label_agreement']:.2%} at threshold "
              f"{m['threshold']:.4f}; largest probability difference {c['max_abs_diff_probability']:.4f}"
              + (f"; unlike-training flags agree {c['ood_flag_agreement']:.2%}" if "ood_flag_agreement" in c else ""))
    if control and not control["met"]:
        out.print(f"[yellow]warning:[/yellow] the validation ROC-AUC fell by {c['roc_auc_drop']:.4f} (--max-drop "
                  f"{control['max_drop']}) and {c['label_agreement']:.2%} of labels agree (--min-agreement "
                  f"{control['min_agreement']}) with at most {control['max_float_layers']} layers back in float: pass a "
                  "larger --max-float-layers, or keep the float model")

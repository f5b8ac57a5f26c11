"""Grad-CAM throughput beside inference throughput, ResNet50 at 224 px, in one run.

Compares, at batch 1, 8 and 16, fp32 and bf16 autocast:
    inference      model(x) under inference_mode, BatchNorms folded once for the run (as ``predict`` runs it)
    ours           bonetumor's Grad-CAM (gradient above the target layer only; BatchNorms folded per call
                   from 4 images on)
    captum         Captum's LayerGradCam (autograd.grad to the layer output, parameters as they are)
    pytorch_grad_cam  pytorch-grad-cam's GradCAM (loss.backward(): every trainable parameter's gradient too)
Medians of 5 interleaved rounds after a warm-up.

    python benchmarks/gradcam_speed.py [--out benchmarks/results/gradcam_speed_cpu.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch

from bonetumor.explain.cam import compute_cams
from bonetumor.files import atomic_write_json
from bonetumor.model.backbones import create_model
from bonetumor.runtime.batchnorm import inference_folded
from bonetumor.runtime.device import environment_info, select_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gradcam_speed_cpu.json")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--freeze", default="none", help="none: a fine-tuned model whose parameters require grad "
                    "(the hard case for CAM code); backbone: the frozen default")
    args = ap.parse_args()
    dev = select_device(args.device)
    torch.manual_seed(0)
    model = create_model("resnet50", "none", freeze=args.freeze).to(dev).to(memory_format=torch.channels_last).eval()
    try:
        from captum.attr import LayerGradCam
    except ImportError:
        LayerGradCam = None
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
    except ImportError:
        GradCAM = None
    # Inference as bonetumor's predict runs it: a copy of the model with its BatchNorms folded
    # once for the whole run (Grad-CAM folds per call, from FOLD_MIN_BATCH images on).
    folded = copy.deepcopy(model)
    stack = contextlib.ExitStack()
    stack.enter_context(inference_folded(folded))
    results = []
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else None
        for b in [int(v) for v in args.batches.split(",")]:
            x = torch.randn(b, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)

            def infer():
                with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    folded(x)

            fns = {"inference": infer,
                   "ours_gradcam": lambda: compute_cams(model, x, "backbone.layer4", "gradcam", target="cancer",
                                                        precision=precision)}
            if LayerGradCam is not None:
                lgc = LayerGradCam(model, model.backbone.layer4)

                def captum():
                    with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        lgc.attribute(x.clone().requires_grad_(True), target=0, relu_attributions=True)

                fns["captum_gradcam"] = captum
            row = {"precision": precision, "batch": b}
            if GradCAM is not None:
                pgc = GradCAM(model=model, target_layers=[model.backbone.layer4])
                targets = [BinaryClassifierOutputTarget(1)] * b

                def library():
                    with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        pgc(input_tensor=x, targets=targets)
                    model.zero_grad(set_to_none=True)

                try:
                    library()
                    fns["pytorch_grad_cam"] = library
                except TypeError as e:  # it converts activations to numpy, which has no bfloat16
                    row["pytorch_grad_cam_error"] = str(e)
            # Interleaved repetitions: each round times every method once, so that the machine's
            # drift hits all of them alike; the figure is the median over rounds.
            times = {k: [] for k in fns}
            for fn in fns.values():
                fn()
            for _ in range(args.reps):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            for k, t in times.items():
                row[f"{k}_ips"] = b / statistics.median(t)
            ratios = [ti / to for ti, to in zip(times["inference"], times["ours_gradcam"])]
            row["ours_vs_inference_per_round_median"] = statistics.median(ratios)
            row["ours_vs_inference"] = row["ours_gradcam_ips"] / row["inference_ips"]
            if "captum_gradcam_ips" in row:
                row["ours_vs_captum"] = row["ours_gradcam_ips"] / row["captum_gradcam_ips"]
            if "pytorch_grad_cam_ips" in row:
                row["ours_vs_pytorch_grad_cam"] = row["ours_gradcam_ips"] / row["pytorch_grad_cam_ips"]
            row = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            print(json.dumps(row), flush=True)
            results.append(row)
    atomic_write_json(args.out, {"model": "resnet50", "freeze": args.freeze, "image_size": 224,
                                 "layer": "backbone.layer4", "reps": args.reps, "results": results,
                                 "environment": environment_info(dev)})


if __name__ == "__main__":
    main()

"""Inference engines on the CPU: PyTorch, ONNX Runtime and OpenVINO, ResNet50 at 224 px.

Exports a ResNet50 checkpoint (random weights) with ``bonetumor export``, then measures, in one run
and interleaved, each repetition between two ceiling measurements (benchmarks/ceiling.py): the model
alone (images/s at batch 8: PyTorch eager fp32 and bf16 autocast, ONNX Runtime fp32, OpenVINO fp32
and bf16, and bf16 with the batch not split over two streams), and ``predict`` end to end
(checkpoint load, PNG decode, resize and the precision check included) over a folder of ``--files``
PNGs with each engine and with the CLI's defaults (``--engine auto``: OpenVINO, as the checkpoint's
export is in the cache by then; with nothing exported, PyTorch below 1,000 images, i.e. the torch
figure), and with PyTorch's, OpenVINO's and the defaults over ``--large-files`` (the defaults' first
call, which exports the checkpoint into the cache, on its own). Every figure is the median of
``--reps`` after a warm-up, and a share of the mean ceiling of its precision.
Also the largest probability differences against PyTorch fp32.

    python benchmarks/onnx_inference.py [--out benchmarks/results/onnx_inference_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

# (name, precision): what each figure is measured against
MODEL = {"torch_fp32": "fp32", "torch_bf16": "bf16", "onnx_fp32": "fp32", "openvino_fp32": "fp32",
         "openvino_bf16": "bf16", "openvino1_bf16": "bf16"}  # openvino1: one stream (a batch not split in two)
PREDICT = {"torch_auto": ("torch", "auto", "bf16"), "onnx_fp32": ("onnx", "fp32", "fp32"),
           "openvino_auto": ("openvino", "auto", "bf16"), "openvino_fp32": ("openvino", "fp32", "fp32"),
           "defaults": ("auto", "auto", "bf16")}  # the CLI's: --engine auto --precision auto, on the checkpoint (exported)
LARGE = ("torch_auto", "openvino_auto", "defaults")  # also over a larger folder, where fixed costs weigh less


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/onnx_inference_cpu.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--files", type=int, default=180)
    ap.add_argument("--large-files", type=int, default=1000, help="A larger folder for predict's default engines.")
    args = ap.parse_args()
    import numpy as np
    import torch
    from ceiling import measure_ceiling

    from bonetumor.config import TrainConfig
    from bonetumor.data.writers import write_png
    from bonetumor.files import atomic_write_json
    from bonetumor.model.backbones import create_model
    from bonetumor.model.checkpoint import load_checkpoint, save_checkpoint
    from bonetumor.model.export import export_onnx, load_onnx, load_openvino
    from bonetumor.predict import predict
    from bonetumor.runtime.device import cpu_has_fast_bf16, environment_info

    cpu = torch.device("cpu")
    if not cpu_has_fast_bf16():
        raise SystemExit("this benchmark compares bf16 figures: it needs a CPU with native bf16")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_checkpoint(tmp / "m.pt", create_model("resnet50", "none"), TrainConfig(data="x", image_size=args.size),
                        ["normal", "cancer"])
        exp = export_onnx(tmp / "m.pt", tmp / "m.onnx")
        rng = np.random.default_rng(0)
        for i in range(max(args.files, args.large_files)):
            write_png(tmp / ("imgs" if i < args.files else "more") / f"{i:04d}.png", rng.random((256, 256)))
        engines = {"torch": load_checkpoint(tmp / "m.pt"), "onnx": load_onnx(tmp / "m.onnx"),
                   "openvino": load_openvino(tmp / "m.onnx"), "openvino1": load_openvino(tmp / "m.onnx")}
        engines["openvino1"].model.streams = 1
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)

        def model_rate(name: str) -> float:
            engine, precision = name.split("_")
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                engines[engine].model(x)  # warm: oneDNN kernel choice, ORT session, OpenVINO compile
                t0 = time.perf_counter()
                for _ in range(6):
                    engines[engine].model(x)
                return 6 * args.batch / (time.perf_counter() - t0)

        def predict_rate(engine: str, precision: str, large: bool = False) -> float:
            folders = [tmp / "imgs", tmp / "more"] if large else [tmp / "imgs"]
            t0 = time.perf_counter()
            rows = predict(tmp / ("m.pt" if engine in ("torch", "auto") else "m.onnx"), folders, device="cpu",
                           batch_size=args.batch, engine=engine, precision=precision)
            return len(rows) / (time.perf_counter() - t0)

        # The defaults over the larger folder, first call: the checkpoint is exported into the cache
        os.environ["BONETUMOR_CACHE_DIR"] = str(tmp / "export-cache")
        first_call = predict_rate("auto", "auto", large=True)

        for name in MODEL:
            model_rate(name)
        ceilings = [measure_ceiling(cpu, True, 3)]
        rates: dict[str, list[float]] = {**{f"model_{k}": [] for k in MODEL}, **{f"predict_{k}": [] for k in PREDICT},
                                         **{f"predict_large_{k}": [] for k in LARGE}}
        for _ in range(args.reps):
            for name in MODEL:
                rates[f"model_{name}"].append(model_rate(name))
            for name, (engine, precision, _) in PREDICT.items():
                rates[f"predict_{name}"].append(predict_rate(engine, precision))
            for name in LARGE:
                rates[f"predict_large_{name}"].append(predict_rate(*PREDICT[name][:2], large=True))
            ceilings.append(measure_ceiling(cpu, True, 3))
            print({k: round(v[-1], 2) for k, v in rates.items()}, flush=True)
        ref = [r["probability"] for r in predict(tmp / "m.pt", [tmp / "imgs"], device="cpu", precision="fp32")]
        diffs = {}
        for name, (engine, precision, _) in PREDICT.items():
            got = predict(tmp / ("m.pt" if engine in ("torch", "auto") else "m.onnx"), [tmp / "imgs"], device="cpu",
                          engine=engine, precision=precision)
            diffs[name] = float(np.max(np.abs(np.array(ref) - np.array([r["probability"] for r in got]))))
    ceiling = {p: statistics.mean(c[p]["inference_ips"] for c in ceilings) for p in ("fp32", "bf16")}
    med = {k: statistics.median(v) for k, v in rates.items()}
    of = {**{f"model_{k}": med[f"model_{k}"] / ceiling[p] for k, p in MODEL.items()},
          **{f"predict_{k}": med[f"predict_{k}"] / ceiling[p] for k, (_, _, p) in PREDICT.items()},
          **{f"predict_large_{k}": med[f"predict_large_{k}"] / ceiling[PREDICT[k][2]] for k in LARGE}}
    summary = {"benchmark": "onnx_inference", "date": time.strftime("%Y-%m-%d"), "image_size": args.size,
               "batch": args.batch, "reps": args.reps, "files": args.files, "large_files": max(args.files, args.large_files),
               "ceiling_inference_ips": ceiling, "ceilings": ceilings,
               "images_per_second": {k: round(v, 2) for k, v in med.items()},
               "of_ceiling": {k: round(v, 3) for k, v in of.items()},
               "max_abs_diff_probability_vs_torch_fp32": diffs,
               "predict_large_defaults_first_call_with_export": {"ips": round(first_call, 2),
                                                                 "of_ceiling": round(first_call / ceiling["bf16"], 3)},
               "export_check": {k: v for k, v in exp.items() if k != "path"}, "runs": rates,
               "environment": environment_info(cpu), "engines": {m: version(m) for m in ("onnxruntime", "openvino")}}
    atomic_write_json(args.out, summary)
    print(json.dumps({k: summary[k] for k in ("ceiling_inference_ips", "images_per_second", "of_ceiling",
                                              "max_abs_diff_probability_vs_torch_fp32")}, indent=1))


if __name__ == "__main__":
    main()

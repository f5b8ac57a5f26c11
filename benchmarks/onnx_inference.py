"""ONNX Runtime vs PyTorch inference: ResNet50 at 224 px, fp32, on the CPU.

Exports a ResNet50 checkpoint (random weights) with ``bonetumor export``, then measures, in one
run and interleaved: the model alone (images/s at batch 8, median of ``--reps`` after a warm-up)
in PyTorch eager (channels_last, inference_mode) and in ONNX Runtime; and ``predict`` end to
end over a folder of 64 PNGs with each engine. Also the largest probability difference.

    python benchmarks/onnx_inference.py [--out benchmarks/results/onnx_inference_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/onnx_inference_cpu.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    import numpy as np
    import torch

    from bonetumor.checkpoint import load_checkpoint, save_checkpoint
    from bonetumor.config import TrainConfig
    from bonetumor.data.io import write_png
    from bonetumor.export import export_onnx, load_onnx
    from bonetumor.models import create_model
    from bonetumor.predict import predict
    from bonetumor.utils import atomic_write_json, environment_info

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_checkpoint(tmp / "m.pt", create_model("resnet50", "none"), TrainConfig(data="x", image_size=args.size),
                        ["normal", "cancer"])
        exp = export_onnx(tmp / "m.pt", tmp / "m.onnx")
        rng = np.random.default_rng(0)
        for i in range(64):
            write_png(tmp / "imgs" / f"{i:03d}.png", rng.random((256, 256)))
        pt, ox = load_checkpoint(tmp / "m.pt"), load_onnx(tmp / "m.onnx")
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)

        def model_rate(ck) -> float:
            with torch.inference_mode():
                t0 = time.perf_counter()
                for _ in range(3):
                    ck.model(x)
                return 3 * args.batch / (time.perf_counter() - t0)

        def predict_rate(path, engine) -> float:
            t0 = time.perf_counter()
            predict(path, [tmp / "imgs"], device="cpu", batch_size=args.batch, engine=engine)
            return 64 / (time.perf_counter() - t0)

        for ck in (pt, ox):
            model_rate(ck)  # warm-up: oneDNN kernel choice, ORT session init
        rates: dict[str, list[float]] = {"torch_model": [], "onnx_model": [], "torch_predict": [], "onnx_predict": []}
        for _ in range(args.reps):
            rates["torch_model"].append(model_rate(pt))
            rates["onnx_model"].append(model_rate(ox))
            rates["torch_predict"].append(predict_rate(tmp / "m.pt", "torch"))
            rates["onnx_predict"].append(predict_rate(tmp / "m.onnx", "onnx"))
            print({k: round(v[-1], 2) for k, v in rates.items()})
        a = [r["probability"] for r in predict(tmp / "m.pt", [tmp / "imgs"], device="cpu")]
        b = [r["probability"] for r in predict(tmp / "m.onnx", [tmp / "imgs"], engine="onnx")]
    med = {k: statistics.median(v) for k, v in rates.items()}
    summary = {"benchmark": "onnx_inference", "date": time.strftime("%Y-%m-%d"), "image_size": args.size,
               "batch": args.batch, "reps": args.reps, "images_per_second": med,
               "onnx_over_torch_model": med["onnx_model"] / med["torch_model"],
               "onnx_over_torch_predict": med["onnx_predict"] / med["torch_predict"],
               "max_abs_diff_probability_64_images": float(np.max(np.abs(np.array(a) - np.array(b)))),
               "export_check": {k: v for k, v in exp.items() if k != "path"}, "runs": rates,
               "environment": environment_info(torch.device("cpu"))}
    atomic_write_json(args.out, summary)
    print(json.dumps({k: summary[k] for k in ("images_per_second", "onnx_over_torch_model", "onnx_over_torch_predict",
                                              "max_abs_diff_probability_64_images")}, indent=1))


if __name__ == "__main__":
    main()

"""ResNet50 at 224 px: inference and training images/s, beside the machine's fp32 matmul peak.

Everything is measured in one run, so the ratios hold even when the machine's speed drifts.
Each figure is the median of >= 3 timed repetitions after a warm-up.

    python benchmarks/resnet50_throughput.py [--out benchmarks/results/resnet50_cpu.json] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from bonetumor.models import create_model
from bonetumor.utils import atomic_write_json, environment_info, select_device

RESNET50_GFLOP_PER_IMAGE = 8.2  # forward pass at 224x224 (4.1 GMAC); a training step costs about 3x


def _median_time(fn, reps: int, sync) -> float:
    fn()  # warm-up (allocations, oneDNN kernel selection)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_gflops(device: torch.device, reps: int, sync, n: int = 2048) -> float:
    """fp32 GEMM throughput of this machine (the practical ceiling for dense layers)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    inner = 10 if device.type == "cpu" else 100
    t = _median_time(lambda: [a @ b for _ in range(inner)], reps, sync)
    return 2 * n**3 * inner / t / 1e9


def inference_ips(model, device, batch: int, reps: int, sync) -> float:
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    model.eval()

    def step():
        with torch.inference_mode():
            model(x)

    return batch / _median_time(step, reps, sync)


def training_ips(model, device, batch: int, reps: int, sync) -> float:
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, 1), device=device).float()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return batch / _median_time(step, reps, sync)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/resnet50_cpu.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = select_device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    res: dict = {"device": str(device), "cpu": platform.processor() or platform.machine(),
                 "threads": torch.get_num_threads(), "reps": args.reps, "image_size": 224}
    res["matmul_fp32_gflops"] = round(matmul_peak_gflops(device, args.reps, sync), 1)
    full = create_model("resnet50", "none", freeze="none").to(device).to(memory_format=torch.channels_last)
    frozen = create_model("resnet50", "none", freeze="backbone").to(device).to(memory_format=torch.channels_last)
    for batch in (1, 32):
        ips = inference_ips(full, device, batch, args.reps, sync)
        res[f"inference_b{batch}_ips"] = round(ips, 2)
        res[f"inference_b{batch}_gflops"] = round(ips * RESNET50_GFLOP_PER_IMAGE, 1)
        res[f"inference_b{batch}_vs_matmul_peak"] = round(ips * RESNET50_GFLOP_PER_IMAGE / res["matmul_fp32_gflops"], 3)
        ips = training_ips(full, device, batch, args.reps, sync)
        res[f"train_full_b{batch}_ips"] = round(ips, 2)
        res[f"train_full_b{batch}_vs_matmul_peak"] = round(ips * 3 * RESNET50_GFLOP_PER_IMAGE / res["matmul_fp32_gflops"], 3)
        res[f"train_frozen_b{batch}_ips"] = round(training_ips(frozen, device, batch, args.reps, sync), 2)
        print(json.dumps({k: v for k, v in res.items() if f"b{batch}" in k}))
    res["environment"] = environment_info(device)
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

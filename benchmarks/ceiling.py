"""The machine's practical compute ceiling, measured in the same run as the figures it divides.

A large 3x3 convolution in channels_last (what ResNet50 spends its time on) through oneDNN on the
CPU, cuDNN on CUDA: its GFLOP/s in fp32 and, where the device runs it natively, bf16. ResNet50 at
224 px costs about 8.2 GFLOP per image forward and about 3x that per training step, so the
ceilings in images/s are GFLOP/s / 8.2 (inference) and / 24.6 (training).
"""

from __future__ import annotations

import statistics
import time

import torch

RESNET50_GFLOP_PER_IMAGE = 8.2  # forward at 224x224 (4.1 GMAC)
TRAIN_FACTOR = 3.0  # forward + backward (input and weight gradients)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, reps: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``reps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def conv_gflops(device: torch.device, dtype: torch.dtype = torch.float32, reps: int = 3) -> float:
    """GFLOP/s of a 3x3, 256->256-channel convolution on 56x56 maps (ResNet50's layer1 size)."""
    n, c, hw = (8, 256, 56) if device.type == "cpu" else (64, 256, 56)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    inner = 5 if device.type == "cpu" else 50
    t = median_seconds(lambda: [conv(x) for _ in range(inner)], device, reps)
    return 2 * n * hw * hw * c * c * 9 * inner / t / 1e9


def measure_ceiling(device: torch.device, bf16: bool, reps: int = 3) -> dict:
    """Conv GFLOP/s (fp32, and bf16 when ``bf16``) and the ResNet50 images/s they allow."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and not bf16:
            continue
        g = conv_gflops(device, dtype, reps)
        out[name] = {"conv_gflops": round(g, 1), "inference_ips": round(g / RESNET50_GFLOP_PER_IMAGE, 2),
                     "training_ips": round(g / (TRAIN_FACTOR * RESNET50_GFLOP_PER_IMAGE), 2)}
    return out


def share(ips: float, ceiling: dict, precision: str, kind: str = "inference") -> float:
    """``ips`` as a fraction of the ceiling's images/s for ``precision`` and ``kind``."""
    return round(ips / ceiling[precision][f"{kind}_ips"], 3)


if __name__ == "__main__":
    import json

    from bonetumor.runtime.device import cpu_has_fast_bf16

    print(json.dumps(measure_ceiling(torch.device("cpu"), cpu_has_fast_bf16()), indent=1))

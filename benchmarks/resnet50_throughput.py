"""ResNet50 at 224 px: inference and training images/s, each as a share of the same run's ceiling.

The ceiling (benchmarks/ceiling.py) is a large channels_last convolution's GFLOP/s, measured just
before and just after each figure (their mean), so the ratios hold even when the machine's speed
drifts, between runs or within one. Each figure is the
median of >= 3 timed repetitions after a warm-up. Inference: eager (the model as torchvision builds
it, and with its BatchNorms folded into the convolutions, as bonetumor runs it eager) and
torch.compile (weights frozen), fp32 and bf16 autocast; training: a full fine-tuning step (Adam, as ``fit`` makes it) in fp32 and bf16, with
BatchNorm statistics from each batch (``--bn-statistics batch``, the default from random weights) and
``--recompute-stages`` 0 (the default), 1 and 5, and with frozen statistics folded into the
convolutions (``--bn-statistics frozen``, the default from pretrained weights: see batchnorm.py).

    python benchmarks/resnet50_throughput.py [--out benchmarks/results/resnet50_cpu.json] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
from ceiling import measure_ceiling, median_seconds, share

from bonetumor.config import TrainConfig
from bonetumor.files import atomic_write_json
from bonetumor.model.backbones import create_model
from bonetumor.runtime.batchnorm import folded_batchnorm, inference_folded
from bonetumor.runtime.device import cpu_has_fast_bf16, environment_info, select_device
from bonetumor.runtime.precision import autocast_dtype
from bonetumor.train.setup import create_optimizer


def inner_steps(device: torch.device, batch: int, images: int) -> int:
    """Steps per timed repetition: on a GPU enough for ``images`` images, so that a repetition
    lasts long enough to time (one small batch takes a few milliseconds); one on a CPU."""
    return max(1, images // batch) if device.type == "cuda" else 1


def inference_ips(model, device, batch: int, precision: str, reps: int) -> float:
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(precision, device)
    inner = inner_steps(device, batch, 2048)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for _ in range(inner):
                model(x)

    return inner * batch / median_seconds(step, device, reps, warmup=2)


def training_step(model, device, batch: int, precision: str):
    """A closure running one fine-tuning step as ``fit`` does (Adam, BCE, GradScaler for fp16)."""
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, 1), device=device).float()
    opt = create_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig(lr=1e-4), device)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    dtype = autocast_dtype(precision, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return step


def training_ips(model, device, batch: int, precision: str, reps: int) -> float:
    step = training_step(model, device, batch, precision)
    inner = inner_steps(device, batch, 512)
    with folded_batchnorm(model):  # as fit trains: folded where the statistics are frozen
        return inner * batch / median_seconds(lambda: [step() for _ in range(inner)], device, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/resnet50_cpu.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="Skip the torch.compile figures.")
    args = ap.parse_args()
    device = select_device(args.device)
    bf16 = cpu_has_fast_bf16() if device.type == "cpu" else device.type == "cuda" and torch.cuda.is_bf16_supported()
    precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
    if device.type == "cuda":
        precisions.append("fp16")
    torch.manual_seed(0)
    res: dict = {"benchmark": "resnet50_throughput", "date": time.strftime("%Y-%m-%d"), "device": str(device),
                 "threads": torch.get_num_threads(), "reps": args.reps, "image_size": 224}
    res["ceiling"] = measure_ceiling(device, bf16, args.reps)
    print("ceiling", json.dumps(res["ceiling"]), flush=True)

    def around(fn):
        """(fn(), the mean of the ceilings measured just before and just after it)."""
        before = measure_ceiling(device, bf16, args.reps)
        value = fn()
        after = measure_ceiling(device, bf16, args.reps)
        return value, {p: {k: (before[p][k] + after[p][k]) / 2 for k in before[p]} for p in before}

    model = create_model("resnet50", "none", freeze="none").to(device).to(memory_format=torch.channels_last).eval()
    inf: dict = {}
    for p in precisions:
        ref = "bf16" if p == "fp16" else p  # fp16 against the bf16 ceiling (same tensor-core rate)
        for batch in (8, 32):
            # the model as torchvision builds it, then as bonetumor runs it eager (BatchNorms folded)
            for key, fold in ((f"eager_{p}_b{batch}", nullcontext), (f"eager_folded_{p}_b{batch}", inference_folded)):
                with fold(model):
                    ips, ceil = around(lambda: inference_ips(model, device, batch, p, args.reps))
                inf[key] = {"ips": round(ips, 2), "of_ceiling": share(ips, ceil, ref)}
                print(key, inf[key], flush=True)
        if not args.no_compile:
            compiled = torch.compile(model, dynamic=False, options={"freezing": True})
            x = torch.randn(8, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
            dtype = autocast_dtype(p, device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                first = median_seconds(lambda: compiled(x), device, reps=1, warmup=0)  # the compile, on its own
            ips, ceil = around(lambda: inference_ips(compiled, device, 8, p, args.reps))
            inf[f"compiled_{p}_b8"] = {"ips": round(ips, 2), "of_ceiling": share(ips, ceil, ref),
                                       "compile_seconds": round(first, 1)}
            print(f"compiled_{p}_b8", inf[f"compiled_{p}_b8"], flush=True)
            torch._dynamo.reset()
    res["inference"] = inf
    tr: dict = {}
    for p in precisions:
        ref = "bf16" if p == "fp16" else p
        full = create_model("resnet50", "none", freeze="none").to(device).to(memory_format=torch.channels_last)
        # --recompute-stages: 0 (the default: nothing recomputed), 1 (the stem), 5 (every stage);
        # --bn-statistics batch, and frozen (folded) without recomputation
        for bn, stages in (("batch", 0), ("batch", 1), ("batch", 5), ("frozen", 0)):
            full.recompute_stages, full.bn_statistics = stages, bn
            ips, ceil = around(lambda: training_ips(full, device, 32, p, args.reps))
            key = f"full_finetune_{p}_b32" + (f"_recompute{stages}" if stages else "") + ("_bn_frozen" if bn == "frozen" else "")
            tr[key] = {"ips": round(ips, 2), "of_ceiling": share(ips, ceil, ref, "training"), "recompute_stages": stages,
                       "bn_statistics": bn}
            print(key, tr[key], flush=True)
    res["training"] = tr
    res["environment"] = environment_info(device)
    atomic_write_json(args.out, res)
    print(json.dumps({k: res[k] for k in ("ceiling", "inference", "training")}, indent=1))


if __name__ == "__main__":
    main()

"""ResNet50 on a GPU: the speed figures of the CPU benchmarks, measured in one short run.

Each figure is a share of the same run's ceiling: a large channels_last 3x3 convolution's
FLOP/s in cuDNN (benchmarks/ceiling.py), measured at the start and at the end (their mean), in
fp32 (which PyTorch runs on TF32 tensor cores for convolutions by default), bf16 and fp16.
Medians of ``--reps`` timed repetitions after a warm-up. In order of what matters most, so a run
cut short still says the most:

1. the model alone: inference images/s, eager, at batch 8, 64 and 256, in each precision, and
   with cuDNN's algorithm search (``torch.backends.cudnn.benchmark``) off against on;
2. a full fine-tuning step (Adam; fp16 with a GradScaler, as ``fit`` runs it): images/s at batch
   32 and 256, peak GPU memory at batch 32, and memory after each of three "epochs" of steps;
3. ``predict`` end to end over a folder of PNGs (load, decode, resize, precision check): the
   CPU defaults (batch 8, decoding in the calling process) against the GPU defaults (batch 64,
   decoding worker processes) and other worker counts, and the decoding alone;
4. frozen-backbone training with ``fit`` for ``--epochs`` epochs: features cached once (K = 1 and
   K = 4 views) against the backbone run every epoch, wall time and validation ROC-AUC;
5. torch.compile: inference (weights frozen) and a training step, bf16, batch 256, with
   their compile time; skipped when ``--budget`` seconds would be overrun.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--budget 330] [--device cuda]
        [--sections inference,training,predict,frozen_fit,compiled]

``--device cpu --small`` runs every code path in a minute on a CPU (a check, not a figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from ceiling import RESNET50_GFLOP_PER_IMAGE, TRAIN_FACTOR, conv_gflops, median_seconds
from resnet50_throughput import inference_ips, training_ips, training_step

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def ceiling(device: torch.device, precisions: list[str], reps: int) -> dict:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out = {}
    for p in precisions:
        g = conv_gflops(device, dtypes[p], reps)
        out[p] = {"conv_tflops": round(g / 1000, 1), "inference_ips": round(g / RESNET50_GFLOP_PER_IMAGE),
                  "training_ips": round(g / (TRAIN_FACTOR * RESNET50_GFLOP_PER_IMAGE))}
    return out


def gpu_memory_mb(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20),
            "peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20)}


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def fresh_model(device, freeze: str = "none"):
    from bonetumor.model.backbones import create_model

    torch.manual_seed(0)
    return create_model("resnet50", "none", freeze=freeze).to(device).to(memory_format=torch.channels_last)


def section_inference(res, device, precisions, batches, reps, save):
    model = fresh_model(device).eval()
    rows = {}
    for p in precisions:
        for b in batches:
            ips = inference_ips(model, device, b, p, reps)
            rows[f"eager_{p}_b{b}"] = {"ips": round(ips, 1)}
            print(f"eager_{p}_b{b}", rows[f"eager_{p}_b{b}"], flush=True)
    if device.type == "cuda":  # cuDNN's algorithm search, off against on (the tool turns it on)
        p = "bf16" if "bf16" in precisions else precisions[0]
        for b in batches[-2:]:
            torch.backends.cudnn.benchmark = False
            off = inference_ips(model, device, b, p, reps)
            torch.backends.cudnn.benchmark = True
            on = inference_ips(model, device, b, p, reps)
            rows[f"cudnn_benchmark_{p}_b{b}"] = {"off_ips": round(off, 1), "on_ips": round(on, 1),
                                                 "on_over_off": round(on / off, 3)}
            print(f"cudnn_benchmark_{p}_b{b}", rows[f"cudnn_benchmark_{p}_b{b}"], flush=True)
    res["inference"] = rows
    save()


def section_training(res, device, precisions, batches, reps, save, steps_per_epoch: int):
    rows = {}
    for p in precisions:
        for b in batches:
            model = fresh_model(device)
            reset_memory(device)
            ips = training_ips(model, device, b, p, reps)
            rows[f"full_finetune_{p}_b{b}"] = {"ips": round(ips, 1), **gpu_memory_mb(device)}
            print(f"full_finetune_{p}_b{b}", rows[f"full_finetune_{p}_b{b}"], flush=True)
            model = None  # freed before the next one's peak is measured
    # Memory over "epochs": allocated memory after each of three runs of steps, bf16, batch 32.
    p = "bf16" if "bf16" in precisions else precisions[0]
    model = fresh_model(device)
    reset_memory(device)
    step = training_step(model, device, batches[0], p)
    after = []
    for _ in range(3):
        for _ in range(steps_per_epoch):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            after.append(round(torch.cuda.memory_allocated(device) / 2**20))
    rows[f"memory_over_epochs_{p}_b{batches[0]}"] = {"allocated_mb_after_each": after, "steps_per_epoch": steps_per_epoch,
                                                    **gpu_memory_mb(device)}
    print("memory_over_epochs", rows[f"memory_over_epochs_{p}_b{batches[0]}"], flush=True)
    del model, step
    reset_memory(device)
    res["training"] = rows
    save()


def section_predict(res, device, tmp: Path, n_files: int, reps: int, save):
    import numpy as np

    from bonetumor.config import TrainConfig
    from bonetumor.data.pixels import ReadOptions
    from bonetumor.data.studies import expand_inputs
    from bonetumor.data.writers import write_png
    from bonetumor.inference import default_batch_size, default_workers, read_batches
    from bonetumor.model.backbones import create_model
    from bonetumor.model.checkpoint import load_checkpoint, save_checkpoint
    from bonetumor.predict import predict

    torch.manual_seed(0)
    save_checkpoint(tmp / "m.pt", create_model("resnet50", "none"), TrainConfig(data="x", image_size=224),
                    ["normal", "cancer"])
    rng = np.random.default_rng(0)
    files = [tmp / "imgs" / f"{i:04d}.png" for i in range(n_files)]
    for f in files:  # the CPU benchmark's images (benchmarks/onnx_inference.py)
        write_png(f, rng.random((256, 256)))
    ways = {"batch8_workers0": dict(batch_size=8, workers=0), "batch64_workers0": dict(batch_size=64, workers=0),
            "batch64_workers8": dict(batch_size=64, workers=8), "defaults": {},
            "batch256_default_workers": dict(batch_size=256)}
    rows: dict = {"files": n_files, "png_side": 256, "default_batch_size": default_batch_size(device),
                  "default_workers": default_workers(device)}
    predict(tmp / "m.pt", files[:16], device=str(device), precision="auto")  # warm-up
    for name, kw in ways.items():
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = predict(tmp / "m.pt", [tmp / "imgs"], device=str(device), precision="auto", **kw)
            times.append(time.perf_counter() - t0)
            assert len(out) == n_files
        rows[name] = {"ips": round(n_files / statistics.median(times), 1), "seconds": [round(t, 2) for t in times]}
        print("predict", name, rows[name], flush=True)
    # The decoding alone, as predict's defaults run it: what the model could at most be fed.
    ck = load_checkpoint(tmp / "m.pt")
    refs = expand_inputs([tmp / "imgs"], ReadOptions())
    b = default_batch_size(device)
    for workers in sorted({0, 4, 8, default_workers(device)}):
        t0 = time.perf_counter()
        n = sum(len(x) for _, x, _ in read_batches(refs, b, ck.image_size, ReadOptions(), False, workers))
        rows[f"decode_only_workers{workers}"] = {"ips": round(n / (time.perf_counter() - t0), 1)}
        print("decode_only", workers, rows[f"decode_only_workers{workers}"], flush=True)
    res["predict"] = rows
    save()


def section_frozen_fit(res, device, tmp: Path, epochs: int, image_size: int, save):
    from bonetumor import TrainConfig, create_synthetic_dataset, fit

    data = create_synthetic_dataset(tmp / "data", n_patients=40, size=image_size, seed=0, modality="stir",
                                    slices_per_patient=3).root
    base = TrainConfig(data=str(data), image_size=image_size, batch_size=32, epochs=epochs, patience=epochs,
                       weights="none", freeze="backbone", precision="auto", seed=0, audit=False, device=str(device))
    fit(dataclasses.replace(base, epochs=1, feature_views=1), tmp / "warmup", verbose=False)
    rows: dict = {"epochs": epochs, "image_size": image_size, "data": "synthetic stir, 40 patients x 3 slices"}
    for name, kw in {"uncached": dict(cache_features=False), "cached_k1": dict(feature_views=1),
                     "cached_k4": dict(feature_views=4)}.items():
        t0 = time.perf_counter()
        r = fit(dataclasses.replace(base, **kw), tmp / name, verbose=False)
        best = next(h for h in r.history if h["epoch"] == r.best_epoch)
        rows[name] = {"seconds": round(time.perf_counter() - t0, 2), "val_roc_auc": best["val_roc_auc"]}
        print("frozen_fit", name, rows[name], flush=True)
    for k in ("cached_k1", "cached_k4"):
        rows[k]["speedup_vs_uncached"] = round(rows["uncached"]["seconds"] / rows[k]["seconds"], 2)
    res["frozen_fit"] = rows
    save()


def section_compiled(res, device, batch: int, reps: int, budget: float, save):
    rows: dict = {}
    res["compiled"] = rows
    p = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    model = fresh_model(device).eval()
    compiled = torch.compile(model, dynamic=False, options={"freezing": True})
    t0 = time.perf_counter()
    inference_ips(compiled, device, batch, p, reps=1)  # the compile, and one batch
    first = time.perf_counter() - t0
    ips = inference_ips(compiled, device, batch, p, reps)
    rows[f"inference_{p}_b{batch}"] = {"ips": round(ips, 1), "compile_seconds": round(first, 1)}
    print("compiled", rows, flush=True)
    save()
    torch._dynamo.reset()
    del compiled, model
    if elapsed() > budget * 0.6:  # a training compile takes about twice an inference one
        rows["training"] = f"skipped: {elapsed():.0f} s of the {budget:.0f} s budget used"
        save()
        return
    model = fresh_model(device)
    step = training_step(torch.compile(model, dynamic=False), device, batch, p)
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    ips = batch / median_seconds(step, device, reps, warmup=1)
    rows[f"training_{p}_b{batch}"] = {"ips": round(ips, 1), "compile_seconds": round(first, 1)}
    print("compiled", rows, flush=True)
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--files", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=330.0, help="Seconds; the compile section is skipped past it.")
    ap.add_argument("--sections", default="inference,training,predict,frozen_fit,compiled",
                    help="Which sections to run, comma-separated (the ceiling always runs).")
    ap.add_argument("--small", action="store_true", help="Tiny sizes: a check of the code paths, not a figure.")
    args = ap.parse_args()

    from bonetumor.files import atomic_write_json
    from bonetumor.runtime.device import environment_info, select_device

    device = select_device(args.device)
    precisions = ["fp32"] + (["bf16", "fp16"] if device.type == "cuda" else ["bf16"])
    inf_batches, train_batches = ((2, 4), (2, 4)) if args.small else ((8, 64, 256), (32, 256))
    res: dict = {"benchmark": "gpu", "date": time.strftime("%Y-%m-%d"), "device": str(device), "reps": args.reps,
                 "image_size": 224, "environment": environment_info(device),
                 "tf32_convolutions": torch.backends.cudnn.allow_tf32, "timeline_seconds": {}}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)

    def save(section: str = ""):
        if section:
            res["timeline_seconds"][section] = round(elapsed(), 1)
        atomic_write_json(args.out, res)

    todo = args.sections.split(",")
    if device.type == "cuda":  # clocks up from idle before the first figure
        ceiling(device, precisions, args.reps)
    res["ceiling_start"] = ceiling(device, precisions, args.reps)
    print("ceiling", res["ceiling_start"], flush=True)
    save("ceiling")
    if "inference" in todo:
        section_inference(res, device, precisions, inf_batches, args.reps, lambda: save("inference"))
    if "training" in todo:
        section_training(res, device, precisions, train_batches, args.reps, lambda: save("training"),
                         steps_per_epoch=2 if args.small else 20)
    with tempfile.TemporaryDirectory() as tmp:
        if "predict" in todo:
            section_predict(res, device, Path(tmp), 24 if args.small else args.files, args.reps,
                            lambda: save("predict"))
        if "frozen_fit" in todo:
            section_frozen_fit(res, device, Path(tmp), 2 if args.small else args.epochs, 64 if args.small else 224,
                               lambda: save("frozen_fit"))
    if "compiled" in todo:
        if elapsed() < args.budget * 0.5 or args.small:
            section_compiled(res, device, 4 if args.small else 256, args.reps, args.budget, lambda: save("compiled"))
        else:
            res["compiled"] = f"skipped: {elapsed():.0f} s of the {args.budget:.0f} s budget used"
    res["ceiling_end"] = ceiling(device, precisions, args.reps)
    ceil = {p: {k: (res["ceiling_start"][p][k] + res["ceiling_end"][p][k]) / 2 for k in res["ceiling_start"][p]}
            for p in precisions}
    res["ceiling"] = ceil
    for key, row in res.get("inference", {}).items():
        if key.startswith("eager_"):
            row["of_ceiling"] = round(row["ips"] / ceil[key.split("_")[1]]["inference_ips"], 3)
    for key, row in res.get("training", {}).items():
        if key.startswith("full_finetune_"):
            row["of_ceiling"] = round(row["ips"] / ceil[key.split("_")[2]]["training_ips"], 3)
    for key, row in (res["compiled"] if isinstance(res.get("compiled"), dict) else {}).items():
        if isinstance(row, dict):
            kind = "inference" if key.startswith("inference") else "training"
            row["of_ceiling"] = round(row["ips"] / ceil[key.split("_")[1]][f"{kind}_ips"], 3)
    res["host_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    res["cpu_count"] = os.cpu_count()
    save("end")
    print(json.dumps({k: res.get(k) for k in ("ceiling", "inference", "training", "predict", "frozen_fit", "compiled")},
                     indent=1))


if __name__ == "__main__":
    main()

"""Does ``lr-find``'s suggestion train? The range test, then short runs at a grid of rates and at
the suggestion, on a synthetic problem a CNN learns from random init within a few steps.

    python benchmarks/lr_find.py [--steps 100] [--epochs 5]

Data: 32 px grey images, cancer brighter than normal (level 150 vs 100, noise sd 40), 64 for
training and 16 for validation, no augmentation. ResNet50 from random init, all layers trained,
16 images a step: 20 steps in 5 epochs. A run converges when its last epoch's training loss is
below 0.1 (from ln 2 = 0.69). Results: ``benchmarks/results/lr_find_cpu.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from bonetumor.config import TrainConfig
from bonetumor.data.synth import create_brightness_dataset
from bonetumor.train import fit
from bonetumor.train.lr_find import lr_find

GRID = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/lr_find_cpu.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bonetumor-lr-find-"))
    data = create_brightness_dataset(work / "data")
    cfg = dataclasses.replace(TrainConfig(data=str(data)), image_size=32, epochs=args.epochs, batch_size=16,
                              patience=args.epochs, weights="none", freeze="none", hflip=False, rotate_degrees=0.0,
                              zoom_min=1.0, zoom_max=1.0, ood_quantile=0.0, audit=False, device="cpu",
                              precision="fp32", seed=3)
    t0 = time.perf_counter()
    found = lr_find(cfg, work / "find", steps=args.steps, verbose=False)
    sweep_s = round(time.perf_counter() - t0, 1)
    print(f"suggested {found.suggested_lr:.3g} in {sweep_s} s", flush=True)
    runs = {}
    for lr in (*GRID, found.suggested_lr):
        res = fit(dataclasses.replace(cfg, lr=lr), work / f"lr_{lr:g}", verbose=False)
        losses = [float(r["train_loss"]) for r in res.history]
        runs[f"{lr:.3g}"] = {"lr": lr, "train_loss_by_epoch": losses, "converged": losses[-1] < 0.1}
        print(f"lr {lr:.3g}: last training loss {losses[-1]:.4f}", flush=True)
    converging = [v["lr"] for v in runs.values() if v["converged"]]
    out = {"benchmark": "lr_find", "date": time.strftime("%Y-%m-%d"), "device": "cpu", "steps": args.steps,
           "steps_run": len(found.lrs), "sweep_seconds": sweep_s, "suggested_lr": found.suggested_lr,
           "epochs": args.epochs, "runs": runs, "converging_range": [min(converging), max(converging)] if converging else None,
           "suggestion_inside": bool(converging) and min(converging) <= found.suggested_lr <= max(converging)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("suggested_lr", "converging_range", "suggestion_inside")}))


if __name__ == "__main__":
    main()

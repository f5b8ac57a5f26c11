"""Frozen-backbone training: features cached once vs the backbone run every epoch.

Trains the same frozen-ResNet50 model (head GAP -> 256 -> dropout -> 1, Adam, BCE) for E epochs
on the same data three ways, interleaved within one run: the backbone over every image in every
epoch (as the original did), and from cached features with K = 1 (no augmentation) and K = 4
augmented views. Reports wall time, the ratio to the uncached path, backbone images per second,
and the validation ROC-AUC at the best epoch of each. Medians of ``--reps`` repetitions.

    python benchmarks/frozen_training.py [--epochs 10] [--image-size 224] [--precision fp32|bf16]
        [--data DIR] [--weights imagenet|none|PATH] [--out benchmarks/results/frozen_training_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="A data folder; default: synthetic, 40 patients x 3 slices")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/frozen_training_cpu.json")
    args = ap.parse_args()

    from bonetumor import TrainConfig, create_synthetic_dataset, fit
    from bonetumor.files import atomic_write_json
    from bonetumor.runtime.device import environment_info, select_device

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = str(create_synthetic_dataset(tmp / "data", n_patients=40, size=args.image_size, seed=0,
                                                modality="stir", slices_per_patient=3).root)
        base = TrainConfig(data=data, image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
                           patience=args.epochs, weights=args.weights, freeze="backbone", precision=args.precision,
                           seed=0, audit=False)
        ways = {"uncached": dict(cache_features=False), "cached_k1": dict(feature_views=1),
                "cached_k4": dict(feature_views=4)}
        runs: dict[str, list[dict]] = {k: [] for k in ways}
        fit(dataclasses.replace(base, epochs=1, feature_views=1), tmp / "warmup", verbose=False)  # warm-up
        for rep in range(args.reps):
            for name, kw in ways.items():  # interleaved, so drift hits every way alike
                t0 = time.perf_counter()
                r = fit(dataclasses.replace(base, **kw), tmp / f"{name}_{rep}", verbose=False)
                seconds = time.perf_counter() - t0
                best = next(h for h in r.history if h["epoch"] == r.best_epoch)
                runs[name].append({"seconds": seconds, "best_epoch": r.best_epoch, "val_roc_auc": best["val_roc_auc"]})
                print(name, rep, json.dumps(runs[name][-1]))
        n_train = sum(1 for p in (tmp / "uncached_0" / "splits.csv").read_text().splitlines()[1:] if p.endswith(",train"))
        n_valid = sum(1 for p in (tmp / "uncached_0" / "splits.csv").read_text().splitlines()[1:] if p.endswith(",valid"))
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    summary = {
        "benchmark": "frozen_training", "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs,
        "image_size": args.image_size, "batch_size": args.batch_size, "precision": args.precision, "weights": args.weights,
        "data": "synthetic stir, 40 patients x 3 slices" if args.data is None else "user data",
        "n_train": n_train, "n_valid": n_valid, "reps": args.reps,
        "median_seconds": med,
        "speedup_vs_uncached": {k: med["uncached"] / v for k, v in med.items()},
        "val_roc_auc": {k: [x["val_roc_auc"] for x in v] for k, v in runs.items()},
        "runs": runs, "environment": environment_info(select_device("cpu")),
    }
    atomic_write_json(args.out, summary)
    print(json.dumps({k: summary[k] for k in ("median_seconds", "speedup_vs_uncached", "val_roc_auc")}, indent=1))


if __name__ == "__main__":
    main()

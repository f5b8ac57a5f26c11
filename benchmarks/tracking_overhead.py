"""What experiment tracking costs a frozen-backbone training run: the same ``bonetumor train``
with ``--tracker none``, ``mlflow`` (a new SQLite store beside the run each time: its schema is
made on the way) and ``tensorboard``, alternated.

    python benchmarks/tracking_overhead.py [--patients 250] [--size 128] [--epochs 20] [--reps 3]

Each run is a fresh process (start-up, the cached feature pass, the head's epochs, the operating
point and the tracker's final files and close all included). Reported: the median wall time per
tracker and its ratio to none (goal: tracking adds at most 2%), and the epochs' own time from
history.csv (goal: at most 1 s more per epoch). Results: ``benchmarks/results/tracking_overhead_cpu.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BONETUMOR = [sys.executable, "-m", "bonetumor"]
TRACKERS = ("none", "mlflow", "tensorboard")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=250)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/tracking_overhead_cpu.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bonetumor-tracking-"))
    subprocess.run(BONETUMOR + ["synth", "data", "--n-patients", str(args.patients), "--size", str(args.size)],
                   cwd=work, check=True, capture_output=True)
    common = ["train", "data", "--image-size", str(args.size), "--epochs", str(args.epochs), "--patience",
              str(args.epochs), "--weights", "none", "--freeze", "backbone", "--feature-views", "1", "--device", "cpu"]
    wall: dict[str, list[float]] = {t: [] for t in TRACKERS}
    epochs: dict[str, list[float]] = {t: [] for t in TRACKERS}
    for rep in range(args.reps):
        for tracker in TRACKERS:
            runs = work / f"runs_{tracker}_{rep}"  # its own folder: a new MLflow store each time
            t0 = time.perf_counter()
            p = subprocess.run(BONETUMOR + common + ["--tracker", tracker, "--out", str(runs / "run")], cwd=work,
                               capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(p.stderr[-3000:])
            wall[tracker].append(round(time.perf_counter() - t0, 2))
            with open(runs / "run" / "history.csv") as f:
                rows = list(csv.DictReader(f))
            epochs[tracker].append(round(statistics.mean(float(r["seconds"]) for r in rows), 4))
            print(rep, tracker, wall[tracker][-1], "s;", epochs[tracker][-1], "s per epoch", flush=True)
    med = {t: statistics.median(v) for t, v in wall.items()}
    per_epoch = {t: statistics.median(v) for t, v in epochs.items()}
    out = {"benchmark": "tracking_overhead", "date": time.strftime("%Y-%m-%d"), "device": "cpu",
           "data": {"patients": args.patients, "size": args.size}, "epochs": args.epochs, "reps": args.reps,
           "wall_seconds": wall, "median_wall_seconds": med, "epoch_seconds": epochs, "median_epoch_seconds": per_epoch,
           "wall_over_none": {t: round(med[t] / med["none"], 4) for t in TRACKERS},
           "added_seconds_per_epoch": {t: round(per_epoch[t] - per_epoch["none"], 4) for t in TRACKERS}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("median_wall_seconds", "wall_over_none", "added_seconds_per_epoch")}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""What experiment tracking costs a frozen-backbone training run: the same ``bonetumor train``
with ``--tracker none``, ``mlflow`` (a new SQLite store beside the run each time: its schema is
made on the way) and ``tensorboard``, alternated.

    python benchmarks/tracking_overhead.py [--patients 250] [--size 128] [--epochs 20] [--reps 3] [--store new|shared]
        [--data FOLDER]

``--data``: a labelled folder of the user's (the shared radiographs, say) instead of synthetic
data: a frozen-backbone run of realistic length (its audit included, as a user's run has it).

``--store shared``: every MLflow run goes to one store, made by an untimed first run, as a lab's
runs share one (``new``: a store made on the way by each run, the first run's cost).
Each run is a fresh process (start-up, the cached feature pass, the head's epochs, the operating
point and the tracker's final files and close all included). Reported: the median wall time per
tracker and its ratio to none (goal: tracking adds at most 2%), and the epochs' own time from
history.csv (goal: at most 1 s more per epoch). Results: ``benchmarks/results/tracking_overhead[_shared]_cpu.json``.
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
    ap.add_argument("--store", choices=("new", "shared"), default="new")
    ap.add_argument("--trackers", default=",".join(TRACKERS))
    ap.add_argument("--data", default=None, help="a labelled data folder instead of synthetic data")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bonetumor-tracking-"))
    synth = ["synth", "data", "--n-patients", str(args.patients), "--size", str(args.size)]
    if args.data:  # the store's first run (untimed) on a little synthetic data: it only makes the store
        synth[1], synth[3] = "warm_data", "10"
    subprocess.run(BONETUMOR + synth, cwd=work, check=True, capture_output=True)
    data = str(Path(args.data).resolve()) if args.data else "data"
    common = ["train", data, "--image-size", str(args.size), "--epochs", str(args.epochs), "--patience",
              str(args.epochs), "--weights", "none", "--freeze", "backbone", "--feature-views", "1", "--device", "cpu"]
    trackers = tuple(args.trackers.split(","))
    wall: dict[str, list[float]] = {t: [] for t in trackers}
    epochs: dict[str, list[float]] = {t: [] for t in trackers}
    if args.store == "shared":  # the store made once, untimed
        warm = common[:1] + ["warm_data" if args.data else data] + common[2:]
        subprocess.run(BONETUMOR + warm + ["--epochs", "1", "--tracker", "mlflow", "--out", str(work / "shared" / "warm")],
                       cwd=work, check=True, capture_output=True)
    for rep in range(args.reps):
        for tracker in trackers:
            # its own folder (a new MLflow store each time), or beside the others in the shared one
            shared = args.store == "shared" and tracker == "mlflow"
            run = work / "shared" / f"run_{rep}" if shared else work / f"runs_{tracker}_{rep}" / "run"
            t0 = time.perf_counter()
            p = subprocess.run(BONETUMOR + common + ["--tracker", tracker, "--out", str(run)], cwd=work,
                               capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(p.stderr[-3000:])
            wall[tracker].append(round(time.perf_counter() - t0, 2))
            with open(run / "history.csv") as f:
                rows = list(csv.DictReader(f))
            epochs[tracker].append(round(statistics.mean(float(r["seconds"]) for r in rows), 4))
            print(rep, tracker, wall[tracker][-1], "s;", epochs[tracker][-1], "s per epoch", flush=True)
    med = {t: statistics.median(v) for t, v in wall.items()}
    per_epoch = {t: statistics.median(v) for t, v in epochs.items()}
    out = {"benchmark": "tracking_overhead", "date": time.strftime("%Y-%m-%d"), "device": "cpu", "store": args.store,
           "data": {"folder": args.data} if args.data else {"patients": args.patients, "size": args.size},
           "image_size": args.size, "epochs": args.epochs, "reps": args.reps,
           "wall_seconds": wall, "median_wall_seconds": med, "epoch_seconds": epochs, "median_epoch_seconds": per_epoch,
           "wall_over_none": {t: round(med[t] / med["none"], 4) for t in trackers},
           "added_seconds_per_epoch": {t: round(per_epoch[t] - per_epoch["none"], 4) for t in trackers}}
    path = Path(args.out or f"benchmarks/results/tracking_overhead{'_shared' if args.store == 'shared' else ''}_cpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("median_wall_seconds", "wall_over_none", "added_seconds_per_epoch")}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

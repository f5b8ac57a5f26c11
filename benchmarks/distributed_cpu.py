"""Two processes x one thread (torchrun, gloo) against one process x two threads, on this CPU.

    python benchmarks/distributed_cpu.py [--patients 250] [--size 64] [--epochs 2]

Fine-tuning (ResNet50 from random init, all layers, the same 16 images per step: one process x
batch 16 or two ranks x batch 8) and predict (every image of the set), each run as the command a
user runs. Training speed is the last epoch's training images per second of epoch time (the
first epoch warms up); predict's is images per second of the whole command, start-up included,
as a user waits for it. Results: ``benchmarks/results/distributed_cpu.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BONETUMOR = [sys.executable, "-m", "bonetumor"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bonetumor"]


def _run(cmd: list[str], threads: int, cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def _last_epoch_seconds(run: Path) -> float:
    with open(run / "history.csv") as f:
        return float(list(csv.DictReader(f))[-1]["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=250)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/distributed_cpu.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bonetumor-ddp-bench-"))
    subprocess.run(BONETUMOR + ["synth", "data", "--n-patients", str(args.patients), "--size", str(args.size),
                                "--seed", "0"], cwd=work, check=True, capture_output=True)
    n_images = len(list((work / "data").rglob("*.png")))
    n_train = len(list((work / "data" / "train").rglob("*.png")))
    common = ["train", "data", "--image-size", str(args.size), "--epochs", str(args.epochs), "--weights", "none",
              "--freeze", "none", "--no-audit", "--ood-quantile", "0", "--device", "cpu", "--precision", "fp32",
              "--checkpoint-seconds", "1000000"]
    results = {}
    for name, cmd, threads in (("1 process x 2 threads", BONETUMOR + common + ["--batch-size", "16", "--out", "one"], 2),
                               ("2 processes x 1 thread", TORCHRUN + common + ["--batch-size", "8", "--out", "two"], 1)):
        wall = _run(cmd, threads, work)
        run = work / ("one" if threads == 2 else "two")
        epoch = _last_epoch_seconds(run)
        pred = _run((BONETUMOR if threads == 2 else TORCHRUN) + ["predict", str(run / "best.pt"), "data", "--device", "cpu",
                                                                  "--out", f"pred_{run.name}"], threads, work)
        results[name] = {"train_wall_seconds": round(wall, 1), "last_epoch_seconds": epoch,
                         "train_images_per_second": round(n_train / epoch, 2),
                         "predict_seconds": round(pred, 2), "predict_images_per_second": round(n_images / pred, 2)}
        print(name, results[name], flush=True)
    a, b = results["1 process x 2 threads"], results["2 processes x 1 thread"]
    ratios = {"train": round(b["train_images_per_second"] / a["train_images_per_second"], 3),
              "predict": round(b["predict_images_per_second"] / a["predict_images_per_second"], 3)}
    out = {"benchmark": "distributed_cpu", "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
           "data": {"images": n_images, "train_images": n_train, "size": args.size},
           "epochs": args.epochs, "results": results, "two_processes_over_one": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("2 processes / 1 process:", ratios)


if __name__ == "__main__":
    main()

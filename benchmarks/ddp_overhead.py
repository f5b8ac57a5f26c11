"""What the DistributedDataParallel path costs on one device: one rank under torchrun against a
plain process, training the same model on the same data.

    python benchmarks/ddp_overhead.py [--device cuda] [--patients 250] [--size 224] [--epochs 3] [--reps 2] [--workers 0]

Both runs are the command a user runs: ``bonetumor train`` and ``torchrun --standalone
--nproc-per-node 1 -m bonetumor train``, which wraps the network in DDP (its gradient buckets and
all-reduce hooks, a world of one), draws batches through a DistributedSampler and sums the
epoch's losses over the group. ResNet50 from random init, all layers trained, the same batch
size. Speed is the last epoch's training images per second of epoch time (the first epoch warms
up), the median over ``--reps`` alternated repetitions; also the median of each repetition's
own ratio, which a machine whose speed drifts between repetitions moves less. On a GPU the goal
is an overhead of at most 5% (ratio >= 0.95). Results:
``benchmarks/results/ddp_overhead_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distributed_cpu import BONETUMOR, _last_epoch_seconds, _run

TORCHRUN_ONE = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "bonetumor"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--patients", type=int, default=250)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="data-loading workers per rank (a GPU needs several)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: pass --device cpu to measure the overhead on this CPU")
    work = Path(tempfile.mkdtemp(prefix="bonetumor-ddp-overhead-"))
    subprocess.run(BONETUMOR + ["synth", "data", "--n-patients", str(args.patients), "--size", str(args.size),
                                "--seed", "0"], cwd=work, check=True, capture_output=True)
    n_train = len(list((work / "data" / "train").rglob("*.png")))
    common = ["train", "data", "--image-size", str(args.size), "--epochs", str(args.epochs), "--weights", "none",
              "--freeze", "none", "--no-audit", "--ood-quantile", "0", "--device", args.device,
              "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--checkpoint-seconds", "1000000", "--overwrite"]
    threads = os.cpu_count() or 2
    speed: dict[str, list[float]] = {"plain": [], "ddp_one_rank": []}
    for rep in range(args.reps):
        for name, launcher in (("plain", BONETUMOR), ("ddp_one_rank", TORCHRUN_ONE)):
            _run(launcher + common + ["--out", name], threads, work)
            speed[name].append(round(n_train / _last_epoch_seconds(work / name), 2))
            print(rep, name, speed[name][-1], "images/s", flush=True)
    med = {k: statistics.median(v) for k, v in speed.items()}
    out = {"benchmark": "ddp_overhead", "date": time.strftime("%Y-%m-%d"), "device": args.device,
           "data": {"train_images": n_train, "size": args.size}, "epochs": args.epochs, "batch_size": args.batch_size,
           "workers": args.workers,
           "train_images_per_second": speed, "median": med,
           "ddp_over_plain": round(med["ddp_one_rank"] / med["plain"], 3),
           "ddp_over_plain_paired": round(statistics.median(d / p for d, p in zip(speed["ddp_one_rank"], speed["plain"])), 3),
           "cpu_count": os.cpu_count()}
    path = Path(args.out or f"benchmarks/results/ddp_overhead_{args.device.split(':')[0]}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("DDP (one rank) / plain:", out["ddp_over_plain"], "(median of paired repetitions:", out["ddp_over_plain_paired"], ")")


if __name__ == "__main__":
    main()

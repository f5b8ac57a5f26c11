"""Peak memory (RSS) of ``explain`` over 100 and over 1,000 images: it must stay flat.

Each size runs in a fresh process (peak RSS is per process), on synthetic 128 px images and a
ResNet50 checkpoint with random weights, writing every panel and map.

    python benchmarks/explain_memory.py [--out benchmarks/results/explain_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time, json
from bonetumor.explain.run import explain
from bonetumor.runtime.device import peak_rss_mb
t = time.perf_counter()
r = explain(sys.argv[1], [sys.argv[2]], sys.argv[3], device="cpu", batch_size=16, faithfulness_samples=0)
print(json.dumps({"images": len(r.rows), "seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/explain_memory_cpu.json")
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    import torch

    from bonetumor.config import TrainConfig
    from bonetumor.data.writers import write_png
    from bonetumor.files import atomic_write_json
    from bonetumor.model.backbones import create_model
    from bonetumor.model.checkpoint import save_checkpoint
    from bonetumor.runtime.device import peak_rss_mb

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        ck = tmp / "model.pt"
        save_checkpoint(ck, create_model("resnet50", "none"), TrainConfig(data="x", image_size=args.size), ["normal", "cancer"])
        import numpy as np

        rng = np.random.default_rng(0)
        for n in (100, 1000):
            d = tmp / f"img{n}"
            for i in range(n):
                write_png(d / f"{i:04d}.png", rng.random((args.size, args.size)))
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", CHILD, str(ck), str(d), str(tmp / f"out{n}")],
                               capture_output=True, text=True, check=True)
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["wall_seconds"] = time.perf_counter() - t0
            print(json.dumps(row), flush=True)
            results.append(row)
    res = {"image_size": args.size, "results": results,
           "peak_rss_ratio_1000_vs_100": results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"],
           "parent_peak_rss_mb": peak_rss_mb()}
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

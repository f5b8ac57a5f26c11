"""Peak memory (RSS) of reading and predicting on 4000x4000 16-bit radiographs.

Each case runs in a fresh process (peak RSS is per process): a small image (the process's own
footprint), one and twenty 4000x4000 16-bit PNGs read as the pipeline reads them (shrunk
while read to ``max_side``), the same without shrinking (full-size float arrays, as a naive
reader would hold), and ``predict`` with a 224 px ResNet50 on a folder of eight such images.

    python benchmarks/large_image_memory.py [--out benchmarks/results/large_image_memory_cpu.json]
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
import json, sys, time
from pathlib import Path
from bonetumor.data.readers import load_tensor
from bonetumor.data.pixels import ReadOptions
from bonetumor.runtime.device import peak_rss_mb
case, folder = sys.argv[1], Path(sys.argv[2])
t = time.perf_counter()
if case == "predict":
    from bonetumor.predict import predict
    n = len(predict(folder / "model.pt", [folder / "big"], device="cpu", batch_size=8))
else:
    files = {"small": [folder / "small.png"], "one": [folder / "big" / "r0.png"],
             "twenty": sorted((folder / "big").glob("*.png")) * 3, "one_unshrunk": [folder / "big" / "r0.png"]}[case]
    opts = ReadOptions(max_side=100_000) if case == "one_unshrunk" else None
    for f in files[:20]:
        x = load_tensor(f, None, opts)
    n = min(len(files), 20)
print(json.dumps({"case": case, "images": n, "seconds": round(time.perf_counter() - t, 2),
                  "peak_rss_mb": round(peak_rss_mb(), 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/large_image_memory_cpu.json")
    args = ap.parse_args()
    import numpy as np
    import torch

    from bonetumor.config import TrainConfig
    from bonetumor.data.writers import write_png
    from bonetumor.files import atomic_write_json
    from bonetumor.model.backbones import create_model
    from bonetumor.model.checkpoint import save_checkpoint
    from bonetumor.runtime.device import environment_info

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for k in range(8):
            y, x = np.mgrid[0:4000, 0:4000] / 4000.0
            write_png(tmp / "big" / f"r{k}.png", np.clip(0.5 * x + 0.3 * y + rng.normal(0, 0.02, (4000, 4000)), 0, 1), 16)
        write_png(tmp / "small.png", rng.random((256, 256)), 16)
        torch.manual_seed(0)
        save_checkpoint(tmp / "model.pt", create_model("resnet50", "none"), TrainConfig(data="x", image_size=224),
                        ["normal", "cancer"])
        results = []
        for case in ("small", "one", "twenty", "one_unshrunk", "predict"):
            out = subprocess.run([sys.executable, "-c", CHILD, case, str(tmp)], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[-1])
    by = {r["case"]: r["peak_rss_mb"] for r in results}
    summary = {
        "benchmark": "large_image_memory", "date": time.strftime("%Y-%m-%d"), "image": "4000x4000 16-bit PNG",
        "results": results,
        "extra_mb_one_image": round(by["one"] - by["small"], 1),
        "extra_mb_twenty_images": round(by["twenty"] - by["small"], 1),
        "extra_mb_one_image_unshrunk": round(by["one_unshrunk"] - by["small"], 1),
        "unshrunk_over_shrunk": round((by["one_unshrunk"] - by["small"]) / max(by["one"] - by["small"], 1e-9), 2),
        "environment": environment_info(torch.device("cpu")),
    }
    atomic_write_json(args.out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("results", "environment")}))


if __name__ == "__main__":
    main()

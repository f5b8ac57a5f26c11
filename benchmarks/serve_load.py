"""`bonetumor serve` under a bounded load on loopback: throughput, latency, errors, memory.

Trains a small frozen-ResNet50 model at 224 px on synthetic data (random weights: the load, not
the accuracy, is measured here), starts ``bonetumor serve`` in its own process, and sends
``--requests`` uploads (PNG and DICOM slices, each answered with its probability and Grad-CAM
heatmap) from ``--concurrency`` clients at once. Reports requests/s, p50/p95 latency, the error
count (must be 0) and the server's resident memory after a warm-up and after every quarter of
the load (growth = last quarter minus warm-up).

    python benchmarks/serve_load.py [--requests 1000] [--concurrency 8] [--out benchmarks/results/serve_load_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(url: str, name: str, data: bytes) -> tuple[int, float]:
    """One multipart upload; (status, seconds)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = -1
    return status, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/serve_load_cpu.json")
    args = ap.parse_args()
    from bonetumor import TrainConfig, create_synthetic_dataset, fit
    from bonetumor.files import atomic_write_json

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = create_synthetic_dataset(tmp / "data", n_patients=16, size=224, seed=0, modality="stir").root
        fit(TrainConfig(data=str(root), image_size=224, epochs=1, weights="none", seed=0, audit=False, feature_views=1),
            tmp / "run", verbose=False)
        dcm = create_synthetic_dataset(tmp / "dcm", n_patients=6, size=224, seed=1, fmt="dicom").root
        uploads = [(p.name, p.read_bytes()) for p in sorted(root.rglob("*.png"))[:24]]
        uploads += [(p.name, p.read_bytes()) for p in sorted(dcm.rglob("*.dcm"))[:8]]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "bonetumor.cli", "serve", str(tmp / "run" / "best.pt"),
                                   "--port", str(port), "--device", "cpu"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "/api/health", timeout=2).read()
                    break
                except OSError:
                    assert time.time() < deadline and server.poll() is None, server.stderr.read().decode()[-2000:]
                    time.sleep(0.2)
            results: list[tuple[int, float]] = []
            quarter = max(1, args.requests // 4)
            with ThreadPoolExecutor(args.concurrency) as pool:
                # Warm-up at the same concurrency: allocations, oneDNN kernel choice, server threads.
                list(pool.map(lambda i: post(url + "/api/predict", *uploads[i % len(uploads)]), range(4 * args.concurrency)))
                rss = [rss_mb(server.pid)]
                t0 = time.perf_counter()
                for start in range(0, args.requests, quarter):
                    n = min(quarter, args.requests - start)
                    results += pool.map(lambda i: post(url + "/api/predict", *uploads[i % len(uploads)]),
                                        range(start, start + n))
                    rss.append(rss_mb(server.pid))
                wall = time.perf_counter() - t0
        finally:
            server.terminate()
            server.wait(30)
    lat = sorted(s for _, s in results)
    errors = sum(code != 200 for code, _ in results)
    res = {"benchmark": "serve_load", "date": time.strftime("%Y-%m-%d"), "requests": len(results),
           "concurrency": args.concurrency, "uploads": "224 px PNG slices and 224 px DICOM slices, each with Grad-CAM",
           "requests_per_second": round(len(results) / wall, 2), "latency_p50_s": round(statistics.median(lat), 3),
           "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3), "errors": errors,
           "status_counts": {str(c): sum(code == c for code, _ in results) for c in sorted({c for c, _ in results})},
           "server_rss_mb_after_warmup_and_each_quarter": [round(r, 1) for r in rss],
           "server_rss_growth_mb": round(rss[-1] - rss[0], 1)}
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

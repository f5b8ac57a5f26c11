"""`bonetumor serve` against clients that hold connections, and against a NIfTI header bomb.

Trains a small frozen-ResNet50 model at 224 px on synthetic data (random weights), starts
``bonetumor serve`` in its own process and measures, on loopback:

1. the latency of valid uploads (224 px PNG, probability + Grad-CAM), one after another, with no
   other client, then with 200 stalled clients open (half sent half a request header, half sent
   headers announcing 100,000 bytes of body and 6 bytes of it): the ratio of the medians;
2. how long each stalled connection stays open (it must close within its timeout, with a 408);
3. the 255 KB gzip NIfTI of 512 x 512 x 1000 zero voxels (under the voxel limit), and the same
   volume with one bright voxel per slice, each with a valid upload sent while it is processed:
   the status and seconds of each.

    python benchmarks/serve_stall.py [--stalled 200] [--requests 20] [--out benchmarks/results/serve_stall_cpu.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import post, rss_mb  # noqa: E402

HEADER_TIMEOUT = BODY_TIMEOUT = 30  # long enough that every valid request is timed while all stalled clients are open
REQUEST_TIMEOUT = 20


def stall(port: int, kind: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    if kind == "headers":
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\n")
    else:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\n")
    return sock


def wait_closed(socks: dict[socket.socket, tuple[str, float]], limit: float) -> dict[str, list]:
    """Seconds from opening to the server's close, and the status it sent, per kind of stall."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, b"")
    out: dict[str, list] = {"headers": [], "body": []}
    deadline = time.perf_counter() + limit
    while sel.get_map() and time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=1):
            s = key.fileobj
            chunk = s.recv(65536)
            if chunk:
                sel.modify(s, selectors.EVENT_READ, key.data + chunk)
                continue
            kind, opened = socks[s]
            status = int(key.data.split(b" ", 2)[1]) if key.data.startswith(b"HTTP/1.1 ") else None
            out[kind].append((time.perf_counter() - opened, status))
            sel.unregister(s)
            s.close()
    out["still_open"] = len(sel.get_map())
    return out


def bomb(path: Path, bright: bool) -> Path:
    import numpy as np

    header = __import__("nibabel").Nifti1Header()
    header.set_data_shape((512, 512, 1000))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    vol = np.zeros((1000, 512, 512), np.uint8)  # stored x fastest: this is z, y, x
    if bright:
        vol[:, 256, 256] = 255
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + vol.tobytes(), compresslevel=9))
    return path


def timed_bomb(url: str, path: Path, png: tuple[str, bytes]) -> dict:
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(post, url, path.name, path.read_bytes())
        time.sleep(0.5)
        small = pool.submit(post, url, *png)
        (code, secs), (code2, secs2) = big.result(), small.result()
    return {"bytes": path.stat().st_size, "status": code, "seconds": round(secs, 2),
            "concurrent_valid_upload": {"status": code2, "seconds": round(secs2, 2)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stalled", type=int, default=200)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/serve_stall_cpu.json")
    args = ap.parse_args()
    from bonetumor import TrainConfig, create_synthetic_dataset, fit
    from bonetumor.files import atomic_write_json

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = create_synthetic_dataset(tmp / "data", n_patients=8, size=224, seed=0).root
        fit(TrainConfig(data=str(root), image_size=224, epochs=1, weights="none", seed=0, audit=False, feature_views=1),
            tmp / "run", verbose=False)
        png = [(p.name, p.read_bytes()) for p in sorted(root.rglob("*.png"))[:1]][0]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "bonetumor.cli", "serve", str(tmp / "run" / "best.pt"), "--port",
                                   str(port), "--device", "cpu", "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout",
                                   str(BODY_TIMEOUT), "--request-timeout", str(REQUEST_TIMEOUT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}/api/predict"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).read()
                    break
                except OSError:
                    assert time.time() < deadline and server.poll() is None, server.stderr.read().decode()[-2000:]
                    time.sleep(0.2)
            for _ in range(4):  # warm-up: allocations, kernel choice
                post(url, *png)
            quiet = [post(url, *png) for _ in range(args.requests)]
            socks = {}
            for k in range(args.stalled):
                kind = "headers" if k % 2 == 0 else "body"
                socks[stall(port, kind)] = (kind, time.perf_counter())
            stalled = [post(url, *png) for _ in range(args.requests)]
            open_during = len(socks)
            closed = wait_closed(socks, max(HEADER_TIMEOUT, BODY_TIMEOUT) + 30)
            rss = rss_mb(server.pid)
            bombs = {"zero_volume": timed_bomb(url, bomb(tmp / "zero.nii.gz", False), png),
                     "one_bright_voxel_per_slice": timed_bomb(url, bomb(tmp / "bright.nii.gz", True), png)}
            t0 = time.perf_counter()
            server.terminate()
            server.wait(60)
            stop_s = time.perf_counter() - t0
        finally:
            if server.poll() is None:
                server.kill()
    med_q, med_s = statistics.median(s for _, s in quiet), statistics.median(s for _, s in stalled)
    res = {"benchmark": "serve_stall", "date": time.strftime("%Y-%m-%d"),
           "limits": {"header_timeout_s": HEADER_TIMEOUT, "body_timeout_s": BODY_TIMEOUT, "request_timeout_s": REQUEST_TIMEOUT},
           "valid_uploads": args.requests, "statuses": sorted({c for c, _ in quiet + stalled}),
           "latency_median_s_alone": round(med_q, 3), "latency_median_s_with_stalled": round(med_s, 3),
           "latency_ratio": round(med_s / med_q, 3), "stalled_clients_open_while_timed": open_during,
           **{f"stalled_{k}_closed_after_s_max": round(max(t for t, _ in v), 2) for k, v in closed.items() if k != "still_open"},
           **{f"stalled_{k}_statuses": sorted({str(c) for _, c in v}) for k, v in closed.items() if k != "still_open"},
           "stalled_still_open_after_timeout_plus_30_s": closed["still_open"], "server_rss_mb": round(rss, 1),
           "nifti_bombs": bombs, "sigterm_to_exit_s": round(stop_s, 2)}
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

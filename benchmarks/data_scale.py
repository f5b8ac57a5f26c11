"""Discovery, splitting, the audit and loading on 10,000, 30,000 and 100,000 images: time, peak
memory and how each grows with the number of images.

    python benchmarks/data_scale.py [--sizes 10000 30000 100000] [--image-size 32]

Each set is a class-folder layout of small grey PNGs (smooth random fields, a bright blob on the
cancers, each class named in its own pattern as an export tool would) with planted copies: 2% of
the images are byte-identical copies of another image and 2% are re-encoded (JPEG q90) copies,
so the near-copy index has real work. Each size runs in a fresh process that does what
``train --split-by cluster`` does before its first epoch: discover the files, read every image
once (hashes, thumbnail, style), split with copy clusters kept together, audit (copies, confounds,
look-up baseline), fingerprint the data, and one pass of the training loader. Peak RSS is the
process's ``ru_maxrss``. Apart, on the same hashes: the near-copy search through the index
against comparing every pair. The growth exponent is the slope of log(time) on log(images), fitted by
least squares over the sizes. Results: ``benchmarks/results/data_scale_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

COPY_SHARE = 0.02  # of each kind: exact and re-encoded


def _write_block(args: tuple[str, int, int, int, int]) -> None:
    from PIL import Image

    root, start, stop, size, seed = args
    for k in range(start, stop):
        rng = np.random.default_rng((seed, k))
        cancer = k % 2 == 1
        low = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        img = np.asarray(low, dtype=np.float32) * 0.7 + rng.normal(0, 6, (size, size))
        if cancer:
            yy, xx = np.mgrid[:size, :size]
            cy, cx = rng.uniform(0.3, 0.7, 2) * size
            img += 60 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 10) ** 2))
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        folder = Path(root) / ("cancer" if cancer else "normal")
        name = f"bone-cancer_{k:07d}" if cancer else f"IMG{k:07d}"
        pil.save(folder / f"{name}.png")
        u = rng.random()
        if u < COPY_SHARE:  # the same bytes under another name
            (folder / f"{name}_copy.png").write_bytes((folder / f"{name}.png").read_bytes())
        elif u < 2 * COPY_SHARE:  # re-encoded: other bytes, the same picture
            pil.save(folder / f"{name}_reencoded.jpg", quality=90)


def make_set(root: Path, n: int, size: int, seed: int = 0) -> int:
    """A class-folder set of about ``n`` images (planted copies included); returns its file count."""
    for c in ("cancer", "normal"):
        (root / c).mkdir(parents=True, exist_ok=True)
    originals = int(round(n / (1 + COPY_SHARE * 2)))
    step = 2000
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        list(ex.map(_write_block, [(str(root), a, min(a + step, originals), size, seed)
                                   for a in range(0, originals, step)]))
    return sum(1 for _ in root.rglob("*.*"))


def child(data: str, image_size: int) -> dict:
    """The stages, timed, in this process (run fresh per size so that peak RSS is the size's own)."""
    import torch

    from bonetumor.config import TrainConfig
    from bonetumor.data.audit import audit
    from bonetumor.data.grouping import split_samples
    from bonetumor.data.layouts import discover, fingerprint
    from bonetumor.train.batches import create_loader

    torch.set_num_threads(os.cpu_count() or 2)
    times: dict[str, float] = {}
    t = time.perf_counter()
    index = discover(data)
    times["discover"] = time.perf_counter() - t
    t = time.perf_counter()
    index.samples, by_ref = split_samples(index.samples, "cluster", 0.15, 0.15, 0)
    facts = [by_ref[s.ref] for s in index.samples]
    times["read_and_split"] = time.perf_counter() - t
    t = time.perf_counter()
    report = audit(index, facts=facts)
    times["audit"] = time.perf_counter() - t
    t = time.perf_counter()
    fingerprint(index.samples, index.root)
    times["fingerprint"] = time.perf_counter() - t
    cfg = TrainConfig(data=data, image_size=image_size, batch_size=256, workers=2, cache_images=False)
    t = time.perf_counter()
    n_loaded = sum(len(batch[0]) for batch in create_loader(index, "train", cfg, True, torch.device("cpu")))
    times["load_train_epoch"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    copies = report["copies"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the comparison below
    return {"images": len(index.samples), "seconds": {k: round(v, 2) for k, v in times.items()},
            "peak_rss_mb": round(peak, 1), "near_copy_search_s": near_copy_search(facts),
            "copy_pairs": {k: copies[k] for k in ("exact", "near", "same-source", "cross_split_pairs")},
            "loaded": n_loaded}


def near_copy_search(facts: list) -> dict:
    """The near-copy search alone on this set's hashes (after the peak-RSS stages): the index the
    audit uses against comparing every pair (the hash distances only, as the audit did before)."""
    from bonetumor.data.copies import NEAR_THRESHOLD, near_pairs

    ok = [f for f in facts if f.error is None]
    t = time.perf_counter()
    near_pairs(ok, ok, NEAR_THRESHOLD, True)
    index = time.perf_counter() - t
    h = np.array([f.phash for f in ok], dtype=np.uint64)
    t, candidates = time.perf_counter(), 0
    for start in range(0, len(h), 512):
        candidates += int((np.bitwise_count(h[start:start + 512, None] ^ h[None, :]) <= NEAR_THRESHOLD).sum())
    return {"index": round(index, 2), "all_pairs": round(time.perf_counter() - t, 2)}


def growth(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--work", help="folder for the generated sets (default: a new temporary folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/data_scale_cpu.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.image_size)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bonetumor-scale-"))
    rows = []
    for n in args.sizes:
        root = work / f"set{n}"
        if not root.exists():
            t = time.perf_counter()
            files = make_set(root, n, args.image_size)
            print(f"made {files} images in {time.perf_counter() - t:.0f} s", flush=True)
        p = subprocess.run([sys.executable, __file__, "--child", str(root), "--image-size", str(args.image_size)],
                           capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    n = [r["images"] for r in rows]
    result = {"image_size": args.image_size, "cpu_count": os.cpu_count(), "runs": rows}
    if len(rows) > 1:
        result["growth_exponent"] = {k: round(growth(n, [r["seconds"][k] for r in rows]), 3)
                                     for k in rows[0]["seconds"]}
        result["growth_exponent"]["peak_rss_mb"] = round(growth(n, [r["peak_rss_mb"] for r in rows]), 3)
        result["growth_exponent"]["near_copy_search"] = {
            k: round(growth(n, [r["near_copy_search_s"][k] for r in rows]), 3) for k in ("index", "all_pairs")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("growth_exponent", {}), indent=2))


if __name__ == "__main__":
    main()

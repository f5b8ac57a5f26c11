"""Peak memory of training at batch 32, 224 px, and whether memory grows from epoch to epoch.

Each mode trains in a fresh process (so its peak is its own) on the same synthetic data: the
frozen backbone with cached features (the default), the frozen backbone run every epoch
(``--no-cache-features``), and full fine-tuning in bf16 and fp32 with nothing recomputed (the default)
and with ``--recompute-stages`` 1 and 2 (bf16) or 5 (fp32), and with ``--bn-statistics frozen``
(the default from pretrained weights; these runs start from random ones). The resident set size is
read after every epoch (at the next one's start); growth is the last reading minus the second
(the first epoch holds the allocators' warm-up). The last epoch's own reading is not taken.

    python benchmarks/training_memory.py [--out benchmarks/results/training_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "frozen_cached_k4": dict(freeze="backbone", epochs=8),
    "frozen_uncached": dict(freeze="backbone", cache_features=False, epochs=8),
    # fine-tuning at the default (nothing recomputed), and with stages recomputed (see recompute.py)
    "full_finetune_bf16": dict(freeze="none", precision="bf16", epochs=6),
    "full_finetune_bf16_recompute1": dict(freeze="none", precision="bf16", recompute_stages=1, epochs=6),
    "full_finetune_bf16_recompute2": dict(freeze="none", precision="bf16", recompute_stages=2, epochs=6),
    # BatchNorm statistics frozen and folded into the convolutions (the default from pretrained weights)
    "full_finetune_bf16_bn_frozen": dict(freeze="none", precision="bf16", bn_statistics="frozen", epochs=6),
    "full_finetune_fp32": dict(freeze="none", precision="fp32", epochs=6),
    "full_finetune_fp32_bn_frozen": dict(freeze="none", precision="fp32", bn_statistics="frozen", epochs=6),
    "full_finetune_fp32_recompute5": dict(freeze="none", precision="fp32", recompute_stages=5, epochs=6),
}


def rss_mb() -> float:
    """Current resident set size (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, data: str, out: str) -> None:
    from bonetumor import TrainConfig, fit
    from bonetumor.runtime.device import peak_rss_mb
    from bonetumor.train import loop as train_mod

    per_epoch: list[float] = []
    real = train_mod.train_one_epoch

    def recorded(*a, **k):  # the size at each epoch's start is the size the previous epoch left
        per_epoch.append(round(rss_mb(), 1))
        return real(*a, **k)

    train_mod.train_one_epoch = recorded
    kw = MODES[mode]
    cfg = TrainConfig(data=data, image_size=224, batch_size=32, weights="none", patience=100, seed=0, audit=False,
                      **kw)
    t0 = time.perf_counter()
    fit(cfg, out, verbose=False)
    after = per_epoch[1:]  # per_epoch[0] is before training
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_each_epoch_mb": after,
                      "growth_mb": round(after[-1] - after[1], 1), "seconds": round(time.perf_counter() - t0, 1),
                      **kw}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/training_memory_cpu.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    from bonetumor import create_synthetic_dataset
    from bonetumor.files import atomic_write_json
    from bonetumor.runtime.device import environment_info

    res: dict = {"benchmark": "training_memory", "date": time.strftime("%Y-%m-%d"), "batch_size": 32, "image_size": 224,
                 "data": "synthetic stir, 40 patients x 3 slices (84 train, 18 valid)", "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = create_synthetic_dataset(Path(tmp) / "data", n_patients=40, size=224, seed=0, modality="stir",
                                        slices_per_patient=3).root
        for mode in MODES:
            p = subprocess.run([sys.executable, __file__, "--child", mode, str(root), str(Path(tmp) / mode)],
                               capture_output=True, text=True, check=True)
            res["modes"][mode] = json.loads(p.stdout.strip().splitlines()[-1])
            print(mode, res["modes"][mode], flush=True)
    import torch

    res["environment"] = environment_info(torch.device("cpu"))
    atomic_write_json(args.out, res)


if __name__ == "__main__":
    main()

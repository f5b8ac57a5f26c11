"""Does loading bound training? The training loader's images/s beside the model's, in one run.

Loader: ``create_loader`` of the training split (decode PNG, resize to 224, flip/rotate/zoom,
normalise), 2 passes per setting, with 0 and 2 worker processes, with and without the
decoded-image cache. Model: a ResNet50 full training step (batch 16) and a forward pass
(batch 16), fp32 channels_last. Medians of ``--reps`` after a warm-up.

    python benchmarks/data_loader.py [--out benchmarks/results/data_loader_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/data_loader_cpu.json")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import torch

    from bonetumor import TrainConfig, create_synthetic_dataset
    from bonetumor.files import atomic_write_json
    from bonetumor.model.backbones import create_model
    from bonetumor.runtime.device import environment_info
    from bonetumor.train.batches import create_loader
    from bonetumor.train.setup import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        root = create_synthetic_dataset(Path(tmp) / "d", n_patients=40, size=256, seed=0, slices_per_patient=4).root
        base = TrainConfig(data=str(root), image_size=224, batch_size=16, seed=0, weights="none", freeze="none")
        index = prepare_data(base)
        dev = torch.device("cpu")
        loader_rates: dict[str, list[float]] = {}
        for workers in (0, 2):
            for cache in (False, True):
                cfg = dataclasses.replace(base, workers=workers, cache_images=cache)
                loader = create_loader(index, "train", cfg, True, dev, torch.Generator().manual_seed(0))
                name = f"workers{workers}_{'cache' if cache else 'nocache'}"
                for _ in loader:  # warm-up; fills the cache when on
                    pass
                rates = []
                for _ in range(args.reps):
                    t0, n = time.perf_counter(), 0
                    for x, _, _ in loader:
                        n += len(x)
                    rates.append(n / (time.perf_counter() - t0))
                loader_rates[name] = rates
                print(name, [round(r, 1) for r in rates])
        model = create_model("resnet50", "none", "none").to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        x = torch.randn(16, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        y = torch.rand(16, 1)

        def step():
            model.train()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        def forward():
            model.eval()
            with torch.inference_mode():
                model(x)

        model_rates: dict[str, list[float]] = {"train_step": [], "forward": []}
        step(), forward()
        for _ in range(args.reps):
            for name, fn in (("train_step", step), ("forward", forward)):
                t0 = time.perf_counter()
                fn()
                model_rates[name].append(16 / (time.perf_counter() - t0))
        print({k: [round(r, 1) for r in v] for k, v in model_rates.items()})
    med_l = {k: statistics.median(v) for k, v in loader_rates.items()}
    med_m = {k: statistics.median(v) for k, v in model_rates.items()}
    summary = {"benchmark": "data_loader", "date": time.strftime("%Y-%m-%d"), "image_size": 224, "source": "256 px 8-bit PNG",
               "loader_images_per_second": med_l, "model_images_per_second": med_m,
               "loader_over_forward": {k: v / med_m["forward"] for k, v in med_l.items()},
               "loader_over_train_step": {k: v / med_m["train_step"] for k, v in med_l.items()},
               "runs": {"loader": loader_rates, "model": model_rates}, "environment": environment_info(torch.device("cpu"))}
    atomic_write_json(args.out, summary)
    print(json.dumps({k: summary[k] for k in ("loader_images_per_second", "model_images_per_second", "loader_over_forward")}, indent=1))


if __name__ == "__main__":
    main()
